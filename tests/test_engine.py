"""The functional engine computes what the bridge computes: logits and every activation, on two shapes."""

import pytest
import torch

from attrpatch import make_batch
from attrpatch.components import NODE_KINDS, hook_name
from attrpatch.engine import forward, run_with_acts, weights


def _bridge_cache(model, tokens):
    with torch.no_grad():
        return model.bridge.run_with_cache(tokens)


def test_engine_logits_match_bridge(tiny, tokenizer):
    batch = make_batch("ioi", tokenizer, n_prompts=6, seed=3)
    logits, _ = _bridge_cache(tiny, batch.clean_tokens)
    w = weights(tiny)
    with torch.no_grad():
        ours = forward(w, batch.clean_tokens, batch.answer_pos)
    rows = torch.arange(len(batch))
    torch.testing.assert_close(ours, logits[rows, batch.answer_pos], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("split", [False, True])
def test_engine_activations_match_bridge(tiny, tokenizer, split):
    batch = make_batch("pronoun", tokenizer, n_prompts=3)
    _, cache = _bridge_cache(tiny, batch.clean_tokens)
    w = weights(tiny)
    with torch.no_grad():
        _, acts = run_with_acts(w, batch.clean_tokens, batch.answer_pos, split=split)
    checked = 0
    for (kind, layer), x in acts.items():
        if kind not in NODE_KINDS and kind != "logits":
            continue
        ref = cache[hook_name(kind, layer)]
        torch.testing.assert_close(x, ref.expand_as(x), atol=1e-4, rtol=1e-4, msg=f"{kind} {layer}")
        checked += 1
    assert checked == 3 + w.n_layers * (len(NODE_KINDS) - 2)


def test_split_inputs_are_per_head(tiny, tokenizer):
    """Gradient w.r.t. one head's q input differs from another's: the split really separates targets."""
    batch = make_batch("ioi", tokenizer, n_prompts=2)
    w = weights(tiny)
    logits, acts = run_with_acts(w, batch.clean_tokens, batch.answer_pos, kinds=("head_q_in",), split=True,
                                 edit=lambda k, layer, x: x.requires_grad_(True) if k == "embed" else x)
    (g,) = torch.autograd.grad(logits[:, 0].sum(), [acts[("head_q_in", w.n_layers - 1)]])
    assert g.shape[2] == w.n_heads
    assert not torch.allclose(g[:, :, 0], g[:, :, 1])
