"""Task metrics, per prompt: the logit difference and its normalised form.

    python -c "import attrpatch.metrics as m; help(m.logit_diff)"
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from attrpatch.tasks import PromptBatch


def answer_logits(logits: Float[Tensor, "batch pos vocab"], batch: PromptBatch) -> Float[Tensor, "batch vocab"]:
    """The logits at each prompt's own answer position (so padding after it never matters)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    pos = batch.answer_pos.to(logits.device)
    if logits.shape[0] != len(batch):  # a batch of patched copies: prompts repeat along the batch axis
        pos = pos.repeat(logits.shape[0] // len(batch))
    return logits[rows, pos]


def logit_diff(logits: Float[Tensor, "batch pos vocab"], batch: PromptBatch) -> Float[Tensor, " batch"]:
    """logit(answer) − logit(wrong answer) at the answer position, one value per prompt (full logits,
    e.g. the bridge's output; k stacked copies of the batch allowed, copy-major)."""
    return final_logit_diff(answer_logits(logits, batch), batch)


def final_logit_diff(logits: Float[Tensor, "rows vocab"], batch: PromptBatch) -> Float[Tensor, " rows"]:
    """logit(answer) − logit(wrong answer) for logits already at the answer position (``engine.forward``).

    ``logits`` may hold k patched copies of the batch stacked along the rows (k·batch rows, copy-major);
    the answers repeat accordingly.
    """
    return ids_logit_diff(logits, batch.answer_ids, batch.wrong_ids)


def ids_logit_diff(logits: Float[Tensor, "rows vocab"], answer_ids: Int[Tensor, " batch"],
                   wrong_ids: Int[Tensor, " batch"]) -> Float[Tensor, " rows"]:
    """``final_logit_diff`` from the answer and wrong token ids (k·batch rows, copy-major, allowed)."""
    reps = logits.shape[0] // answer_ids.shape[0]
    ans = answer_ids.to(logits.device).repeat(reps)[:, None]
    wrong = wrong_ids.to(logits.device).repeat(reps)[:, None]
    return (logits.gather(1, ans) - logits.gather(1, wrong))[:, 0]


def normalise(metric: Tensor, clean: Tensor, corrupt: Tensor) -> Tensor:
    """(m − corrupt) / (clean − corrupt): 1 at the clean baseline, 0 at the corrupted one (per prompt)."""
    return (metric - corrupt) / (clean - corrupt)

