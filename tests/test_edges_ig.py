"""EAP-IG: what is exactly checkable.

* m = 1: the only step is α = 1, the patch input itself, so EAP-IG(denoise) is Δ(clean − corrupted) times the
  gradient on the clean run, i.e. −EAP(noise), to rounding.
* The right Riemann sum converges: embed's every reader is a target, so Σ_dst score(embed → dst) =
  Δembed · mean_k ∂metric/∂embed(α_k) → metric(patch) − metric(run) (IG completeness), error O(1/m).
* Steps stacked along the batch equal the same steps run one pass at a time and a literal loop of m passes.
"""

from __future__ import annotations

import torch

from attrpatch import make_batch
from attrpatch.engine import forward, run_with_acts, weights
from attrpatch.graph import EdgeGraph
from attrpatch.methods import method_config, run_method
from attrpatch.methods.core import edge_scores
from attrpatch.methods.eap_ig import eap_ig_scores
from attrpatch.testing import rel_close


def _metric(logits, batch):
    rows = torch.arange(len(batch))
    return logits[rows, batch.answer_ids] - logits[rows, batch.wrong_ids]


def test_one_step_is_eap_on_the_patch_input(tiny64, tokenizer):
    batch = make_batch("ioi", tokenizer, n_prompts=3, seed=6)
    w = weights(tiny64)
    ig = eap_ig_scores(w, batch, ("denoise", "noise"), steps=1, per_prompt=True, per_position=True)
    eap = edge_scores(w, batch, directions=("denoise", "noise"), per_prompt=True, per_position=True)
    rel_close(ig["denoise"], -eap["noise"], rtol=1e-9)
    rel_close(ig["noise"], -eap["denoise"], rtol=1e-9)


def test_riemann_sum_converges_to_the_metric_change(tiny64, tokenizer):
    batch = make_batch("ioi", tokenizer, n_prompts=3, seed=0)
    w = weights(tiny64)
    with torch.no_grad():
        change = _metric(forward(w, batch.clean_tokens, batch.answer_pos), batch) - \
            _metric(forward(w, batch.corrupt_tokens, batch.answer_pos), batch)
    errors = []
    for steps in (4, 16, 64):
        ig = eap_ig_scores(w, batch, ("denoise",), steps=steps, per_prompt=True, per_position=False)["denoise"]
        errors.append(float((ig[:, 0].sum(-1) - change).abs().max()))  # source 0 is embed
    assert 0.2 < errors[1] / errors[0] < 0.3 and 0.2 < errors[2] / errors[1] < 0.3  # O(1/m)
    assert errors[2] < 0.01 * float(change.abs().max())


def literal_ig(w, batch, steps):
    """m separate passes, each with its own embedding interpolation and an autograd.grad per target site."""
    graph = EdgeGraph.of(w)
    kinds = ("resid_pre", "head_out", "mlp_out")
    _, a_run = run_with_acts(w, batch.corrupt_tokens, batch.answer_pos, kinds)
    _, a_patch = run_with_acts(w, batch.clean_tokens, batch.answer_pos, kinds)
    deltas = [a_patch[("resid_pre", 0)] - a_run[("resid_pre", 0)]]
    for layer in range(graph.n_layers):
        dz = a_patch[("head_out", layer)] - a_run[("head_out", layer)]
        deltas += [dz[:, :, h] @ w.W_O_heads(layer)[h] for h in range(graph.n_heads)]
        deltas.append(a_patch[("mlp_out", layer)] - a_run[("mlp_out", layer)])
    e_patch = w.W_E[batch.clean_tokens]
    grads = {}
    for k in range(1, steps + 1):
        acts = {}

        def edit(kind, layer, x, k=k, acts=acts):
            if kind == "embed":
                x = (x + k / steps * (e_patch - x)).detach().requires_grad_(True)
            if kind in ("head_q_in", "head_k_in", "head_v_in"):
                x = x.view_as(x)
            if kind in ("head_q_in", "head_k_in", "head_v_in", "mlp_in", "logits"):
                acts[(kind, layer)] = x
            return x

        with torch.enable_grad():
            m = _metric(forward(w, batch.corrupt_tokens, batch.answer_pos, edit, split=True), batch).sum()
            gs = torch.autograd.grad(m, list(acts.values()))
        for key, g in zip(acts, gs, strict=True):
            grads[key] = grads.get(key, 0) + g / steps
    out = torch.zeros(graph.n_src, graph.n_dst, dtype=w.W_E.dtype)
    for d, node in enumerate(graph.dst):
        site = {"head_q": "head_q_in", "head_k": "head_k_in", "head_v": "head_v_in"}.get(node.component, node.component)
        g = grads[(site, node.layer)]
        g = g if node.head is None else g[:, :, node.head]
        for s in range(graph.n_src):
            if graph.valid[s, d]:
                out[s, d] = (deltas[s] * g).sum() / len(batch)
    return out


def test_steps_in_the_batch_equal_separate_passes(tiny64, tokenizer):
    batch = make_batch("ioi", tokenizer, n_prompts=3, seed=9)
    w = weights(tiny64)
    stacked = eap_ig_scores(w, batch, ("denoise",), steps=5, per_prompt=False, per_position=False)["denoise"]
    one_per_pass = eap_ig_scores(w, batch, ("denoise",), steps=5, per_prompt=False, per_position=False,
                                 max_rows=len(batch))["denoise"]
    uneven = eap_ig_scores(w, batch, ("denoise",), steps=5, per_prompt=False, per_position=False,
                           max_rows=2 * len(batch))["denoise"]  # passes of 2, 2 and 1 steps
    reference = literal_ig(w, batch, 5)
    rel_close(stacked, reference, rtol=1e-9)
    rel_close(one_per_pass, reference, rtol=1e-9)
    rel_close(uneven, reference, rtol=1e-9)


def test_eap_ig_method(tiny, tokenizer):
    batch = make_batch("pronoun", tokenizer, n_prompts=2)
    res = run_method("eap_ig", tiny, batch, method_config("eap_ig", ig_steps=3, per_position=False))
    graph = EdgeGraph.of(weights(tiny))
    (e,) = res.edges
    assert e.direction == "denoise" and e.axes == ("prompt", "src", "dst") and e.index.n_edges == graph.n_edges
    assert e.scores[:, ~graph.valid].abs().sum() == 0 and e.scores[:, graph.valid].abs().sum() > 0
