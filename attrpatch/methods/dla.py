"""Direct logit attribution (DLA) at the answer position: per head, per layer output, and the embeddings.

    python -c "from attrpatch import load_model, make_batch; from attrpatch.methods import run_method; m = load_model('ioi-tiny'); r = run_method('dla', m, make_batch('ioi', m.tokenizer, 8)); print([(n.component, n.axes) for n in r.nodes])"

Algorithm (the direct logit attribution of Nanda's Exploratory Analysis Demo; Elhage et al. 2021,
"A Mathematical Framework for Transformer Circuits"):

1. Forward the clean prompt through ``attrpatch.engine`` (no gradient) and keep, at each prompt's answer
   position, the token and position embeddings, every head's z, every layer's ``attn_out`` and
   ``mlp_out``, and the final residual stream ``x`` (the input of ``ln_final``).
2. Freeze ``ln_final``'s scale from this clean run: ``σ = sqrt(var(x) + eps)`` per prompt. With σ fixed,
   ``ln_final`` is the linear map ``x ↦ γ ⊙ (x − mean(x)) / σ + β`` (mean-centering is linear).
3. The logit-difference direction through that map, per prompt:
   ``u = W_U[:, answer] − W_U[:, wrong]`` and ``v = (γ⊙u − mean(γ⊙u)) / σ``, so that
   ``(γ ⊙ (c − mean(c)) / σ) · u = c · v`` for any component ``c`` of ``x``.
4. Score every component with one einsum per kind:

       DLA(c) = c · v          head_out: z[l, h] · (W_O[l, h] v)   (never forming the head's d_model result)

Exactness: ``x = embed + pos_embed + Σ_l attn_out[l] + Σ_l mlp_out[l]`` and ``attn_out[l] = Σ_h
z W_O[l, h] + b_O[l]``, so ``DLA(embed) + DLA(pos_embed) + Σ DLA(attn_out) + Σ DLA(mlp_out) + β·u +
b_U[answer] − b_U[wrong]`` equals the clean logit difference exactly (``dla_constant`` gives the last two
terms; ``tests/test_attention_dla.py`` checks it), and the heads of a layer plus ``b_O[l] · v`` sum to its
``attn_out`` score. It is exact only because σ is frozen from the clean run: a component's score is its
contribution *given* everything else, not the effect of removing it.

Kinds (``cfg.kinds``, default all): ``embed``, ``pos_embed`` (axes prompt), ``attn_out``, ``mlp_out``
(prompt, layer), ``head_out`` (prompt, layer, head). There is no ``pos`` axis: every score is read at the
prompt's answer position (``pos`` is null in the dataset). Direction label ``"clean"``: no patch is
involved and ``cfg.directions`` is not used. ``per_prompt=False`` averages prompts; ``per_position`` has
no effect.
"""

from __future__ import annotations

import torch
from einops import einsum
from jaxtyping import Float
from torch import Tensor

from attrpatch.engine import Weights, run_with_acts, unembed_direction, weights
from attrpatch.methods import MethodConfig, register, register_cost
from attrpatch.methods.core import Cost, Work, activation_bytes, as_scores, forward_flops, views, wide
from attrpatch.models import LoadedModel
from attrpatch.scores import MethodResult, NodeScores
from attrpatch.tasks import PromptBatch

DIRECTION = "clean"  # DLA reads the clean run only; there is no patch direction
DLA_KINDS = ("embed", "pos_embed", "attn_out", "mlp_out", "head_out")


def _answer_direction(w: Weights, batch: PromptBatch, final: Float[Tensor, "batch d_model"],
                      ) -> Float[Tensor, "batch d_model"]:
    """Steps 2–3: the logit-difference direction through ln_final with its scale frozen (``acc_dtype``)."""
    final = wide(final)
    sigma = (final.var(-1, unbiased=False, keepdim=True) + w.eps).sqrt()
    u, _ = unembed_direction(w, batch.answer_ids, batch.wrong_ids)
    gu = wide(w.lnf_w) * wide(u)
    return (gu - gu.mean(-1, keepdim=True)) / sigma


def dla_constant(w: Weights, batch: PromptBatch) -> Float[Tensor, " batch"]:
    """β·u + b_U[answer] − b_U[wrong]: the part of the logit difference that no component writes."""
    u, bias = unembed_direction(w, batch.answer_ids, batch.wrong_ids)
    return u @ w.lnf_b + bias


def dla_scores(w: Weights, batch: PromptBatch, kinds: tuple[str, ...] = DLA_KINDS,
               ) -> dict[str, tuple[Tensor, tuple[str, ...]]]:
    """Steps 1–4 on any engine weights: ``{kind: (scores, axes)}``, per prompt."""
    ans_pos = batch.answer_pos.to(w.device)
    with torch.no_grad():
        _, acts = run_with_acts(w, batch.clean_tokens.to(w.device), ans_pos, kinds=(*DLA_KINDS, "logits"))  # step 1
        rows = torch.arange(len(batch), device=w.device)

        def at_answer(kind: str) -> Tensor:  # [prompt, (layer,) ...] at each prompt's answer position, widened
            if kind in ("embed", "pos_embed", "logits"):
                layer = w.n_layers if kind == "logits" else 0
                return wide(acts[(kind, layer)][rows, ans_pos])
            return wide(torch.stack([acts[(kind, layer)][rows, ans_pos] for layer in range(w.n_layers)], 1))

        v = _answer_direction(w, batch, at_answer("logits"))
        out = {}
        for kind in kinds:  # step 4
            if kind == "head_out":
                W_O = wide(torch.stack([w.W_O_heads(layer) for layer in range(w.n_layers)]))
                s = einsum(at_answer(kind), W_O, v, "prompt layer head d_head, layer head d_head d_model, "
                           "prompt d_model -> prompt layer head")
                out[kind] = (s, ("prompt", "layer", "head"))
            elif kind in ("attn_out", "mlp_out"):
                s = einsum(at_answer(kind), v, "prompt layer d_model, prompt d_model -> prompt layer")
                out[kind] = (s, ("prompt", "layer"))
            else:
                out[kind] = (einsum(at_answer(kind), v, "prompt d_model, prompt d_model -> prompt"), ("prompt",))
    return out


@register("dla", produces="nodes", kinds=DLA_KINDS, directions=(DIRECTION,))
def dla(model: LoadedModel, batch: PromptBatch, cfg: MethodConfig) -> MethodResult:
    """Direct logit attribution at the answer position (ln_final scale frozen from the clean run)."""
    kinds = tuple(k for k in DLA_KINDS if k in (cfg.kinds or DLA_KINDS))
    nodes = []
    for kind, (s, axes) in dla_scores(weights(model), batch, kinds).items():
        s, axes = views(s, axes, cfg.per_prompt, per_position=True)
        nodes.append(NodeScores(kind, DIRECTION, as_scores(s), axes))
    return MethodResult(nodes=nodes)


@register_cost("dla")
def dla_cost(w: Work, cfg: MethodConfig) -> Cost:
    S = w.shape
    cells = {"embed": 1, "pos_embed": 1, "attn_out": S.n_layers, "mlp_out": S.n_layers, "head_out": S.n_layers * S.n_heads}
    rows = sum(cells[k] * (w.n if cfg.per_prompt else 1) for k in (cfg.kinds or DLA_KINDS))
    fixed = w.n * w.P * S.n_layers * 4 * S.d_model * w.dtype_bytes
    return Cost({"nodes": rows}, forward_rows=w.n, flops=forward_flops(S, w.n, w.P), fixed_bytes=fixed,
                peak_bytes=fixed + w.n * activation_bytes(S, w.P, w.dtype_bytes, False))
