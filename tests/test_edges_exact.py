"""Exact edge patching: equal to a slow literal loop (one edge per full forward), the limit of which EAP is
the linearisation (error of a shrinking patch falls linearly), and the edge subset it patches on large models."""

from __future__ import annotations

import math

import pytest
import torch

from attrpatch import make_batch
from attrpatch.engine import forward, run_with_acts, weights
from attrpatch.graph import EdgeGraph
from attrpatch.methods import MethodConfig, MethodError, method_config, run_method
from attrpatch.methods.core import edge_scores
from attrpatch.methods.edge_activation import choose_edges, exact_edge_scores
from attrpatch.scores import edge_table
from attrpatch.testing import rel_close


def _metric(logits, batch):
    rows = torch.arange(len(batch))
    return logits[rows, batch.answer_ids] - logits[rows, batch.wrong_ids]


@torch.no_grad()
def slow_edge_patch(w, batch, direction, cells):
    """The literal reference: for each (src, dst, pos | None) one full forward from the tokens, adding the
    source's change to the target's input only. Returns [len(cells), batch]."""
    graph = EdgeGraph.of(w)
    run, patch = (batch.corrupt_tokens, batch.clean_tokens) if direction == "denoise" else \
        (batch.clean_tokens, batch.corrupt_tokens)
    kinds = ("resid_pre", "head_out", "mlp_out")
    base_logits, a_run = run_with_acts(w, run, batch.answer_pos, kinds)
    _, a_patch = run_with_acts(w, patch, batch.answer_pos, kinds)
    base = _metric(base_logits, batch)

    def change(node):
        if node.component == "embed":
            return a_patch[("resid_pre", 0)] - a_run[("resid_pre", 0)]
        if node.component == "mlp_out":
            return a_patch[("mlp_out", node.layer)] - a_run[("mlp_out", node.layer)]
        dz = a_patch[("head_out", node.layer)] - a_run[("head_out", node.layer)]
        return dz[:, :, node.head] @ w.W_O_heads(node.layer)[node.head]

    out = []
    for s, d, pos in cells:
        src, dst = graph.src[s], graph.dst[d]
        delta = change(src)
        if pos is not None:
            only = torch.zeros_like(delta)
            only[:, pos] = delta[:, pos]
            delta = only
        site = {"head_q": "head_q_in", "head_k": "head_k_in", "head_v": "head_v_in"}.get(dst.component, dst.component)

        def edit(kind, layer, x, site=site, dst=dst, delta=delta):
            if kind != site or layer != dst.layer:
                return x
            x = x.clone()
            if dst.head is None:
                return x + delta
            x[:, :, dst.head] += delta
            return x

        out.append(_metric(forward(w, run, batch.answer_pos, edit, split=True), batch) - base)
    return torch.stack(out)


def test_exact_equals_slow_loop_every_edge(tiny, tokenizer, direction="denoise"):
    batch = make_batch("ioi", tokenizer, n_prompts=3, seed=11)
    w = weights(tiny)
    graph = EdgeGraph.of(w)
    # max_rows=7: two copies per forward, so the stacking and chunking are exercised
    fast = exact_edge_scores(w, batch, direction, per_prompt=True, per_position=False, max_rows=7)
    src, dst = graph.valid.nonzero(as_tuple=True)
    ref = slow_edge_patch(w, batch, direction, [(int(s), int(d), None) for s, d in zip(src, dst, strict=True)])
    torch.testing.assert_close(fast[:, src, dst], ref.T, rtol=1e-4, atol=1e-5)
    assert fast[:, ~graph.valid].abs().sum() == 0


def test_exact_per_position_equals_slow_loop(tiny, tokenizer):
    batch = make_batch("ioi", tokenizer, n_prompts=2, seed=4)
    w = weights(tiny)
    graph = EdgeGraph.of(w)
    fast = exact_edge_scores(w, batch, "noise", per_prompt=True, per_position=True)
    gen = torch.Generator().manual_seed(0)
    src, dst = graph.valid.nonzero(as_tuple=True)
    pick = torch.randperm(len(src), generator=gen)[:25]
    pos = torch.randint(0, batch.n_pos, (25,), generator=gen)
    cells = [(int(src[i]), int(dst[i]), int(p)) for i, p in zip(pick, pos, strict=True)]
    ref = slow_edge_patch(w, batch, "noise", cells)
    got = torch.stack([fast[:, p, s, d] for s, d, p in cells])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # patching one position at a time is not additive in general, but positions past a prompt's end do nothing
    lengths = batch.lengths.tolist()
    assert min(lengths) < batch.n_pos
    for i, length in enumerate(lengths):  # rounding only: the restart and the full run batch differently
        assert fast[i, length:].abs().sum() <= 1e-6 * fast[i, length:].numel()


def test_eap_is_the_linear_limit_of_exact_edge_patching(tiny64, tokenizer):
    """Patch a_run + ε·Δ: exact(ε)/ε − EAP = O(ε), so the relative error falls linearly with ε."""
    batch = make_batch("ioi", tokenizer, n_prompts=3, seed=0)
    w = weights(tiny64)
    eap = edge_scores(w, batch, directions=("denoise",), per_prompt=True, per_position=False)["denoise"]

    def rel_err(eps):
        exact = exact_edge_scores(w, batch, "denoise", per_prompt=True, per_position=False, delta_scale=eps)
        return float((exact / eps - eap).abs().max() / eap.abs().max())

    e1, e2, e3 = rel_err(4e-2), rel_err(1e-2), rel_err(2.5e-3)
    assert 0.2 < e2 / e1 < 0.3 and 0.2 < e3 / e2 < 0.3  # linear in ε
    assert e3 < 2e-3
    rel_close(exact_edge_scores(w, batch, "denoise", per_prompt=True, per_position=False, delta_scale=1e-5) / 1e-5,
              eap, rtol=1e-5)


def test_edge_subset_top_half_and_random_half(tiny, tokenizer):
    batch = make_batch("ioi", tokenizer, n_prompts=3, seed=3)
    w = weights(tiny)
    graph = EdgeGraph.of(w)
    keep = choose_edges(w, batch, "denoise", 0.2, seed=0, max_rows=256)
    n_keep = math.ceil(0.2 * graph.n_edges)
    assert int(keep.sum()) == n_keep and not (keep & ~graph.valid).any()
    eap = edge_scores(w, batch, directions=("denoise",), per_prompt=False, per_position=False)["denoise"].abs()
    top = eap[graph.valid].sort(descending=True).values[(n_keep + 1) // 2 - 1]
    assert (keep & (eap > top)).sum() == (eap[graph.valid] > top).sum()  # every top edge is kept
    other = choose_edges(w, batch, "denoise", 0.2, seed=1, max_rows=256)
    assert not torch.equal(keep, other) and torch.equal(keep & (eap >= top), other & (eap >= top))
    assert torch.equal(choose_edges(w, batch, "denoise", None, 0, 256), graph.valid)

    sub = exact_edge_scores(w, batch, "denoise", keep, per_prompt=False, per_position=False)
    full = exact_edge_scores(w, batch, "denoise", per_prompt=False, per_position=False)
    torch.testing.assert_close(sub[keep], full[keep], rtol=1e-5, atol=1e-6)
    assert sub[~keep].abs().sum() == 0


def test_edge_activation_method(tiny, tokenizer):
    batch = make_batch("pronoun", tokenizer, n_prompts=3)
    cfg = method_config("edge_activation", directions=("denoise", "noise"), per_position=False, edge_subset=0.1, seed=2)
    res = run_method("edge_activation", tiny, batch, cfg)
    graph = EdgeGraph.of(weights(tiny))
    n_keep = math.ceil(0.1 * graph.n_edges)
    for e in res.edges:
        assert e.axes == ("prompt", "src", "dst") and e.index.n_edges == n_keep
        assert edge_table(e, batch).num_rows == n_keep * len(batch)
    with pytest.raises(MethodError, match="max_rows=2 is smaller than the batch"):
        run_method("edge_activation", tiny, batch, MethodConfig(max_rows=2))
