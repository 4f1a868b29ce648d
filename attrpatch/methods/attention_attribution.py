"""Attention attribution: clean-run gradient × attention pattern, per prompt, layer, head, dest and src position.

    python -c "from attrpatch import load_model, make_batch; from attrpatch.methods import run_method; m = load_model('ioi-tiny'); r = run_method('attention_attribution', m, make_batch('ioi', m.tokenizer, 8)); print(r.nodes[0].axes, tuple(r.nodes[0].scores.shape))"

Algorithm (the "attention attribution" of the nnsight attribution-patching tutorial and of Nanda's
Attribution Patching Demo, after Hao et al. 2021, "Self-Attention Attribution"):

1. Forward the clean prompt through ``attrpatch.engine`` with autograd on, keeping every layer's
   attention pattern ``A[b, h, q, k]`` (the token and position embeddings are leaves so the graph exists).
2. One backward: ``g = ∂metric/∂A`` for every layer at once (``torch.autograd.grad`` of the summed
   per-prompt logit difference; prompts do not interact, so each prompt gets its own gradient).
3. Score every pattern cell with one elementwise product over all layers:

       score[b, l, h, q, k] = A[b, l, h, q, k] · ∂metric/∂A[b, l, h, q, k]

   i.e. AtP towards a zero pattern, with a minus sign: the first-order effect of *removing* the cell
   is −score. No corrupted prompt is used.
4. Views (``core.views``): ``per_position=False`` sums dest and src positions; ``per_prompt=False``
   averages prompts.

Scores are written with component ``head_pattern`` and direction label ``"clean"`` (neither ``denoise``
nor ``noise``: there is no patch), so they sit beside AtP's ``head_pattern`` scores in the dataset
without being mistaken for them. ``cfg.directions`` is not used.
"""

from __future__ import annotations

import torch
from einops import einsum
from jaxtyping import Float
from torch import Tensor

from attrpatch.engine import Recorder, Weights, forward, weights
from attrpatch.methods import MethodConfig, register, register_cost
from attrpatch.methods.core import (
    Cost,
    Work,
    activation_bytes,
    as_scores,
    forward_flops,
    node_rows,
    views,
    wide,
)
from attrpatch.metrics import final_logit_diff
from attrpatch.models import LoadedModel
from attrpatch.scores import MethodResult, NodeScores
from attrpatch.tasks import PromptBatch

DIRECTION = "clean"  # no patch direction: the gradient and the pattern both come from the clean run
AXES = ("prompt", "layer", "head", "pos", "src_pos")


def attention_scores(w: Weights, batch: PromptBatch, metric=final_logit_diff,
                     ) -> Float[Tensor, "prompt layer head pos src_pos"]:
    """Steps 1–3 on any engine weights: pattern × gradient, per prompt and cell (in ``core.acc_dtype``)."""
    sites = Recorder(("head_pattern",), leaves=True)
    with torch.enable_grad():  # step 1
        logits = forward(w, batch.clean_tokens.to(w.device), batch.answer_pos, sites)
        keys = [("head_pattern", layer) for layer in range(w.n_layers)]
        grads = torch.autograd.grad(metric(logits, batch).sum(), [sites.acts[k] for k in keys])  # step 2
    with torch.no_grad():  # step 3
        spec = "layer prompt head pos src_pos, layer prompt head pos src_pos -> prompt layer head pos src_pos"
        return einsum(wide(sites.stack("head_pattern")), wide(torch.stack(grads)), spec)


@register("attention_attribution", produces="nodes", kinds=("head_pattern",), directions=(DIRECTION,))
def attention_attribution(model: LoadedModel, batch: PromptBatch, cfg: MethodConfig) -> MethodResult:
    """Attention attribution: clean-run gradient × attention pattern (component head_pattern, direction "clean")."""
    s, axes = views(attention_scores(weights(model), batch), AXES, cfg.per_prompt, cfg.per_position)  # step 4
    return MethodResult(nodes=[NodeScores("head_pattern", DIRECTION, as_scores(s), axes)])


@register_cost("attention_attribution")
def attention_attribution_cost(w: Work, cfg: MethodConfig) -> Cost:
    S = w.shape
    rows = node_rows(w, cfg.per_prompt, cfg.per_position, S.n_layers * S.n_heads, pattern=True)
    fixed = w.n * activation_bytes(S, w.P, w.dtype_bytes, True) + 3 * w.dtype_bytes * w.n * S.n_layers * S.n_heads * w.P ** 2
    return Cost({"nodes": rows}, forward_rows=3 * w.n, flops=3 * forward_flops(S, w.n, w.P), fixed_bytes=fixed,
                peak_bytes=fixed)
