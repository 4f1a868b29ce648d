"""The one engine computes what the bridge computes, in every mode: logits and every activation (plain and
split), a restart at layer L, a start at position p0 with cached keys and values, the last block at the answer
position only, and the logit-difference readout. Device-parametrised (cpu, and cuda when present)."""

import pytest
import torch

from attrpatch import make_batch
from attrpatch.components import NODE_KINDS, hook_name
from attrpatch.engine import Recorder, Start, cache_kv, forward, run_with_acts, weights
from attrpatch.metrics import final_logit_diff


def _bridge_cache(model, tokens):
    with torch.no_grad():
        return model.bridge.run_with_cache(tokens)


@pytest.fixture(scope="module")
def batch(tokenizer):
    b = make_batch("ioi", tokenizer, n_prompts=6, seed=3)
    assert len(set(b.answer_pos.tolist())) > 1  # prompts of different lengths: padding is exercised
    return b


def test_engine_logits_match_bridge(on_device, batch):
    logits, _ = _bridge_cache(on_device, batch.clean_tokens.to(weights(on_device).device))
    w = weights(on_device)
    with torch.no_grad():
        ours = forward(w, batch.clean_tokens.to(w.device), batch.answer_pos)
    rows = torch.arange(len(batch))
    torch.testing.assert_close(ours.cpu(), logits[rows, batch.answer_pos].cpu(), atol=1e-4, rtol=1e-4)


def test_engine_holds_no_copy_of_the_weights(tiny):
    """The engine reads the Hugging Face model's own parameter storage: no second copy of the weights."""
    w = weights(tiny)
    hf = tiny.bridge.original_model
    storages = {p.untyped_storage().data_ptr() for p in hf.parameters()}
    assert w.layers[0].W_qkv.untyped_storage().data_ptr() in storages
    assert w.W_U.untyped_storage().data_ptr() == w.W_E.untyped_storage().data_ptr()  # tied unembedding
    unique = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in hf.parameters()}
    made = w.b_U.untyped_storage().nbytes()  # GPT-2 has no unembedding bias: the engine makes the zeros
    assert w.param_bytes() == sum(unique.values()) + made


@pytest.mark.parametrize("split", [False, True])
def test_engine_activations_match_bridge(on_device, tokenizer, split):
    batch = make_batch("pronoun", tokenizer, n_prompts=3)
    w = weights(on_device)
    _, cache = _bridge_cache(on_device, batch.clean_tokens.to(w.device))
    with torch.no_grad():
        _, acts = run_with_acts(w, batch.clean_tokens.to(w.device), batch.answer_pos, split=split)
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


def test_diff_readout_equals_logit_difference(on_device, batch):
    w = weights(on_device)
    with torch.no_grad():
        logits = forward(w, batch.clean_tokens.to(w.device), batch.answer_pos)
        diff = forward(w, batch.clean_tokens.to(w.device), batch.answer_pos, diff=(batch.answer_ids, batch.wrong_ids))
        # k stacked copies of the batch, copy-major
        diff3 = forward(w, batch.clean_tokens.repeat(3, 1).to(w.device), batch.answer_pos.repeat(3),
                        diff=(batch.answer_ids, batch.wrong_ids))
    torch.testing.assert_close(diff, final_logit_diff(logits, batch), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(diff3, diff.repeat(3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("answer_only", [False, True])
def test_restart_at_every_layer_and_position(on_device, batch, answer_only):
    """Start(layer L, positions p0 …, cached keys/values) reproduces the full forward's logit difference
    for every L and every p0 up to the shortest prompt's answer, with and without the answer-only last block."""
    w = weights(on_device)
    ids = (batch.answer_ids, batch.wrong_ids)
    tokens = batch.clean_tokens.to(w.device)
    with torch.no_grad():
        rec = Recorder(("resid_pre", "head_k", "head_v"))
        full = forward(w, tokens, batch.answer_pos, rec, diff=ids)
        kv, resid = cache_kv(rec.acts, w.n_layers), rec.stack("resid_pre")
        checked = 0
        for layer in range(w.n_layers):
            for p0 in range(int(batch.answer_pos.min()) + 1):
                start = Start(layer, resid[layer][:, p0:], p0, kv)
                got = forward(w, None, batch.answer_pos, start=start, answer_only=answer_only, diff=ids)
                torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4, msg=f"layer {layer} p0 {p0}")
                checked += 1
    assert checked == w.n_layers * (int(batch.answer_pos.min()) + 1)


def test_restart_rows_read_their_own_prompt(tiny, batch):
    """Rows are any mix of prompts: row r reads prompt[r]'s cache."""
    w = weights(tiny)
    ids = (batch.answer_ids, batch.wrong_ids)
    with torch.no_grad():
        rec = Recorder(("resid_pre", "head_k", "head_v"))
        full = forward(w, batch.clean_tokens, batch.answer_pos, rec, diff=ids)
        kv, resid = cache_kv(rec.acts, w.n_layers), rec.stack("resid_pre")
        prompt = torch.tensor([4, 0, 4, 2])
        p0 = 3
        start = Start(1, resid[1][prompt, p0:], p0, kv, prompt)
        got = forward(w, None, batch.answer_pos[prompt], start=start, answer_only=True,
                      diff=(batch.answer_ids[prompt], batch.wrong_ids[prompt]))
    torch.testing.assert_close(got, full[prompt], atol=1e-4, rtol=1e-4)


def test_answer_only_edit_sees_one_position(tiny, batch):
    """In the answer-only last block an edit sees the query-side sites at one position per row; an edit at
    the last block's attention output patches exactly what the full forward patches at the answer position."""
    w = weights(tiny)
    last = w.n_layers - 1
    ids = (batch.answer_ids, batch.wrong_ids)
    rows = torch.arange(len(batch))
    seen = {}

    def bump(kind, layer, x):
        if layer == last and kind in ("head_q", "attn_out", "mlp_out"):
            seen[kind] = tuple(x.shape)
        if kind == "attn_out" and layer == last:
            x = x + 0.5
        return x

    def bump_full(kind, layer, x):
        if kind == "attn_out" and layer == last:
            x = x.clone()
            x[rows, batch.answer_pos] += 0.5
        return x

    with torch.no_grad():
        rec = Recorder(("resid_pre",))
        forward(w, batch.clean_tokens, batch.answer_pos, rec)
        start = Start(last - 1, rec.stack("resid_pre")[last - 1])
        got = forward(w, None, batch.answer_pos, bump, start=start, answer_only=True, diff=ids)
        ref = forward(w, batch.clean_tokens, batch.answer_pos, bump_full, diff=ids)
    assert seen["head_q"][1] == 1 and seen["attn_out"][1] == 1 and seen["mlp_out"][1] == 1
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
