"""RelP (``relp``, ``edge_relp``) and the engine's LRP rules, on two random GPT-2 shapes.

* forward values are unchanged under every rule set (engine logits and every site bit-identical);
* RelP equals a literal reference: a per-prompt GPT-2 forward written here with the rules as the authors'
  code writes them (σ.detach(), ``zp * (GELU(x)/zp).detach()``, ``softmax(·).detach()``), its autograd
  gradients dotted with (a_patch − a_run) site by site;
* conservation, where the rules promise it: biases zeroed and every rule on, Σ resid · ĝ is the metric at
  every layer (and at the embeddings); the plain gradient does not conserve;
* edge RelP sums to node RelP over each source's targets; the method's options and kinds.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from test_attribution import PATCH, RUN, _tokens

from attrpatch import engine, make_batch
from attrpatch.engine import LRP_RULES, Recorder, check_rules, forward, weights
from attrpatch.graph import EdgeGraph
from attrpatch.methods import MethodConfig, MethodError, method_config, run_method
from attrpatch.methods.core import ATP_KINDS, atp_scores
from attrpatch.methods.relp import PAPER_RULES, edge_relp_scores, relp_scores
from attrpatch.metrics import final_logit_diff
from attrpatch.testing import rel_close

RULE_SETS = [(), ("ln",), ("gelu",), ("ah",), ("ln", "gelu"), ("ln", "gelu", "ah")]


@pytest.fixture(scope="module")
def batch(tokenizer):
    b = make_batch("ioi", tokenizer, n_prompts=4, seed=1)
    assert len(set(b.answer_pos.tolist())) > 1, "the test batch must mix prompt lengths (padding)"
    return b


# ----------------------------------------------------------------------------- forward values unchanged

def test_rules_leave_forward_values_unchanged(tiny, batch):
    w = weights(tiny)
    plain = Recorder(None)
    base = forward(w, batch.clean_tokens, batch.answer_pos, plain)
    ids = (batch.answer_ids, batch.wrong_ids)
    base_split = forward(w, batch.clean_tokens, batch.answer_pos, split=True, diff=ids)
    for rules in RULE_SETS[1:]:
        rec = Recorder(None, leaves=True)
        out = forward(w, batch.clean_tokens, batch.answer_pos, rec, rules=frozenset(rules))
        assert torch.equal(out, base), rules
        assert all(torch.equal(rec.acts[k], v) for k, v in plain.acts.items()), rules
        assert torch.equal(forward(w, batch.clean_tokens, batch.answer_pos, split=True, diff=ids, rules=rules),
                           base_split), rules
    with pytest.raises(ValueError, match="unknown LRP rule"):
        check_rules({"ln", "eps"})
    assert set(PAPER_RULES) == set(LRP_RULES)


# ----------------------------------------------------------------------------- a literal reference

def _ln(x, g, b, eps, rule):
    xc = x - x.mean(-1, keepdim=True)
    sigma = (xc.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return xc / (sigma.detach() if rule else sigma) * g + b


def reference_run(w, tokens, ap, a, wr, rules, grad=True):
    """One prompt (unpadded tokens) through a GPT-2 written out here, the rules as the authors' code writes
    them. Returns the logit difference and every site ``(kind, layer) →`` its tensor (the engine's, less the
    prompt axis)."""
    sites = {}

    def rec(kind, layer, x):
        sites[(kind, layer)] = x
        return x

    T, H, E = len(tokens), w.n_heads, w.d_head
    tok = rec("embed", 0, w.W_E[tokens].clone().requires_grad_(grad))
    x = tok + rec("pos_embed", 0, w.W_pos[:T].clone().requires_grad_(grad))
    approx = "tanh" if w.act == "gelu_new" else "none"
    for L, lyr in enumerate(w.layers):
        x = rec("resid_pre", L, x)
        q, k, v = (_ln(x, lyr.ln1_w, lyr.ln1_b, w.eps, "ln" in rules) @ lyr.W_qkv + lyr.b_qkv).view(T, 3, H, E).unbind(1)
        q, k, v = rec("head_q", L, q), rec("head_k", L, k), rec("head_v", L, v)
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(E)
        pattern = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf).softmax(-1)
        if "ah" in rules:
            pattern = pattern.detach().requires_grad_(grad)
        pattern = rec("head_pattern", L, pattern)
        z = rec("head_out", L, torch.einsum("hts,shd->thd", pattern, v))
        mid = rec("resid_mid", L, x + rec("attn_out", L, z.reshape(T, H * E) @ lyr.W_O + lyr.b_O))
        pre = _ln(mid, lyr.ln2_w, lyr.ln2_b, w.eps, "ln" in rules) @ lyr.W_in + lyr.b_in
        act = F.gelu(pre, approximate=approx)
        if "gelu" in rules:  # the authors' ModifiedAct: zp * (act / zp).data, zp = stabilize(pre)
            zp = pre + ((pre == 0).to(pre) + pre.sign()) * 1e-6
            act = zp * (act / zp).detach()
        x = rec("resid_post", L, mid + rec("mlp_out", L, act @ lyr.W_out + lyr.b_out))
    final = _ln(x[ap], w.lnf_w, w.lnf_b, w.eps, "ln" in rules)
    ld = final @ (w.W_U[:, a] - w.W_U[:, wr]) + w.b_U[a] - w.b_U[wr]
    return ld, sites


def slow_relp(w, batch, direction, rules):
    """Per prompt: Σ_d ĝ · (a_patch − a_run) at every site, ĝ from the reference's autograd."""
    out = {}
    for i in range(len(batch)):
        n = int(batch.lengths[i])
        args = (int(batch.answer_pos[i]), int(batch.answer_ids[i]), int(batch.wrong_ids[i]), rules)
        ld, run = reference_run(w, _tokens(batch, RUN[direction])[i, :n], *args)
        keys = list(run)
        grads = torch.autograd.grad(ld, [run[k] for k in keys], allow_unused=True)
        with torch.no_grad():
            _, patch = reference_run(w, _tokens(batch, PATCH[direction])[i, :n], *args, grad=False)
            for key, g in zip(keys, grads, strict=True):
                delta = patch[key] - run[key]
                g = torch.zeros_like(delta) if g is None else g
                out[(i, *key)] = g * delta if key[0] == "head_pattern" else (g * delta).sum(-1)
    return out


@pytest.mark.parametrize("rules", [("ln", "gelu", "ah"), ("ln",), ("gelu",)])
def test_relp_matches_literal_reference(tiny64, batch, rules):
    w = weights(tiny64)
    direction = "denoise" if rules != ("ln",) else "noise"
    fast = relp_scores(w, batch, ATP_KINDS, (direction,), rules)
    slow = slow_relp(w, batch, direction, rules)
    scale = max(float(v.abs().max()) for v in slow.values())
    assert scale > 1e-3
    for (i, kind, layer), want in slow.items():
        got, axes = fast[(direction, kind)]
        got = got[i] if "layer" not in axes else got[i, layer]
        n = int(batch.lengths[i])
        # want: [pos], [pos head] or [head dest src]
        if kind == "head_pattern":
            got = got[:, :n, :n]
        else:
            got = got[..., :n]
            want = want.T if want.dim() == 2 else want  # [head pos]
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9 * scale, msg=f"{kind} {layer} {rules}")
    if "ah" in rules:  # no relevance reaches queries and keys
        assert all(torch.all(fast[(direction, k)][0] == 0) for k in ("head_q", "head_k"))


def test_reference_is_the_model(tiny64, batch):
    """The reference forward (rules off) computes the engine's logit difference: it is a GPT-2."""
    w = weights(tiny64)
    want = final_logit_diff(forward(w, batch.clean_tokens, batch.answer_pos), batch)
    for i in range(len(batch)):
        n = int(batch.lengths[i])
        ld, _ = reference_run(w, batch.clean_tokens[i, :n], int(batch.answer_pos[i]), int(batch.answer_ids[i]),
                              int(batch.wrong_ids[i]), (), grad=False)
        assert float(ld) == pytest.approx(float(want[i]), rel=1e-10, abs=1e-10)


# ----------------------------------------------------------------------------- conservation

def _zero_biases(w):
    z = torch.zeros_like
    layers = tuple(dataclasses.replace(lyr, ln1_b=z(lyr.ln1_b), b_qkv=z(lyr.b_qkv), b_O=z(lyr.b_O), ln2_b=z(lyr.ln2_b),
                                       b_in=z(lyr.b_in), b_out=z(lyr.b_out)) for lyr in w.layers)
    return dataclasses.replace(w, layers=layers, lnf_b=z(w.lnf_b), b_U=z(w.b_U))


def _relevance(w, batch, rules):
    """Per prompt: the metric, and Σ_{pos,d} a · ĝ at every residual site and at the embeddings."""
    rec = Recorder(("embed", "pos_embed", "resid_pre", "resid_mid", "resid_post"), leaves=True)
    metric = final_logit_diff(forward(w, batch.clean_tokens, batch.answer_pos, rec, rules=rules), batch)
    keys = list(rec.acts)
    grads = torch.autograd.grad(metric.sum(), [rec.acts[k] for k in keys])
    rel = {k: (rec.acts[k] * g).sum((-1, -2)).detach() for k, g in zip(keys, grads, strict=True)}
    rel["input"] = rel.pop(("embed", 0)) + rel.pop(("pos_embed", 0))
    return metric.detach(), rel


def test_conservation_with_every_rule(tiny64, batch, monkeypatch):
    """Biases zeroed: with σ, the patterns and the GELU ratios frozen the network is linear in each residual
    stream, and the modified backward is that network's gradient, so Σ resid · ĝ = metric at every layer —
    exactly once the GELU stabiliser is negligible, and to its size (1e-6 absolute per unit) with the authors'."""
    w = _zero_biases(weights(tiny64))
    metric, rel = _relevance(w, batch, frozenset(PAPER_RULES))
    assert metric.abs().min() > 1e-2
    for key, r in rel.items():
        torch.testing.assert_close(r, metric, rtol=1e-4, atol=0, msg=str(key))  # measured ≤ 1.3e-5
    monkeypatch.setattr(engine, "GELU_STABILISER", 1e-30)
    _, exact = _relevance(w, batch, frozenset(PAPER_RULES))
    for key, r in exact.items():
        torch.testing.assert_close(r, metric, rtol=1e-12, atol=0, msg=str(key))
    # The plain gradient is not conservative: LayerNorm is scale-invariant, so Σ x · ∂/∂x of it is 0.
    _, plain = _relevance(w, batch, frozenset())
    assert max(float(((r - metric) / metric).abs().max()) for r in plain.values()) > 0.5


# ----------------------------------------------------------------------------- edges, the method

def test_edge_relp_sums_to_node_relp(tiny64, batch):
    """Σ_dst RelP(src → dst) = node RelP of src, per prompt and position: the residual additions are
    untouched by the rules, so the target coefficients of a source's readers sum to its own."""
    w = weights(tiny64)
    graph = EdgeGraph.of(w)
    edges = edge_relp_scores(w, batch, ("denoise",))["denoise"].sum(-1)  # [prompt pos src]
    node = relp_scores(w, batch, ("embed", "head_out", "mlp_out"), ("denoise",))
    for i, src in enumerate(graph.src):
        ref = node[("denoise", src.component)][0]
        ref = ref if src.component == "embed" else ref[:, src.layer]  # [prompt pos] or [prompt head pos]
        ref = ref[:, src.head] if src.head is not None else ref
        rel_close(edges[..., i], ref, rtol=1e-9)
    q_or_k = [j for j, dst in enumerate(graph.dst) if dst.component in ("head_q", "head_k")]
    assert torch.all(edge_relp_scores(w, batch)["denoise"][..., q_or_k] == 0)  # the AH-rule


def test_method_options_and_kinds(tiny, batch):
    paper = run_method("relp", tiny, batch, MethodConfig(kinds=("mlp_out", "head_q")))
    assert [n.component for n in paper.nodes] == ["mlp_out", "head_q"] and torch.all(paper.nodes[1].scores == 0)
    none = run_method("relp", tiny, batch, method_config("relp", rules=[], directions=["noise"]))
    atp = run_method("attribution", tiny, batch, MethodConfig(directions=("noise",)))
    for a, b in zip(none.nodes, atp.nodes, strict=True):  # no rule: AtP
        assert a.component == b.component and torch.equal(a.scores, b.scores)
    ln_only = atp_scores(weights(tiny), batch, ("mlp_out",), rules=frozenset({"ln"}))[("denoise", "mlp_out")][0]
    torch.testing.assert_close(run_method("relp", tiny, batch, method_config("relp", rules=["ln"], kinds=["mlp_out"],
                                                                            per_prompt=False)).nodes[0].scores,
                               ln_only.mean(0))
    with pytest.raises(MethodError, match="rules"):
        method_config("relp", rules=["ln", "epsilon"])
    edges = run_method("edge_relp", tiny, batch, method_config("edge_relp", per_position=False))
    assert edges.edges[0].axes == ("prompt", "src", "dst")


def test_bfloat16_tracks_float32(tokenizer):
    """The rules' backward under bfloat16 weights (the GELU ratio in float32): scores track float32's."""
    from attrpatch import load_model

    pair = load_model("ioi-tiny"), load_model("ioi-tiny", dtype="bfloat16")
    batch = make_batch("ioi", tokenizer, n_prompts=6, seed=11)
    cfg = method_config("relp", kinds=["resid_pre", "mlp_out", "head_out", "head_pattern"])
    full, half = (run_method("relp", m, batch, cfg) for m in pair)
    for a, b in zip(full.nodes, half.nodes, strict=True):
        assert b.scores.dtype == torch.float32
        x, y = a.scores.flatten().double(), b.scores.flatten().double()
        assert torch.corrcoef(torch.stack([x, y]))[0, 1] > 0.999, a.component  # measured ≥ 0.9999
