"""The edge graph of a GPT-2 model: residual-stream writers (sources) → readers (targets), and its views.

    python -c "from attrpatch.graph import EdgeGraph; print(EdgeGraph(12, 12).index().n_edges)"   # 32491

Sources write to the residual stream: ``embed`` (token + position embedding, layer 0), every ``head_out``
(layer, head; its write in d_model is z·W_O[l, h]) and every ``mlp_out`` (layer). Targets read it: every
head's ``head_q`` / ``head_k`` / ``head_v`` *input* (the engine's ``head_q_in`` … sites with
``split=True``), every ``mlp_in`` (layer) and ``logits`` (layer n_layers, the input of ``ln_final``).
An edge exists when the source is strictly upstream of the target:

* ``embed`` → every target;
* ``head_out`` (L) → heads of layers L' > L, ``mlp_in`` of layers L' ≥ L, ``logits``;
* ``mlp_out`` (L) → heads of layers L' > L, ``mlp_in`` of layers L' > L, ``logits``.

GPT-2 small (12 layers, 12 heads) has 32,491 edges with q/k/v split, as counted by Syed et al. (2023) and
by TransformerLens' ``enumerate_edges`` per position.

Order (every edge method and view relies on it): sources are ``embed``, then per layer its heads and its
MLP; targets are, per layer, its q heads, k heads, v heads and ``mlp_in``, then ``logits``. So the targets of
one layer form one contiguous block, and the sources upstream of that block are a prefix of the sources.

Also here, because the edge methods and ``circuits`` share it: the source writes of one run in graph order
(``source_writes``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from einops import einsum
from jaxtyping import Float
from torch import Tensor

from attrpatch.components import QKV, Node
from attrpatch.engine import Weights
from attrpatch.errors import ConfigError
from attrpatch.scores import EdgeIndex, EdgeScores

SRC_SITES = ("resid_pre", "head_out", "mlp_out")  # engine sites holding the source writes (resid_pre 0 = embed)


class GraphError(ConfigError):
    """Scores or nodes that do not fit an edge graph; the message says how to fix it."""


@dataclass(frozen=True)
class EdgeGraph:
    """The edge graph of a GPT-2 shape. Made from the shape alone, so counts need no weights."""

    n_layers: int
    n_heads: int

    def __post_init__(self) -> None:
        if self.n_layers < 1 or self.n_heads < 1:
            raise GraphError(f"a graph needs n_layers >= 1 and n_heads >= 1, got {self.n_layers}, {self.n_heads}")

    @classmethod
    def of(cls, model) -> EdgeGraph:
        """The graph of a ``LoadedModel``, bridge or engine ``Weights``."""
        if isinstance(model, Weights):
            return cls(model.n_layers, model.n_heads)
        from attrpatch.engine import weights

        return cls.of(weights(model))

    @classmethod
    def of_index(cls, index: EdgeIndex) -> EdgeGraph:
        """The graph an ``EdgeIndex`` made by ``index()`` / ``subset()`` is over (raises for any other)."""
        n_layers = index.dst[-1].layer if index.dst else 0
        n_heads = sum(n.component == "head_out" for n in index.src) // max(n_layers, 1)
        try:
            graph = cls(n_layers, n_heads)
        except GraphError:
            graph = None
        if graph is None or index.src != graph.src or index.dst != graph.dst:
            raise GraphError("these edge scores are not over an attrpatch edge graph (EdgeGraph.index()): "
                             "pass scores made by an attrpatch edge method")
        return graph

    # --- sizes and blocks -------------------------------------------------------------------------
    @property
    def per_layer_dst(self) -> int:
        """Targets in one layer's block: 3 · n_heads q/k/v inputs and one mlp_in."""
        return 3 * self.n_heads + 1

    @property
    def n_src(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def n_dst(self) -> int:
        return self.n_layers * self.per_layer_dst + 1

    def dst_block(self, layer: int) -> slice:
        """Target indices of layer ``layer`` (q heads, k heads, v heads, mlp_in); ``n_layers`` = logits."""
        start = layer * self.per_layer_dst
        return slice(start, start + (1 if layer == self.n_layers else self.per_layer_dst))

    def n_src_before_attn(self, layer: int) -> int:
        """How many sources precede layer ``layer``'s attention (a prefix of the sources)."""
        return 1 + layer * (self.n_heads + 1)

    def n_src_before_mlp(self, layer: int) -> int:
        """How many sources precede layer ``layer``'s MLP: those before its attention and its heads."""
        return self.n_src_before_attn(layer) + self.n_heads

    def head_src(self, layer: int) -> slice:
        """Source indices of layer ``layer``'s heads."""
        start = self.n_src_before_attn(layer)
        return slice(start, start + self.n_heads)

    def dst_qkv(self, kind: str, layer: int) -> slice:
        """Target indices of layer ``layer``'s q, k or v inputs (one per head)."""
        start = layer * self.per_layer_dst + QKV.index(kind) * self.n_heads
        return slice(start, start + self.n_heads)

    def dst_mlp(self, layer: int) -> int:
        return layer * self.per_layer_dst + 3 * self.n_heads

    # --- nodes and the index -----------------------------------------------------------------------
    @cached_property
    def src(self) -> tuple[Node, ...]:
        nodes = [Node("embed", 0)]
        for layer in range(self.n_layers):
            nodes += [Node("head_out", layer, h) for h in range(self.n_heads)] + [Node("mlp_out", layer)]
        return tuple(nodes)

    @cached_property
    def dst(self) -> tuple[Node, ...]:
        nodes: list[Node] = []
        for layer in range(self.n_layers):
            for kind in QKV:
                nodes += [Node(kind, layer, h) for h in range(self.n_heads)]
            nodes.append(Node("mlp_in", layer))
        nodes.append(Node("logits", self.n_layers))
        return tuple(nodes)

    @cached_property
    def valid(self) -> Tensor:
        """bool [src, dst]: source strictly upstream of target (the rules in the module docstring)."""
        v = torch.zeros(self.n_src, self.n_dst, dtype=torch.bool)
        for layer in range(self.n_layers + 1):
            block = self.dst_block(layer)
            if layer == self.n_layers:
                v[:, block] = True
                continue
            v[: self.n_src_before_attn(layer), block.start: block.stop - 1] = True
            v[: self.n_src_before_mlp(layer), self.dst_mlp(layer)] = True
        return v

    def index(self) -> EdgeIndex:
        """The full ``EdgeIndex`` (every valid edge)."""
        return EdgeIndex(self.src, self.dst, self.valid)

    def subset(self, keep: Tensor) -> EdgeIndex:
        """An ``EdgeIndex`` over the same nodes marking only ``keep & valid`` (e.g. edges actually patched)."""
        if keep.shape != self.valid.shape:
            raise GraphError(f"edge mask has shape {tuple(keep.shape)}, the graph needs {tuple(self.valid.shape)}")
        return EdgeIndex(self.src, self.dst, keep.to(torch.bool) & self.valid)

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())

    def check(self, index: EdgeIndex) -> None:
        """Raise unless ``index`` is over this graph's nodes (in this order)."""
        if index.src != self.src or index.dst != self.dst:
            raise GraphError(
                f"the edge scores are not over the graph of a {self.n_layers}-layer, {self.n_heads}-head model: "
                "pass scores made by an attrpatch edge method for this model"
            )


def head_path_view(scores: EdgeScores) -> Float[Tensor, "*lead qkv dst_layer dst_head src_layer src_head"]:
    """Head-to-head path scores of the Attribution Patching Demo, as a view of edge scores.

    ``[..., q/k/v, dst_layer, dst_head, src_layer, src_head]``: the score of the edge from head
    (src_layer, src_head)'s output into head (dst_layer, dst_head)'s query, key or value input. Paths in the
    wrong order (src_layer ≥ dst_layer) are 0, as the Demo's ``correct_layer_order_mask`` sets them; any
    leading axes of the scores (prompt, pos) are kept. No score is recomputed.
    """
    index = scores.index
    graph = EdgeGraph.of_index(index)
    n_layers, n_heads = graph.n_layers, graph.n_heads
    src_idx = torch.tensor([graph.head_src(layer).start + h for layer in range(n_layers) for h in range(n_heads)])
    dst_idx = torch.tensor([graph.dst_qkv(kind, layer).start + h for kind in QKV for layer in range(n_layers)
                            for h in range(n_heads)])
    x = scores.scores.index_select(-2, src_idx.to(scores.scores.device))
    x = x.index_select(-1, dst_idx.to(scores.scores.device))  # [..., src heads, qkv·dst heads]
    keep = index.valid[src_idx][:, dst_idx].to(x.device)
    x = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    lead = x.shape[:-2]
    x = x.reshape(*lead, n_layers, n_heads, 3, n_layers, n_heads)
    nd = len(lead)
    return x.permute(*range(nd), nd + 2, nd + 3, nd + 4, nd, nd + 1)


# --- shared by the edge methods -----------------------------------------------------------------------

def source_writes(w: Weights, acts: dict[tuple[str, int], Tensor]) -> Float[Tensor, "batch pos src d_model"]:
    """Every source's write to the residual stream, in graph order, from a run's recorded ``SRC_SITES``.

    ``acts`` holds ``resid_pre`` of layer 0 (the embed write), ``head_out`` (z) and ``mlp_out`` of every
    layer; a head's write is z·W_O[l, h].
    """
    parts = [acts[("resid_pre", 0)][:, :, None]]
    for layer in range(w.n_layers):
        parts.append(head_writes(w, layer, acts[("head_out", layer)]).to(parts[0].dtype))
        parts.append(acts[("mlp_out", layer)][:, :, None])
    return torch.cat(parts, dim=2)


def head_writes(w: Weights, layer: int, z: Float[Tensor, "batch pos head d_head"]
                ) -> Float[Tensor, "batch pos head d_model"]:
    """Each head's write to the residual stream, z · W_O[layer, head]."""
    return einsum(z, w.W_O_heads(layer), "batch pos head d_head, head d_head d_model -> batch pos head d_model")
