"""AtP* (``atp_star``) on two random GPT-2 shapes.

* the QK fix against a literal reference: per prompt, layer, head and position, the pattern recomputed from
  the bridge's own q and k with one query (or key) replaced, dotted with the bridge's ∂metric/∂pattern;
* exactness where it must be exact: on a model where everything after the last layer's attention pattern is
  linear in it, the QK-fixed head_q / head_k scores equal single-node activation patching to float precision
  (plain AtP does not);
* GradDrop against a literal loop of L forward+backward passes, each with one block's write stop-gradiented
  in the forward, combined by Eq. (11);
* every other kind is AtP's; the views; a one-layer model refuses GradDrop.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from test_attribution import (
    PATCH,
    RUN,
    _acts,
    _bridge_acts_and_grads,
    _double,
    _linear_variant,
    _node_patch_effects,
    _tokens,
)

from attrpatch import make_batch
from attrpatch.components import hook_name
from attrpatch.engine import Recorder, forward, random_weights, weights
from attrpatch.methods import MethodConfig, MethodError, method_config, run_method
from attrpatch.methods.atp_star import atp_star_scores, qk_fix
from attrpatch.methods.core import ATP_KINDS, atp_scores
from attrpatch.metrics import final_logit_diff
from attrpatch.models import ModelShape


@pytest.fixture(scope="module")
def batch(tokenizer):
    b = make_batch("ioi", tokenizer, n_prompts=4, seed=1)
    assert len(set(b.answer_pos.tolist())) > 1, "the test batch must mix prompt lengths (padding)"
    return b


# ----------------------------------------------------------------------------- the QK fix, literally

def _pattern(q, k):
    """softmax(q kᵀ / √d) with the causal mask, for one prompt's [pos head d_head] tensors → [head dest src]."""
    n = q.shape[0]
    s = torch.einsum("thd,shd->hts", q, k) / math.sqrt(q.shape[-1])
    return s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf).softmax(-1)


def slow_qk_fix(model, batch, direction):
    """Per prompt (unpadded), layer, head and position: Σ G · (pattern with one q (k) replaced − pattern)."""
    w = weights(model)
    names = [hook_name(k, layer) for layer in range(w.n_layers) for k in ("head_q", "head_k", "head_pattern")]
    out = {}
    for i in range(len(batch)):
        n = int(batch.lengths[i])
        ap, a, wr = int(batch.answer_pos[i]), int(batch.answer_ids[i]), int(batch.wrong_ids[i])
        run_acts, run_grads = _bridge_acts_and_grads(model.bridge, _tokens(batch, RUN[direction])[i:i + 1, :n],
                                                     ap, a, wr, names)
        with torch.no_grad():
            _, cache = model.bridge.run_with_cache(_tokens(batch, PATCH[direction])[i:i + 1, :n])
        for layer in range(w.n_layers):
            q, k = (run_acts[hook_name(x, layer)][0].double() for x in ("head_q", "head_k"))
            q_p, k_p = (cache[hook_name(x, layer)][0].double() for x in ("head_q", "head_k"))
            G = run_grads[hook_name("head_pattern", layer)][0].double()
            A = _pattern(q, k)
            for h in range(w.n_heads):
                for p in range(n):
                    q2 = q.clone()
                    q2[p, h] = q_p[p, h]
                    out[("head_q", i, layer, h, p)] = float((G[h] * (_pattern(q2, k)[h] - A[h])).sum())
                    k2 = k.clone()
                    k2[p, h] = k_p[p, h]
                    out[("head_k", i, layer, h, p)] = float((G[h] * (_pattern(q, k2)[h] - A[h])).sum())
    return out


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_qk_fix_matches_literal_reference(tiny, batch, direction):
    fast = atp_star_scores(weights(tiny), batch, ("head_q", "head_k"), (direction,))
    slow = slow_qk_fix(tiny, batch, direction)
    got = torch.tensor([float(fast[(direction, kind)][0][i, layer, h, p]) for kind, i, layer, h, p in slow])
    want = torch.tensor(list(slow.values()))
    assert want.abs().max() > 1e-3  # not trivially zero (smallest seen: 9e-3, tiny-a noise)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))
    for kind in ("head_q", "head_k"):  # padding scores exactly zero
        s = fast[(direction, kind)][0]
        for i in range(len(batch)):
            assert torch.all(s[i, ..., int(batch.lengths[i]):] == 0)


def test_qk_fix_closed_form_in_saturation():
    """The key fix's O(T²) closed form equals recomputing every patched row (O(T³)) also where rows are
    saturated (scores ~100 apart: the run's pattern is exactly one-hot in float64 for many rows)."""
    gen = torch.Generator().manual_seed(0)
    N, T, H, E = 2, 9, 3, 4
    q, k, q_p, k_p = (torch.randn(N, T, H, E, generator=gen, dtype=torch.float64) * 8 for _ in range(4))
    G = torch.randn(N, H, T, T, generator=gen, dtype=torch.float64)
    q_fix, k_fix = qk_fix(q, k, q_p, k_p, G)
    for n in range(N):
        A = _pattern(q[n], k[n])
        assert (A.max(-1).values == 1).any(), "some rows must be saturated"
        for p in range(T):
            k2 = k[n].clone()
            k2[p] = k_p[n, p]
            q2 = q[n].clone()
            q2[p] = q_p[n, p]
            torch.testing.assert_close(k_fix[n, :, p], (G[n] * (_pattern(q[n], k2) - A)).sum((-1, -2)),
                                       rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(q_fix[n, :, p], (G[n] * (_pattern(q2, k[n]) - A)).sum((-1, -2)),
                                       rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- exact where linear after the pattern

@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_qk_fix_equals_activation_patching_where_linear_after_pattern(tiny, batch, direction):
    """Last layer, LayerNorm scales frozen, last MLP constant: the metric is linear in that layer's pattern, so
    the QK fix (exact pattern, then first order) is exact; plain AtP (first order through the softmax) is not."""
    w, batch = _double(weights(tiny), batch)
    last = w.n_layers - 1
    variant = _linear_variant(w, batch)
    star = atp_star_scores(variant, batch, ("head_q", "head_k"), (direction,))
    plain = atp_scores(variant, batch, ("head_q", "head_k"), (direction,))
    run, patch = _acts(variant, batch, RUN[direction]), _acts(variant, batch, PATCH[direction])
    for kind in ("head_q", "head_k"):
        exact = _node_patch_effects(variant, batch, direction, kind, run, patch)  # [prompt head pos]
        assert exact.abs().max() > 1e-6, kind  # far above float64 noise (smallest seen: 2e-4)
        rel = {name: float((s[(direction, kind)][0][:, last] - exact).abs().max() / exact.abs().max())
               for name, s in (("star", star), ("plain", plain))}
        assert rel["star"] < 1e-10, (kind, rel)  # measured 5e-14 to 6e-13
        assert rel["plain"] > 1e-3, (kind, rel)  # AtP through the softmax: 1e-2 to 9e-2


# ----------------------------------------------------------------------------- GradDrop, literally

def _dropped_run(w, batch, direction, layer, sites):
    """The run forward with block ``layer``'s write (resid_post − resid_pre) stop-gradiented, and the
    gradient of Σ metric at every recorded site: a literal GradDrop pass."""
    pre = {}

    def drop(kind, lay, x):
        if lay == layer and kind == "resid_pre":
            pre["x"] = x
        if lay == layer and kind == "resid_post":
            x = pre["x"] + (x - pre["x"]).detach()
        return x

    rec = Recorder(sites, inner=drop, leaves=True)
    logits = forward(w, _tokens(batch, RUN[direction]), batch.answer_pos, rec)
    keys = list(rec.acts)
    grads = torch.autograd.grad(final_logit_diff(logits, batch).sum(), [rec.acts[k] for k in keys], allow_unused=True)
    return {k: (torch.zeros_like(rec.acts[k]) if g is None else g) for k, g in zip(keys, grads, strict=True)}, rec.acts


def slow_grad_drop(w, batch, direction, per_position):
    """(1/(L−1)) Σ_ℓ |AtP*_ℓ| per prompt, with AtP*_ℓ from the ℓ-dropped pass (kinds × literal contractions)."""
    sites = ATP_KINDS
    with torch.no_grad():
        patch = Recorder(sites)
        forward(w, _tokens(batch, PATCH[direction]), batch.answer_pos, patch)
    total = {}
    for layer in range(w.n_layers):
        g, run = _dropped_run(w, batch, direction, layer, sites)
        with torch.no_grad():
            for (kind, lay), a_run in run.items():
                delta = patch.acts[(kind, lay)] - a_run
                if kind == "head_pattern":
                    s = g[(kind, lay)] * delta  # [prompt head dest src]: a cell is a scalar
                elif kind in ("head_q", "head_k"):
                    q_fix, k_fix = qk_fix(run[("head_q", lay)], run[("head_k", lay)], patch.acts[("head_q", lay)],
                                          patch.acts[("head_k", lay)], g[("head_pattern", lay)])
                    s = q_fix if kind == "head_q" else k_fix  # [prompt head pos]
                elif kind in ("head_out", "head_v"):
                    s = (g[(kind, lay)] * delta).sum(-1).permute(0, 2, 1)  # [prompt head pos]
                else:
                    s = (g[(kind, lay)] * delta).sum(-1)  # [prompt pos]
                if not per_position:
                    s = s.sum(-1) if kind != "head_pattern" else s.sum((-1, -2))
                total[(kind, lay)] = total.get((kind, lay), 0) + s.abs()
    return {key: v / (w.n_layers - 1) for key, v in total.items()}


@pytest.mark.parametrize("per_position", [True, False])
def test_grad_drop_matches_literal_loop(tiny, batch, per_position):
    w, batch = _double(weights(tiny), batch)  # float64: the comparison measures the algorithm
    direction = "denoise" if per_position else "noise"
    fast = atp_star_scores(w, batch, ATP_KINDS, (direction,), grad_drop=True, per_position=per_position)
    slow = slow_grad_drop(w, batch, direction, per_position)
    for (kind, lay), want in slow.items():
        got, axes = fast[(direction, kind)]
        got = got if "layer" not in axes else got[:, lay]
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max() + 1), msg=kind)
    assert slow[("head_out", 0)].abs().max() > 1e-3
    # A node of the last layer has no block after it to cancel through: only its own term is 0, so its
    # score is |AtP*| · (L − 1)/(L − 1) — the reason for the 1/(L − 1).
    plain = atp_star_scores(w, batch, ("head_v",), (direction,), per_position=per_position)[(direction, "head_v")][0]
    torch.testing.assert_close(fast[(direction, "head_v")][0][:, -1], plain[:, -1].abs(), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- the method

def test_other_kinds_are_atp_and_views(tiny, batch):
    both = ("denoise", "noise")
    star = run_method("atp_star", tiny, batch, MethodConfig(directions=both))
    atp = {(n.direction, n.component): n for n in run_method("attribution", tiny, batch, MethodConfig(directions=both)).nodes}
    assert {(n.direction, n.component) for n in star.nodes} == set(atp)
    for n in star.nodes:
        assert n.axes == atp[(n.direction, n.component)].axes
        if n.component not in ("head_q", "head_k"):
            torch.testing.assert_close(n.scores, atp[(n.direction, n.component)].scores, rtol=1e-6, atol=1e-7)
        else:
            assert not torch.allclose(n.scores, atp[(n.direction, n.component)].scores)
    by = {(n.direction, n.component): n.scores for n in star.nodes}
    mean = run_method("atp_star", tiny, batch, MethodConfig(kinds=("head_k",), per_prompt=False))
    summed = run_method("atp_star", tiny, batch, MethodConfig(kinds=("head_q",), per_position=False))
    torch.testing.assert_close(mean.nodes[0].scores, by[("denoise", "head_k")].mean(0))
    torch.testing.assert_close(summed.nodes[0].scores, by[("denoise", "head_q")].sum(-1))
    assert summed.nodes[0].axes == ("prompt", "layer", "head")
    gd = run_method("atp_star", tiny, batch, method_config("atp_star", grad_drop=True, kinds=["head_k", "embed"]))
    assert [n.component for n in gd.nodes] == ["embed", "head_k"] and all((n.scores >= 0).all() for n in gd.nodes)


def test_grad_drop_needs_two_layers(batch):
    shape = ModelShape(n_layers=1, n_heads=2, d_model=16, d_mlp=64, vocab=50257, n_ctx=64)
    w = random_weights(shape)
    atp_star_scores(w, batch, ("head_q",))  # the QK fix alone is fine
    with pytest.raises(MethodError, match="at least 2 layers"):
        atp_star_scores(w, batch, ("head_q",), grad_drop=True)
    with pytest.raises(MethodError, match="grad_drop"):
        method_config("atp_star", grad_drops=True)
    assert dataclasses.asdict(method_config("atp_star").options) == {"grad_drop": False}


def test_bfloat16_tracks_float32(tokenizer):
    """The QK fix and GradDrop reduce in float32 under bfloat16 weights: scores track the float32 model's."""
    from attrpatch import load_model

    pair = load_model("ioi-tiny"), load_model("ioi-tiny", dtype="bfloat16")
    batch = make_batch("ioi", tokenizer, n_prompts=6, seed=11)
    for grad_drop in (False, True):
        cfg = method_config("atp_star", kinds=["head_q", "head_k", "head_out"], grad_drop=grad_drop)
        full, half = (run_method("atp_star", m, batch, cfg) for m in pair)
        for a, b in zip(full.nodes, half.nodes, strict=True):
            assert b.scores.dtype == torch.float32
            x, y = a.scores.flatten().double(), b.scores.flatten().double()
            assert torch.corrcoef(torch.stack([x, y]))[0, 1] > 0.999, (a.component, grad_drop)  # measured ≥ 0.9999
