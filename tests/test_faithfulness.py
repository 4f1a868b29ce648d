"""Circuit ablation and faithfulness: a slow literal reference, exact endpoints, hand-made cases, MIB areas.

The literal reference rebuilds every target's input edge by edge, as Σ_src (kept ? live write : ablated
write) + the attention biases upstream — a different decomposition from the engine edit's
``live input + Σ_ablated δ`` — and over an edge index whose sources and targets are shuffled, so nothing
relies on the order of ``attrpatch.graph``.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from attrpatch import make_batch
from attrpatch.circuits import CircuitError, circuit_metric, template_mean
from attrpatch.components import Node
from attrpatch.engine import forward, layer_norm, run_with_acts, weights
from attrpatch.methods import MethodConfig, MethodError, method_config, run_method
from attrpatch.methods.core import run_sources
from attrpatch.methods.faithfulness import (
    FAITHFULNESS_SCHEMA,
    K_PERCENT,
    areas,
    edge_curve,
    n_kept,
    rank_positions,
)
from attrpatch.scores import EdgeIndex, EdgeScores

QKV = ("head_q", "head_k", "head_v")


def upstream(s: Node, d: Node) -> bool:
    """The edge rules, written from the architecture: a source feeds every later reader of the stream."""
    if s.component == "embed" or d.component == "logits":
        return True
    if s.component == "head_out":
        return d.layer > s.layer if d.component in QKV else d.layer >= s.layer
    return d.layer > s.layer  # mlp_out


def shuffled_index(n_layers: int, n_heads: int, seed: int) -> EdgeIndex:
    src = [Node("embed", 0)] + [Node("head_out", lyr, h) for lyr in range(n_layers) for h in range(n_heads)] \
        + [Node("mlp_out", lyr) for lyr in range(n_layers)]
    dst = [Node(k, lyr, h) for k in QKV for lyr in range(n_layers) for h in range(n_heads)] \
        + [Node("mlp_in", lyr) for lyr in range(n_layers)] + [Node("logits", n_layers)]
    g = torch.Generator().manual_seed(seed)
    src = [src[i] for i in torch.randperm(len(src), generator=g)]
    dst = [dst[i] for i in torch.randperm(len(dst), generator=g)]
    valid = torch.tensor([[upstream(s, d) for d in dst] for s in src])
    return EdgeIndex(tuple(src), tuple(dst), valid)


def logit_diff(logits, batch):
    r = torch.arange(len(batch))
    return logits[r, batch.answer_ids] - logits[r, batch.wrong_ids]


def in_index_order(w, index: EdgeIndex, writes: torch.Tensor) -> torch.Tensor:
    """Source writes (graph order) permuted into the order ``index`` lists its sources."""
    from attrpatch.graph import EdgeGraph

    order = EdgeGraph.of(w).src
    return writes[:, :, [order.index(n) for n in index.src]]


def literal_metric(w, index: EdgeIndex, circuit: torch.Tensor, batch, abl: torch.Tensor) -> torch.Tensor:
    """Slow reference: every target input assembled edge by edge from kept live / ablated writes + biases."""
    src_i = {n: i for i, n in enumerate(index.src)}
    dst_i = {n: i for i, n in enumerate(index.dst)}
    live: dict[int, torch.Tensor] = {}

    def assemble(d: Node, n_bias_layers: int) -> torch.Tensor:
        j = dst_i[d]
        b_O = torch.stack([lyr.b_O for lyr in w.layers])
        acc = b_O[:n_bias_layers].sum(0).expand(*batch.clean_tokens.shape, -1).clone()
        for s in range(len(index.src)):
            if index.valid[s, j]:
                acc = acc + (live[s] if circuit[s, j] else abl[:, :, s])
        return acc

    def edit(kind, layer, x):
        if kind == "resid_pre" and layer == 0:
            live[src_i[Node("embed", 0)]] = x
        elif kind == "head_out":
            for h in range(w.n_heads):
                live[src_i[Node("head_out", layer, h)]] = x[:, :, h] @ w.W_O_heads(layer)[h]
        elif kind == "mlp_out":
            live[src_i[Node("mlp_out", layer)]] = x
        elif kind in ("head_q_in", "head_k_in", "head_v_in"):
            comp = kind.removesuffix("_in")
            return torch.stack([assemble(Node(comp, layer, h), layer) for h in range(w.n_heads)], dim=2)
        elif kind == "mlp_in":
            return assemble(Node("mlp_in", layer), layer + 1)
        elif kind == "logits":
            return assemble(Node("logits", layer), w.n_layers)
        return x

    with torch.no_grad():
        return logit_diff(forward(w, batch.clean_tokens, batch.answer_pos, edit, split=True), batch)


@pytest.fixture(scope="module")
def ioi(tokenizer):
    return make_batch("ioi", tokenizer, n_prompts=5, seed=2)


def test_edge_rules_count_gpt2_small():
    """The rules above give GPT-2 small's published edge count (Syed et al. 2023: 32,491)."""
    assert shuffled_index(12, 12, 0).n_edges == 32491


def test_circuits_match_literal_reference(tiny, ioi):
    w = weights(tiny)
    index = shuffled_index(w.n_layers, w.n_heads, seed=3)
    g = torch.Generator().manual_seed(0)
    circuits = torch.rand(4, *index.valid.shape, generator=g) < torch.tensor([0.0, 0.2, 0.7, 1.0])[:, None, None]
    ours = circuit_metric(w, index, circuits, ioi, max_rows=7)  # 4 circuits × 5 prompts in chunks
    abl = in_index_order(w, index, run_sources(w, ioi.corrupt_tokens, ioi.answer_pos))
    for c in range(len(circuits)):
        ref = literal_metric(w, index, circuits[c], ioi, abl)
        torch.testing.assert_close(ours[c], ref, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        clean = logit_diff(forward(w, ioi.clean_tokens, ioi.answer_pos), ioi)
        corrupt = logit_diff(forward(w, ioi.corrupt_tokens, ioi.answer_pos), ioi)
    torch.testing.assert_close(ours[3], clean, atol=1e-4, rtol=1e-4)  # nothing ablated: the clean model
    torch.testing.assert_close(ours[0], corrupt, atol=1e-4, rtol=1e-4)  # everything: the corrupted run
    assert not torch.allclose(ours[1], ours[2])


def test_single_direct_edge_from_embed(tiny, ioi):
    """Hand-made: keep only embed → logits. Every other source sees only corrupted inputs, so the logits read
    the corrupted final residual with the embedding swapped for the clean one."""
    w = weights(tiny)
    index = shuffled_index(w.n_layers, w.n_heads, seed=5)
    circuit = torch.zeros(1, *index.valid.shape, dtype=torch.bool)
    circuit[0, index.src.index(Node("embed", 0)), index.dst.index(Node("logits", w.n_layers))] = True
    ours = circuit_metric(w, index, circuit, ioi)[0]
    with torch.no_grad():
        _, corr = run_with_acts(w, ioi.corrupt_tokens, ioi.answer_pos, kinds=("resid_pre", "logits"))
        _, clean = run_with_acts(w, ioi.clean_tokens, ioi.answer_pos, kinds=("resid_pre",))
        final = corr[("logits", w.n_layers)] - corr[("resid_pre", 0)] + clean[("resid_pre", 0)]
        rows = torch.arange(len(ioi))
        logits = layer_norm(final[rows, ioi.answer_pos], w.lnf_w, w.lnf_b, w.eps) @ w.W_U + w.b_U
    torch.testing.assert_close(ours, logit_diff(logits, ioi), atol=1e-4, rtol=1e-4)


def test_mean_ablation(tiny, tokenizer):
    """One prompt per template: the template mean is the prompt's own corrupted run, so mean = patch."""
    big = make_batch("ioi", tokenizer, n_prompts=30, seed=4)
    first = {}
    for i, p in enumerate(big.prompts):
        first.setdefault(p.template, i)
    batch = big.select(sorted(first.values())[:4])
    w = weights(tiny)
    index = shuffled_index(w.n_layers, w.n_heads, seed=1)
    circuits = torch.rand(2, *index.valid.shape, generator=torch.Generator().manual_seed(1)) < 0.3
    torch.testing.assert_close(circuit_metric(w, index, circuits, batch, "mean"),
                               circuit_metric(w, index, circuits, batch, "patch"), atol=1e-5, rtol=1e-5)


def test_template_mean_counts_real_positions_only():
    writes = torch.arange(3 * 4, dtype=torch.float32).reshape(3, 4, 1, 1)  # prompts × pos
    batch = SimpleNamespace(prompts=[SimpleNamespace(template=t) for t in (7, 2, 7)],
                            lengths=torch.tensor([4, 4, 2]))
    out = template_mean(writes, batch)[..., 0, 0]
    # template 7 = prompts 0 and 2; prompt 2 is padded after position 1
    expect7 = torch.tensor([(0 + 8) / 2, (1 + 9) / 2, 2.0, 3.0])
    torch.testing.assert_close(out[0], expect7)
    torch.testing.assert_close(out[2], expect7)
    torch.testing.assert_close(out[1], writes[1, :, 0, 0])


def test_curve_endpoints_exact(tiny, ioi):
    w = weights(tiny)
    index = shuffled_index(w.n_layers, w.n_heads, seed=7)
    scores = torch.randn(index.valid.shape, generator=torch.Generator().manual_seed(2))
    table = edge_curve(tiny, ioi, EdgeScores("denoise", index, scores, ("src", "dst")), ranking="hand")
    assert table.schema == FAITHFULNESS_SCHEMA
    df = table.to_pandas()
    assert df["k_percent"].tolist() == pytest.approx(list(K_PERCENT))
    assert df["faithfulness"].iloc[-1] == 1.0  # f(100%) exactly
    assert (df.loc[df["n_kept"] == 0, "faithfulness"] == 0.0).all()  # nothing kept: exactly 0
    assert (df["n_kept"] == n_kept(K_PERCENT, index.n_edges)).all() and (df["n_edges_kept"] == df["n_kept"]).all()
    with torch.no_grad():
        clean = logit_diff(forward(w, ioi.clean_tokens, ioi.answer_pos), ioi).mean()
    assert df["metric_full"].iloc[0] == pytest.approx(float(clean), abs=1e-4)
    cpr, cmd = areas(K_PERCENT, df["faithfulness"].to_numpy(np.float64))
    assert df["cpr"].iloc[0] == pytest.approx(cpr, rel=1e-5) and df["cmd"].iloc[0] == pytest.approx(cmd, rel=1e-5)
    # the circuits really are the top edges: the 50% circuit is the one with the largest |score| edges
    ranks = rank_positions(scores, index.valid)
    assert int((ranks < df["n_kept"].iloc[-2]).sum()) == df["n_kept"].iloc[-2]


def test_areas_on_known_curves():
    ks = K_PERCENT
    x = np.array(ks) / 100
    assert areas(ks, np.ones(10)) == pytest.approx((0.999, 0.0))
    cpr, cmd = areas(ks, x)  # f(x) = x: the trapezoid is exact for a line
    assert cpr == pytest.approx((1 - 0.001**2) / 2)
    assert cmd == pytest.approx(0.999 - (1 - 0.001**2) / 2)
    # f crossing 1: MIB's trapezoid over |1 − f| values, computed by hand
    assert areas((0, 50, 100), [0, 2, 1]) == pytest.approx((0.5 * 1 + 0.5 * 1.5, 0.5 * 1 + 0.5 * 0.5))
    with pytest.raises(MethodError, match="strictly increasing"):
        areas((0, 50, 50), [0, 1, 1])


def test_n_kept_matches_mib_rounding():
    assert n_kept(K_PERCENT, 1000).tolist() == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    assert n_kept((29,), 100).tolist() == [29]  # 0.29 · 100 = 28.999… in floating point
    assert n_kept((0.1,), 999).tolist() == [0]


def test_bad_circuits_and_options(tiny, ioi):
    w = weights(tiny)
    index = shuffled_index(w.n_layers, w.n_heads, seed=0)
    with pytest.raises(CircuitError, match="circuits must be bool"):
        circuit_metric(w, index, torch.ones(index.valid.shape, dtype=torch.bool), ioi)
    with pytest.raises(CircuitError, match="unknown ablation"):
        circuit_metric(w, index, torch.ones(1, *index.valid.shape, dtype=torch.bool), ioi, "zero")
    partial = EdgeIndex(index.src[1:], index.dst, index.valid[1:])
    with pytest.raises(CircuitError, match="not the full graph"):
        circuit_metric(w, partial, torch.ones(1, *partial.valid.shape, dtype=torch.bool), ioi)
    for options, match in (({"level": "neuron"}, "level: \\['neuron'\\] not allowed; use 'edge' / 'node'"),
                           ({"ablation": "zero"}, "ablation: \\['zero'\\] not allowed"),
                           ({"k_percent": [5, 1]}, "strictly increasing"), ({"ranks": "x"}, "takes no option"),
                           ({"ranking": "nope"}, "unknown method"), ({"ranking": "activation"}, "produces nodes")):
        with pytest.raises(MethodError, match=match):
            method_config("faithfulness", **options)


def test_edge_graph_order_matches_literal_reference(tiny, ioi):
    """attrpatch.graph's order makes the upstream sources a prefix (the no-copy path): same answer."""
    from attrpatch.graph import EdgeGraph

    w = weights(tiny)
    index = EdgeGraph.of(w).index()
    circuits = torch.rand(2, *index.valid.shape, generator=torch.Generator().manual_seed(5)) < 0.4
    ours = circuit_metric(w, index, circuits, ioi)
    abl = in_index_order(w, index, run_sources(w, ioi.corrupt_tokens, ioi.answer_pos))
    for c in range(2):
        torch.testing.assert_close(ours[c], literal_metric(w, index, circuits[c], ioi, abl), atol=1e-4, rtol=1e-4)


def test_faithfulness_method_edges(tiny, ioi):
    cfg = method_config("faithfulness", directions=("denoise", "noise"), k_percent=[1, 10, 50, 100])
    result = run_method("faithfulness", tiny, ioi, cfg)
    assert not result.nodes and not result.edges
    table = result.tables["faithfulness"]
    assert table.schema == FAITHFULNESS_SCHEMA
    df = table.to_pandas()
    assert len(df) == 8 and set(df["direction"]) == {"denoise", "noise"}
    assert set(df["ranking"]) == {"edge_attribution"} and set(df["level"]) == {"edge"}
    assert (df.groupby("direction")["faithfulness"].last() == 1.0).all()
    for _, curve in df.groupby("direction"):
        cpr, cmd = areas(curve["k_percent"], curve["faithfulness"].to_numpy(np.float64))
        assert curve["cpr"].iloc[0] == pytest.approx(cpr, rel=1e-5)
        assert curve["cmd"].iloc[0] == pytest.approx(cmd, rel=1e-5)
    # the baselines do not depend on the ranking's direction; m(∅) is the corrupted model (patch ablation)
    assert df["metric_full"].nunique() == 1 and df["metric_empty"].nunique() == 1
    w = weights(tiny)
    with torch.no_grad():
        corrupt = logit_diff(forward(w, ioi.corrupt_tokens, ioi.answer_pos), ioi).mean()
    assert df["metric_empty"].iloc[0] == pytest.approx(float(corrupt), abs=1e-4)


def test_faithfulness_method_nodes(tiny, ioi):
    """Node circuits ranked by exact activation patching: a circuit of n nodes keeps every edge out of them
    and out of embed; the largest node circuit is the full graph."""
    from attrpatch.graph import EdgeGraph

    w = weights(tiny)
    graph = EdgeGraph.of(w)
    cfg = method_config("faithfulness", level="node", ranking="activation", k_percent=[10, 50, 100], ablation="mean")
    df = run_method("faithfulness", tiny, ioi, cfg).tables["faithfulness"].to_pandas()
    n_nodes = w.n_layers * (w.n_heads + 1)
    assert (df["n_total"] == n_nodes).all() and df["n_kept"].tolist() == n_kept([10, 50, 100], n_nodes).tolist()
    out_degree = graph.valid.sum(1)
    assert df["n_edges_kept"].iloc[-1] == graph.n_edges
    # 10%: one node, so embed's edges (always kept) plus the out-edges of exactly one head or MLP
    assert df["n_kept"].iloc[0] == 1
    assert int(df["n_edges_kept"].iloc[0]) - int(out_degree[0]) in set(out_degree[1:].tolist())
    assert df["faithfulness"].iloc[-1] == 1.0 and set(df["ablation"]) == {"mean"}


def test_one_ablated_edge_is_exact_edge_patching(tiny, ioi):
    """Ablating a single edge from the full graph is exact edge patching in the noise direction (run clean,
    the target reads the corrupted write): m(N minus e) − m(N) = edge_activation's score, per prompt."""
    from attrpatch.graph import EdgeGraph

    w = weights(tiny)
    index = EdgeGraph.of(w).index()
    exact = run_method("edge_activation", tiny, ioi,
                       MethodConfig(directions=("noise",), per_prompt=True, per_position=False)).edges[0]
    assert exact.axes == ("prompt", "src", "dst")
    edges = index.valid.nonzero()[torch.randperm(index.n_edges, generator=torch.Generator().manual_seed(3))[:8]]
    circuits = index.valid[None].repeat(len(edges) + 1, 1, 1)
    circuits[torch.arange(1, len(edges) + 1), edges[:, 0], edges[:, 1]] = False  # circuit 0: the full graph
    m = circuit_metric(w, index, circuits, ioi)
    torch.testing.assert_close(m[1:] - m[0], exact.scores[:, edges[:, 0], edges[:, 1]].T, atol=2e-4, rtol=1e-3)
