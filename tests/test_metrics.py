"""The metrics: the logit difference at each prompt's own answer position, its normalised form, and the
id-based form for stacked copies (``engine.forward(diff=…)`` must agree with all of them)."""

from __future__ import annotations

import torch

from attrpatch import make_batch
from attrpatch.engine import forward, weights
from attrpatch.metrics import final_logit_diff, ids_logit_diff, logit_diff, normalise


def test_padding_never_reaches_the_metric(tiny, tokenizer):
    """Each prompt's metric is the same alone as in a right-padded batch of mixed lengths."""
    batch = make_batch("ioi", tokenizer, n_prompts=8, seed=2)
    assert len(set(batch.lengths.tolist())) > 1
    w = weights(tiny)
    with torch.no_grad():
        together = forward(w, batch.clean_tokens, batch.answer_pos)
        for n in range(len(batch)):
            one = batch.select([n])
            alone = forward(w, one.clean_tokens, one.answer_pos)
            torch.testing.assert_close(together[n], alone[0], atol=1e-4, rtol=1e-4)


def test_logit_diff_and_normalise(tiny, tokenizer):
    batch = make_batch("ioi_seed8", tokenizer, n_prompts=8)
    with torch.no_grad():
        logits = tiny.bridge(batch.clean_tokens)
    ld = logit_diff(logits, batch)
    n = 3
    pos = int(batch.answer_pos[n])
    expected = logits[n, pos, batch.answer_ids[n]] - logits[n, pos, batch.wrong_ids[n]]
    torch.testing.assert_close(ld[n], expected)
    corrupt = logit_diff(tiny.bridge(batch.corrupt_tokens), batch).detach()
    torch.testing.assert_close(normalise(ld, ld, corrupt), torch.ones_like(ld))
    torch.testing.assert_close(normalise(corrupt, ld, corrupt), torch.zeros_like(ld))


def test_stacked_copies_repeat_the_answers(tiny, tokenizer):
    batch = make_batch("ioi", tokenizer, n_prompts=3, seed=4)
    w = weights(tiny)
    with torch.no_grad():
        logits = forward(w, batch.clean_tokens, batch.answer_pos)
        copies = forward(w, batch.clean_tokens.repeat(2, 1), batch.answer_pos.repeat(2))
    one = final_logit_diff(logits, batch)
    torch.testing.assert_close(ids_logit_diff(copies, batch.answer_ids, batch.wrong_ids), one.repeat(2))
    torch.testing.assert_close(one, logits.gather(1, batch.answer_ids[:, None])[:, 0]
                               - logits.gather(1, batch.wrong_ids[:, None])[:, 0])
