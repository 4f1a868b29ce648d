"""The logit lens (``logit_lens``) against the bridge's own cache, ln_final and unembedding, on two random shapes.

* own scale: ``bridge.ln_final(cache[resid])`` · (W_U[:, answer] − W_U[:, wrong]) + b_U terms, every prompt,
  layer and kind; final scale: the same with the cached ``ln_final.hook_scale`` (the Demo's
  ``apply_ln_to_stack(layer=-1)``), which is also the running sum of DLA scores;
* the last ``resid_post`` is the model's own logit difference; the method's rows and views.
"""

from __future__ import annotations

import pytest
import torch

from attrpatch import make_batch
from attrpatch.components import RESID_KINDS, hook_name
from attrpatch.engine import weights
from attrpatch.methods import MethodConfig, method_config, run_method
from attrpatch.methods.dla import dla_constant, dla_scores
from attrpatch.methods.logit_lens import logit_lens_scores
from attrpatch.scores import node_table
from attrpatch.testing import bridge_metric


@pytest.fixture(scope="module")
def batch(tokenizer):
    b = make_batch("ioi", tokenizer, n_prompts=4, seed=1)
    assert len(set(b.answer_pos.tolist())) > 1, "the test batch must mix prompt lengths (padding)"
    return b


def bridge_lens(model, batch, scale):
    """{kind: [prompt layer]} from the bridge: run_with_cache per prompt (unpadded), its ln_final (own scale)
    or its cached final scale, W_U and b_U; and the bridge's logit difference per prompt."""
    br = model.bridge
    n_layers = weights(model).n_layers
    out = {k: torch.zeros(len(batch), n_layers, dtype=torch.float64) for k in RESID_KINDS}
    model_ld = torch.zeros(len(batch), dtype=torch.float64)
    for i in range(len(batch)):
        n, ap = int(batch.lengths[i]), int(batch.answer_pos[i])
        a, wr = int(batch.answer_ids[i]), int(batch.wrong_ids[i])
        with torch.no_grad():
            logits, cache = br.run_with_cache(batch.clean_tokens[i:i + 1, :n])
            model_ld[i] = float(bridge_metric(logits, batch, i))
            for kind in RESID_KINDS:
                for layer in range(n_layers):
                    r = cache[hook_name(kind, layer)][0, ap]
                    if scale == "own":
                        normed = br.ln_final(r)
                    else:
                        centred = r - r.mean()
                        normed = centred / cache["ln_final.hook_scale"][0, ap] * br.ln_final.weight + br.ln_final.bias
                    out[kind][i, layer] = float(normed @ (br.W_U[:, a] - br.W_U[:, wr]) + br.b_U[a] - br.b_U[wr])
    return out, model_ld


@pytest.mark.parametrize("scale", ["own", "final"])
def test_logit_lens_matches_bridge(tiny64, batch, scale):
    ours = logit_lens_scores(weights(tiny64), batch, RESID_KINDS, scale)
    ref, model_ld = bridge_lens(tiny64, batch, scale)
    for kind in RESID_KINDS:
        scores, axes = ours[kind]
        assert axes == ("prompt", "layer")
        torch.testing.assert_close(scores, ref[kind], rtol=1e-9, atol=1e-9, msg=kind)
    torch.testing.assert_close(ours["resid_post"][0][:, -1], model_ld, rtol=1e-9, atol=1e-9)  # the model itself
    torch.testing.assert_close(ours["resid_pre"][0][:, 1:], ours["resid_post"][0][:, :-1])  # same stream
    if scale == "own":  # the lens is not linear: earlier layers differ from the final-scale reading
        final = logit_lens_scores(weights(tiny64), batch, ("resid_mid",), "final")["resid_mid"][0]
        assert (final - scores).abs().max() > 1e-3


def test_final_scale_is_running_dla(tiny64, batch):
    """With the final scale the lens is linear in the residual, so resid_post[L] reads the DLA of everything
    written up to layer L plus the constant β·u + b_U terms."""
    w = weights(tiny64)
    lens = logit_lens_scores(w, batch, ("resid_post",), "final")["resid_post"][0]
    dla = {k: s for k, (s, _) in dla_scores(w, batch).items()}
    running = (dla["embed"] + dla["pos_embed"])[:, None] + (dla["attn_out"] + dla["mlp_out"]).cumsum(1)
    torch.testing.assert_close(lens, running + dla_constant(w, batch)[:, None], rtol=1e-9, atol=1e-9)


def test_method_rows_and_views(tiny, batch):
    res = run_method("logit_lens", tiny, batch, MethodConfig(directions=("noise",)))
    assert [(n.component, n.direction, n.axes) for n in res.nodes] == [
        (k, "clean", ("prompt", "layer")) for k in RESID_KINDS]
    w = weights(tiny)
    table = node_table(res.nodes[0], batch)
    assert table.num_rows == len(batch) * w.n_layers and table.column("pos").null_count == table.num_rows
    mean = run_method("logit_lens", tiny, batch, method_config("logit_lens", kinds=["resid_mid"], per_prompt=False,
                                                               scale="final"))
    assert [n.component for n in mean.nodes] == ["resid_mid"]
    torch.testing.assert_close(mean.nodes[0].scores, logit_lens_scores(w, batch, ("resid_mid",), "final")[
        "resid_mid"][0].mean(0))
