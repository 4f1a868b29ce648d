"""The logit lens: the answer-vs-wrong logit difference read off the residual stream at every layer.

    python -c "from attrpatch import load_model, make_batch; from attrpatch.methods import run_method; m = load_model('ioi-tiny'); r = run_method('logit_lens', m, make_batch('ioi', m.tokenizer, 8)); print([(n.component, n.axes, tuple(n.scores.shape)) for n in r.nodes])"

Algorithm (the "Logit Lens" section of Nanda's Exploratory Analysis Demo, accumulated residual with
``incl_mid=True``; nostalgebraist 2020, "interpreting GPT: the logit lens"):

1. Forward the clean prompt through ``attrpatch.engine`` (no gradient) and keep, at each prompt's answer
   position, the residual stream ``resid_pre``, ``resid_mid`` and ``resid_post`` of every layer and the
   final residual stream ``x_final`` (the input of ``ln_final``).
2. Put each residual ``r`` through ``ln_final`` as if it were the last one:

       own scale (default):  LN(r) = γ ⊙ (r − mean r) / sqrt(var r + eps) + β
       final scale:          LN(r) = γ ⊙ (r − mean r) / sqrt(var x_final + eps) + β

   ``"own"`` is the model's ``ln_final`` applied to ``r`` (the logit lens proper: what the model would
   say if it stopped here); ``"final"`` divides by the final residual's scale, as the Demo's
   ``cache.apply_ln_to_stack(layer=-1)`` does — linear in ``r``, so it is the sum of DLA of the components
   written so far.
3. Read the logit difference through the unembedding, per prompt, layer and kind:

       lens(r) = LN(r) · (W_U[:, answer] − W_U[:, wrong]) + b_U[answer] − b_U[wrong]

   The Demo, on a model with LayerNorm folded, leaves out the constant ``β·u + b_U[answer] − b_U[wrong]``;
   it is included here, so the last layer's ``resid_post`` gives exactly the model's own logit
   difference, with either scale.

Kinds (``cfg.kinds``, default all): ``resid_pre``, ``resid_mid``, ``resid_post``, axes ``(prompt, layer)``:
there is no ``pos`` axis (every score is read at the prompt's answer position, ``pos`` null), as DLA's rows.
Direction label ``"clean"``: no patch; ``cfg.directions`` is not used. ``per_prompt=False`` averages
prompts. Options: ``LogitLensOptions.scale`` (``"own"`` or ``"final"``). Reduced in float32 (``core.wide``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from einops import einsum
from torch import Tensor

from attrpatch.components import RESID_KINDS
from attrpatch.engine import Weights, run_with_acts, unembed_direction, weights
from attrpatch.methods import MethodConfig, Options, register, register_cost
from attrpatch.methods.core import Cost, Work, activation_bytes, as_scores, forward_flops, views, wide
from attrpatch.models import LoadedModel
from attrpatch.scores import MethodResult, NodeScores
from attrpatch.tasks import PromptBatch

DIRECTION = "clean"  # the lens reads the clean run only; there is no patch direction
LENS_KINDS = RESID_KINDS


@dataclass(frozen=True)
class LogitLensOptions(Options):
    scale: Literal["own", "final"] = "own"  # step 2: each residual's own LayerNorm scale, or the final one's


def logit_lens_scores(w: Weights, batch: PromptBatch, kinds: tuple[str, ...] = LENS_KINDS, scale: str = "own",
                      ) -> dict[str, tuple[Tensor, tuple[str, ...]]]:
    """Steps 1–3 on any engine weights: ``{kind: (scores [prompt layer], axes)}``."""
    ans_pos = batch.answer_pos.to(w.device)
    with torch.no_grad():
        _, acts = run_with_acts(w, batch.clean_tokens.to(w.device), ans_pos, kinds=(*kinds, "logits"))  # step 1
        rows = torch.arange(len(batch), device=w.device)
        final = wide(acts[("logits", w.n_layers)][rows, ans_pos])  # [prompt d_model]
        u, bias = unembed_direction(w, batch.answer_ids, batch.wrong_ids)
        gu = wide(w.lnf_w) * wide(u)  # γ ⊙ u, [prompt d_model]
        const = wide(u) @ wide(w.lnf_b) + wide(bias)  # β·u + b_U[answer] − b_U[wrong], [prompt]
        out = {}
        for kind in kinds:
            r = wide(torch.stack([acts[(kind, layer)][rows, ans_pos] for layer in range(w.n_layers)], 1))
            centred = r - r.mean(-1, keepdim=True)  # step 2
            var = (final if scale == "final" else r).var(-1, unbiased=False, keepdim=True)
            if scale == "final":
                var = var[:, None]
            normed = centred / (var + w.eps).sqrt()
            s = einsum(normed, gu, "prompt layer d_model, prompt d_model -> prompt layer") + const[:, None]  # step 3
            out[kind] = (s, ("prompt", "layer"))
    return out


@register("logit_lens", produces="nodes", options=LogitLensOptions, kinds=LENS_KINDS, directions=(DIRECTION,))
def logit_lens(model: LoadedModel, batch: PromptBatch, cfg: MethodConfig) -> MethodResult:
    """The logit lens: the logit difference read from resid_pre / resid_mid / resid_post of every layer."""
    kinds = tuple(k for k in LENS_KINDS if k in (cfg.kinds or LENS_KINDS))
    nodes = []
    for kind, (s, axes) in logit_lens_scores(weights(model), batch, kinds, cfg.options.scale).items():
        s, axes = views(s, axes, cfg.per_prompt, per_position=True)
        nodes.append(NodeScores(kind, DIRECTION, as_scores(s), axes))
    return MethodResult(nodes=nodes)


@register_cost("logit_lens")
def logit_lens_cost(w: Work, cfg: MethodConfig) -> Cost:
    S = w.shape
    kinds = cfg.kinds or LENS_KINDS
    rows = len(kinds) * S.n_layers * (w.n if cfg.per_prompt else 1)
    fixed = w.n * w.P * S.n_layers * (len(kinds) + 1) * S.d_model * w.dtype_bytes
    return Cost({"nodes": rows}, forward_rows=w.n, flops=forward_flops(S, w.n, w.P), fixed_bytes=fixed,
                peak_bytes=fixed + w.n * activation_bytes(S, w.P, w.dtype_bytes, False))
