"""Attention attribution and direct logit attribution on two random GPT-2 shapes.

* attention attribution equals a literal per-cell reference built on the bridge's pattern hooks and its
  backward, and its first-order meaning holds (scaling a head's pattern by 1−ε changes the metric by
  −ε·Σ scores, to second order);
* DLA: the components plus the bias terms add up to the bridge's own logit difference; the heads of a
  layer add up to its attn_out; each head equals a literal computation from the bridge's cache
  (``hook_z``, ``W_O``, ``ln_final.hook_scale``).
"""

from __future__ import annotations

import pytest
import torch

from attrpatch import make_batch
from attrpatch.components import hook_name
from attrpatch.engine import forward, weights
from attrpatch.methods import MethodConfig, MethodError, method_config, run_method
from attrpatch.methods.attention_attribution import attention_scores
from attrpatch.methods.dla import DLA_KINDS, dla_constant, dla_scores
from attrpatch.metrics import final_logit_diff
from attrpatch.scores import node_table
from attrpatch.testing import grad_through


@pytest.fixture(scope="module")
def batch(tokenizer):
    b = make_batch("ioi", tokenizer, n_prompts=4, seed=1)
    assert len(set(b.answer_pos.tolist())) > 1, "the test batch must mix prompt lengths (padding)"
    return b


def _bridge_metric(logits, batch, i):
    ap = int(batch.answer_pos[i])
    return logits[0, ap, int(batch.answer_ids[i])] - logits[0, ap, int(batch.wrong_ids[i])]


# ----------------------------------------------------------------------------- attention attribution

def test_attention_attribution_matches_slow_bridge_reference(tiny, batch):
    w = weights(tiny)
    fast = attention_scores(w, batch)
    names = [hook_name("head_pattern", layer) for layer in range(w.n_layers)]
    for i in range(len(batch)):
        n = int(batch.lengths[i])
        live, grads = {}, {}
        fwd = [(nm, lambda t, hook, nm=nm, live=live: live.__setitem__(nm, t)) for nm in names]
        bwd = [(nm, lambda g, hook, nm=nm, grads=grads: grads.__setitem__(nm, g.detach().clone())) for nm in names]
        with grad_through(tiny), tiny.bridge.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
            metric = _bridge_metric(tiny.bridge(batch.clean_tokens[i:i + 1, :n]), batch, i)
            returned = torch.autograd.grad(metric, [live[nm] for nm in names])
        for nm, g in zip(names, returned, strict=True):
            grads.setdefault(nm, g)
        for layer, nm in enumerate(names):
            for h in range(w.n_heads):
                for q in range(n):
                    for k in range(q + 1):
                        want = float(live[nm][0, h, q, k].detach() * grads[nm][0, h, q, k])
                        assert float(fast[i, layer, h, q, k]) == pytest.approx(want, rel=1e-3, abs=1e-6)
        assert torch.all(fast[i, :, :, n:] == 0)  # padding never scores
    assert fast.abs().max() > 1e-3


def test_attention_attribution_is_first_order_effect_of_scaling_a_pattern(tiny, batch):
    """Scale one head's pattern by (1−ε): the metric moves by −ε·Σ_cells score + O(ε²)."""
    w = weights(tiny)
    scores = attention_scores(w, batch)
    eps = 1e-2
    with torch.no_grad():
        base = final_logit_diff(forward(w, batch.clean_tokens, batch.answer_pos), batch)
        for layer in range(w.n_layers):
            for h in range(w.n_heads):
                def edit(kind, lay, x, layer=layer, h=h):
                    if (kind, lay) != ("head_pattern", layer):
                        return x
                    x = x.clone()
                    x[:, h] *= 1 - eps
                    return x
                effect = final_logit_diff(forward(w, batch.clean_tokens, batch.answer_pos, edit), batch) - base
                predicted = -eps * scores[:, layer, h].sum((-1, -2))
                torch.testing.assert_close(effect, predicted, rtol=0.05, atol=1e-3 * eps * float(scores.abs().max()))


def test_attention_attribution_method(tiny, batch):
    full = run_method("attention_attribution", tiny, batch, MethodConfig())
    (ns,) = full.nodes
    assert (ns.component, ns.direction, ns.axes) == ("head_pattern", "clean", ("prompt", "layer", "head", "pos", "src_pos"))
    torch.testing.assert_close(ns.scores, attention_scores(weights(tiny), batch))
    (mean,) = run_method("attention_attribution", tiny, batch, MethodConfig(per_prompt=False)).nodes
    torch.testing.assert_close(mean.scores, ns.scores.mean(0))
    (summed,) = run_method("attention_attribution", tiny, batch, MethodConfig(per_position=False)).nodes
    assert summed.axes == ("prompt", "layer", "head")
    torch.testing.assert_close(summed.scores, ns.scores.sum((-1, -2)))
    w = weights(tiny)
    lengths = batch.lengths
    assert node_table(ns, batch).num_rows == int((lengths * (lengths + 1) // 2).sum()) * w.n_layers * w.n_heads
    with pytest.raises(MethodError, match="head_pattern"):
        run_method("attention_attribution", tiny, batch, MethodConfig(kinds=("head_out",)))


# ----------------------------------------------------------------------------- direct logit attribution

def test_dla_adds_up_to_the_bridge_logit_difference(tiny, batch):
    """Σ components + β·u + Δb_U = logit diff: exact because ln_final's scale is frozen and its
    mean-centering is linear (the components are centred along with the sum)."""
    w = weights(tiny)
    s = {k: v for k, (v, _) in dla_scores(w, batch).items()}
    total = s["embed"] + s["pos_embed"] + s["attn_out"].sum(1) + s["mlp_out"].sum(1) + dla_constant(w, batch)
    with torch.no_grad():
        logits = tiny.bridge(batch.clean_tokens)
    rows = torch.arange(len(batch))
    final = logits[rows, batch.answer_pos]
    want = final[rows, batch.answer_ids] - final[rows, batch.wrong_ids]
    torch.testing.assert_close(total, want, rtol=1e-4, atol=1e-4)
    assert want.abs().max() > 1e-2
    # The heads of a layer plus its output bias make its attn_out score.
    with torch.no_grad():
        _, cache = tiny.bridge.run_with_cache(batch.clean_tokens)
    final_resid = cache[hook_name("logits", w.n_layers)][rows, batch.answer_pos]
    sigma = (final_resid.var(-1, unbiased=False) + w.eps).sqrt()
    u = (w.W_U[:, batch.answer_ids] - w.W_U[:, batch.wrong_ids]).T * w.lnf_w
    v = (u - u.mean(-1, keepdim=True)) / sigma[:, None]
    b_O = torch.stack([lyr.b_O for lyr in w.layers])
    torch.testing.assert_close(s["head_out"].sum(2) + (b_O @ v.T).T, s["attn_out"], rtol=1e-4, atol=1e-5)


def test_dla_matches_literal_bridge_reference(tiny, batch):
    """Each head, layer output and embedding from the bridge's cache, one prompt and component at a time:
    LN-final applied with the cached scale (centre, ×γ, ÷ hook_scale), dotted with W_U[:,a] − W_U[:,b]."""
    w = weights(tiny)
    bridge = tiny.bridge
    fast = {k: v for k, (v, _) in dla_scores(w, batch).items()}
    gamma = bridge.ln_final.original_component.weight
    for i in range(len(batch)):
        n, ap = int(batch.lengths[i]), int(batch.answer_pos[i])
        with torch.no_grad():
            _, cache = bridge.run_with_cache(batch.clean_tokens[i:i + 1, :n])
        scale = cache["ln_final.hook_scale"][0, ap]
        u = bridge.W_U[:, int(batch.answer_ids[i])] - bridge.W_U[:, int(batch.wrong_ids[i])]

        def dla(c, scale=scale, u=u):
            return float(((c - c.mean()) * gamma / scale * u).sum())

        for kind in ("embed", "pos_embed"):
            assert float(fast[kind][i]) == pytest.approx(dla(cache[hook_name(kind)][0, ap]), rel=1e-4, abs=1e-5)
        for layer in range(w.n_layers):
            for kind in ("attn_out", "mlp_out"):
                want = dla(cache[hook_name(kind, layer)][0, ap])
                assert float(fast[kind][i, layer]) == pytest.approx(want, rel=1e-4, abs=1e-5)
            z = cache[hook_name("head_out", layer)][0, ap]
            for h in range(w.n_heads):
                want = dla(z[h] @ bridge.W_O[layer, h])
                assert float(fast["head_out"][i, layer, h]) == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_dla_method(tiny, batch):
    res = run_method("dla", tiny, batch, MethodConfig(directions=("denoise", "noise")))
    assert [(n.component, n.direction, n.axes) for n in res.nodes] == [
        ("embed", "clean", ("prompt",)), ("pos_embed", "clean", ("prompt",)),
        ("attn_out", "clean", ("prompt", "layer")), ("mlp_out", "clean", ("prompt", "layer")),
        ("head_out", "clean", ("prompt", "layer", "head"))]
    mean = run_method("dla", tiny, batch, MethodConfig(per_prompt=False, kinds=("head_out", "embed")))
    assert [n.component for n in mean.nodes] == ["embed", "head_out"]
    torch.testing.assert_close(mean.nodes[1].scores, res.nodes[-1].scores.mean(0))
    w = weights(tiny)
    table = node_table(res.nodes[-1], batch)
    assert table.num_rows == len(batch) * w.n_layers * w.n_heads
    assert table.column("pos").null_count == table.num_rows
    with pytest.raises(MethodError, match=str(list(DLA_KINDS)).replace("[", r"\[").replace("]", r"\]")):
        run_method("dla", tiny, batch, MethodConfig(kinds=("head_q",)))
    with pytest.raises(MethodError, match=r"takes no option \['pos'\]"):
        method_config("dla", pos=3)
