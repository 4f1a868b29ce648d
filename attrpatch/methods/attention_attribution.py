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
4. Views as in ``attribution``: ``per_position=False`` sums dest and src positions; ``per_prompt=False``
   averages prompts.

Scores are written with component ``head_pattern`` and direction label ``"clean"`` (neither ``denoise``
nor ``noise``: there is no patch), so they sit beside AtP's ``head_pattern`` scores in the dataset
without being mistaken for them. ``cfg.directions`` is not used.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from attrpatch.engine import Weights, forward, weights
from attrpatch.methods import MethodConfig, register
from attrpatch.methods.attribution import (
    Metric,
    SiteRecorder,
    check_kinds,
    check_no_extra,
    stack_sites,
    views,
)
from attrpatch.metrics import final_logit_diff
from attrpatch.models import LoadedModel
from attrpatch.scores import MethodResult, NodeScores
from attrpatch.tasks import PromptBatch

DIRECTION = "clean"  # no patch direction: the gradient and the pattern both come from the clean run
AXES = ("prompt", "layer", "head", "pos", "src_pos")


def attention_scores(w: Weights, batch: PromptBatch, metric: Metric = final_logit_diff,
                     ) -> Float[Tensor, "prompt layer head pos src_pos"]:
    """Steps 1–3 on any engine weights: pattern × gradient, per prompt and cell."""
    sites = SiteRecorder(("head_pattern",), grad=True)
    with torch.enable_grad():  # step 1
        logits = forward(w, batch.clean_tokens.to(w.device), batch.answer_pos.to(w.device), sites)
        keys = [("head_pattern", layer) for layer in range(w.n_layers)]
        grads = torch.autograd.grad(metric(logits, batch).sum(), [sites.acts[k] for k in keys])  # step 2
    with torch.no_grad():  # step 3
        pattern = stack_sites(sites.acts, "head_pattern", w.n_layers)
        g = torch.stack(grads)
        return torch.einsum("lbhqk,lbhqk->blhqk", pattern, g)


@register("attention_attribution", produces="nodes")
def attention_attribution(model: LoadedModel, batch: PromptBatch, cfg: MethodConfig) -> MethodResult:
    """Attention attribution: clean-run gradient × attention pattern (component head_pattern, direction "clean")."""
    check_kinds(cfg.kinds, ("head_pattern",), "attention_attribution")
    check_no_extra(cfg, "attention_attribution")
    s, axes = views(attention_scores(weights(model), batch), AXES, cfg.per_prompt, cfg.per_position)  # step 4
    return MethodResult(nodes=[NodeScores("head_pattern", DIRECTION, s.float().cpu(), axes)])
