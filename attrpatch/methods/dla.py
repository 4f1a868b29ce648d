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
from jaxtyping import Float
from torch import Tensor

from attrpatch.engine import Weights, run_with_acts, weights
from attrpatch.methods import MethodConfig, register
from attrpatch.methods.attribution import check_kinds, check_no_extra, stack_sites, views
from attrpatch.models import LoadedModel
from attrpatch.scores import MethodResult, NodeScores
from attrpatch.tasks import PromptBatch

DIRECTION = "clean"  # DLA reads the clean run only; there is no patch direction
DLA_KINDS = ("embed", "pos_embed", "attn_out", "mlp_out", "head_out")
_EINSUM = {
    "embed": ("bd,bd->b", ("prompt",)),
    "pos_embed": ("bd,bd->b", ("prompt",)),
    "attn_out": ("lbd,bd->bl", ("prompt", "layer")),
    "mlp_out": ("lbd,bd->bl", ("prompt", "layer")),
}


def _answer_direction(w: Weights, batch: PromptBatch, final: Float[Tensor, "batch d_model"],
                      ) -> Float[Tensor, "batch d_model"]:
    """Steps 2–3: the logit-difference direction through ln_final with its scale frozen."""
    sigma = (final.var(-1, unbiased=False, keepdim=True) + w.eps).sqrt()
    u = (w.W_U[:, batch.answer_ids.to(w.device)] - w.W_U[:, batch.wrong_ids.to(w.device)]).T
    gu = w.lnf_w * u
    return (gu - gu.mean(-1, keepdim=True)) / sigma


def dla_constant(w: Weights, batch: PromptBatch) -> Float[Tensor, " batch"]:
    """β·u + b_U[answer] − b_U[wrong]: the part of the logit difference that no component writes."""
    ans, wrong = batch.answer_ids.to(w.device), batch.wrong_ids.to(w.device)
    u = (w.W_U[:, ans] - w.W_U[:, wrong]).T
    return u @ w.lnf_b + w.b_U[ans] - w.b_U[wrong]


def dla_scores(w: Weights, batch: PromptBatch, kinds: tuple[str, ...] = DLA_KINDS,
               ) -> dict[str, tuple[Tensor, tuple[str, ...]]]:
    """Steps 1–4 on any engine weights: ``{kind: (scores, axes)}``, per prompt."""
    ans_pos = batch.answer_pos.to(w.device)
    with torch.no_grad():
        _, acts = run_with_acts(w, batch.clean_tokens.to(w.device), ans_pos,
                                kinds=(*DLA_KINDS, "logits"))  # step 1
        rows = torch.arange(len(batch), device=w.device)
        at_answer = lambda x: x[..., rows, ans_pos, :] if x.dim() == 4 else x[rows, ans_pos]  # noqa: E731
        v = _answer_direction(w, batch, at_answer(acts[("logits", w.n_layers)]))
        out = {}
        for kind in kinds:  # step 4
            if kind == "head_out":
                z = stack_sites(acts, kind, w.n_layers)[:, rows, ans_pos]  # [layer batch head d_head]
                out[kind] = (torch.einsum("lbhe,lhed,bd->blh", z, w.W_O, v), ("prompt", "layer", "head"))
            else:
                spec, axes = _EINSUM[kind]
                out[kind] = (torch.einsum(spec, at_answer(stack_sites(acts, kind, w.n_layers)), v), axes)
    return out


@register("dla", produces="nodes")
def dla(model: LoadedModel, batch: PromptBatch, cfg: MethodConfig) -> MethodResult:
    """Direct logit attribution at the answer position (ln_final scale frozen from the clean run)."""
    kinds = check_kinds(cfg.kinds, DLA_KINDS, "dla")
    check_no_extra(cfg, "dla")
    nodes = []
    for kind, (s, axes) in dla_scores(weights(model), batch, kinds).items():
        s, axes = views(s, axes, cfg.per_prompt, per_position=True)
        nodes.append(NodeScores(kind, DIRECTION, s.float().cpu(), axes))
    return MethodResult(nodes=nodes)
