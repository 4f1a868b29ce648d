"""The edge graph from the shape alone: its edges are TransformerLens' ``enumerate_edges`` rule, its errors clear.

Views of edge scores over the graph (``head_path_view``) are checked against the Demo's einsum in
``test_edges.py``, where the scores come from.
"""

from __future__ import annotations

import pytest
import torch

from attrpatch.components import Node
from attrpatch.graph import EdgeGraph, GraphError, head_path_view
from attrpatch.scores import EdgeIndex, EdgeScores


def literal_edge_list(n_layers: int, n_heads: int) -> list[tuple[Node, Node]]:
    """Edges enumerated as TransformerLens' ``enumerate_edges`` does: readers connect to the writers so far."""
    edges, available = [], [Node("embed", 0)]
    for layer in range(n_layers):
        for kind in ("head_q", "head_k", "head_v"):
            for h in range(n_heads):
                edges += [(s, Node(kind, layer, h)) for s in available]
        available = available + [Node("head_out", layer, h) for h in range(n_heads)]
        edges += [(s, Node("mlp_in", layer)) for s in available]
        available = available + [Node("mlp_out", layer)]
    edges += [(s, Node("logits", n_layers)) for s in available]
    return edges


@pytest.mark.parametrize(("n_layers", "n_heads", "expected"),
                         [(12, 12, 32491), (2, 4, None), (3, 3, None), (24, 16, None)])
def test_edge_counts_from_shape_alone(n_layers, n_heads, expected):
    graph = EdgeGraph(n_layers, n_heads)
    literal = literal_edge_list(n_layers, n_heads)
    assert graph.n_edges == len(literal) == (expected or len(literal))
    if n_layers < 12:  # the valid mask marks exactly the literal edges
        si = {n: i for i, n in enumerate(graph.src)}
        di = {n: i for i, n in enumerate(graph.dst)}
        mask = torch.zeros_like(graph.valid)
        for s, d in literal:
            mask[si[s], di[d]] = True
        assert torch.equal(mask, graph.valid)


def test_graph_errors():
    with pytest.raises(GraphError, match="n_layers >= 1"):
        EdgeGraph(0, 4)
    graph = EdgeGraph(2, 4)
    with pytest.raises(GraphError, match="edge mask has shape"):
        graph.subset(torch.ones(3, 3, dtype=torch.bool))
    index = EdgeIndex(graph.src[:-1] + (Node("mlp_out", 7),), graph.dst, graph.valid)
    bad = EdgeScores("denoise", index, torch.zeros(graph.n_src, graph.n_dst), ("src", "dst"))
    with pytest.raises(GraphError, match="not over an attrpatch edge graph"):
        head_path_view(bad)


def test_blocks_and_prefixes_follow_the_order():
    """Targets of a layer form one block; the sources upstream of it are a prefix of the sources."""
    g = EdgeGraph(3, 2)
    for layer in range(g.n_layers):
        block = g.dst_block(layer)
        assert [g.dst[i].layer for i in range(block.start, block.stop)] == [layer] * g.per_layer_dst
        before = g.n_src_before_attn(layer)
        assert all(g.valid[:before, g.dst_qkv("head_q", layer)].flatten())
        assert not g.valid[before:, g.dst_qkv("head_q", layer)].any()
        mlp = g.dst_mlp(layer)
        assert g.valid[: g.n_src_before_mlp(layer), mlp].all() and not g.valid[g.n_src_before_mlp(layer):, mlp].any()
    assert g.valid[:, g.dst_block(g.n_layers)].all()  # every source reaches the logits
