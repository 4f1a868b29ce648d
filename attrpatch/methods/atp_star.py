"""AtP*: attribution patching with the exact attention pattern for queries and keys (the QK fix) and,
optionally, GradDrop — every node kind of ``attribution`` from the same two forwards and one backward.

    python -c "from attrpatch import load_model, make_batch; from attrpatch.methods import run_method, MethodConfig; m = load_model('ioi-tiny'); r = run_method('atp_star', m, make_batch('ioi', m.tokenizer, 8), MethodConfig(kinds=('head_q', 'head_k'))); print([(n.component, tuple(n.scores.shape)) for n in r.nodes])"

Algorithm (Kramár, Lieberum, Shah & Nanda 2024, "AtP*: An efficient and scalable method for localizing LLM
behaviour to components", arXiv:2403.00745, §3.1 QK fix, §3.2 GradDrop). Directions, kinds and axes are
those of ``attribution``; ``run`` is the differentiated prompt, ``patch`` the one patched in.

1. AtP's passes (``core.atp_forwards``): the patch forward, the run forward with autograd and one backward,
   at the requested sites plus every layer's ``head_q``, ``head_k`` and ``head_pattern`` (the QK fix needs
   them) and, for GradDrop, ``resid_pre`` and ``resid_post``. ``G = ∂metric/∂pattern`` comes from that
   backward (``[prompt, head, dest t, src s]``).
2. Every kind but ``head_q`` / ``head_k``: plain AtP (``core.contract_nodes``), ``Σ_d g · (a_patch − a_run)``.
   ``head_pattern`` is already linear after the pattern (``Σ G · (A_patch − A_run)``, the QK fix's own form),
   so its score is AtP's.
3. QK fix, queries. With the run's scores ``S[t, s] = q_t · k_s / √d_head`` (causal) and pattern
   ``A = softmax_s S``, patching the query of head h at position t changes row t only, and exactly:

       AtP*(q_t) = Σ_s G[t, s] · (softmax_s(q'_t · k_s / √d_head) − A[t, s])

   One einsum gives the patched scores of every (prompt, head, t) at once, then one row softmax.
4. QK fix, keys. Patching the key at source s changes column s of every row t ≥ s, and renormalises the
   row: ``A'_t = softmax(S[t, ·] with S[t, s] ← S'[t, s] = q_t · k'_s / √d_head)``. Exactly:

       AtP*(k_s) = Σ_{t ≥ s} Σ_j G[t, j] · (A'[t, j] − A[t, j])
                 = Σ_{t ≥ s} [ p'_ts · G[t, s] + (1 − p'_ts) · Ḡ_t¬s − Σ_j A[t, j] · G[t, j] ]

   with ``Λ_ts = logsumexp_{j ≠ s} S[t, j]``, ``p'_ts = exp(S'_ts − logaddexp(Λ_ts, S'_ts))`` (the patched
   weight of s) and ``Ḡ_t¬s = Σ_{j≠s} A[t, j] G[t, j] / Σ_{j≠s} A[t, j]`` (G averaged over the other
   sources). The leave-one-out sums come from prefix and suffix ``logcumsumexp`` (G split into its
   positive and negative parts), so the cost is O(T²) per head like attention itself, not the O(T³) of
   recomputing T² rows, and saturated rows (A = 1 in float32, the case the fix exists for) stay exact.
   Rows and columns where the patch leaves q (or k) unchanged score exactly 0.
5. GradDrop (``AtpStarOptions.grad_drop``): for each layer ℓ, the run's gradient with block ℓ's write to
   the residual stream (attn_out + mlp_out) stop-gradiented — forward values unchanged, nothing inside
   block ℓ gets a gradient, ``resid_pre[ℓ]`` gets ``∂metric/∂resid_post[ℓ]`` through the skip connection.
   Sites after block ℓ keep their gradient; sites before it get one more backward, from ``resid_pre[ℓ]``
   with that gradient down to the embeddings (the L backwards reuse the run's forward graph and together
   cost ~(L − 1)/2 full backwards). Steps 2–4 are repeated with each ℓ's gradients (``G^(ℓ)`` for the QK
   fix) and combined as the paper's Eq. (11):

       ĉ_GD(n) = mean_prompts[ (1 / (L − 1)) · Σ_{ℓ=1..L} |AtP*_ℓ(n)| ]

6. Views: ``per_position=False`` sums positions (inside the |·| of step 5: the node is then the component
   at every position), ``per_prompt=False`` takes the mean over prompts. Scores are reduced in float32
   (``core.wide``).

GradDrop, what is and is not certain (the paper's body could not be read here; the formula is the one four
independent re-implementations give, ``/tmp/notes/atpstar.md``):

* Five sources cite the combination as Eq. (11), one as Eq. (12). |·| is taken per prompt and per layer
  term, before the sum and the mean; plain AtP is not a separate term: for ℓ before the node's layer the term
  *is* plain AtP*, for ℓ = the node's layer it is 0, hence 1/(L − 1) (a node without cancellation scores
  |AtP*|).
* "Layer" is the whole block's write here (the paper's Pythia blocks are parallel: one write per block); other
  re-implementations drop only the attention write, or attention and MLP in separate passes (2L terms).
* The embeddings are divided by L − 1 like every node (one re-implementation divides them by L).
* Queries and keys use the QK fix with ``G^(ℓ)`` (inferred: the paper presents the two as composable).
* The scores are magnitudes (≥ 0): a ranking heuristic for cancelled nodes, not an estimate of the signed
  patching effect — compare them with |exact| or by recall, not by Pearson against signed scores.

Options: ``AtpStarOptions.grad_drop`` (default False: the QK fix alone, whose cost the bench measures against
AtP). Config read: ``kinds``, ``directions``, ``per_prompt``, ``per_position``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import einsum, reduce
from jaxtyping import Float
from torch import Tensor

from attrpatch.engine import Weights, weights
from attrpatch.methods import MethodConfig, MethodError, Options, register, register_cost
from attrpatch.methods.core import (
    ATP_KINDS,
    EMBED_KINDS,
    RUN_AND_PATCH,
    Cost,
    Sites,
    Work,
    acc_dtype,
    as_scores,
    atp_cost,
    atp_forwards,
    contract_nodes,
    node_axes,
    views,
    wide,
)
from attrpatch.models import LoadedModel
from attrpatch.scores import MethodResult, NodeScores
from attrpatch.tasks import PromptBatch

QK_KINDS = ("head_q", "head_k")


@dataclass(frozen=True)
class AtpStarOptions(Options):
    grad_drop: bool = False  # step 5: L extra (partial) backwards, scores |·| combined by Eq. (11)


# ----------------------------------------------------------------------------- steps 3–4: the QK fix

def _scores(q: Tensor, k: Tensor) -> Float[Tensor, "prompt head dest src"]:
    """Causal attention scores q_t · k_s / √d_head in ``acc_dtype``, −inf above the diagonal."""
    s = einsum(wide(q), wide(k), "prompt dest head d_head, prompt src head d_head -> prompt head dest src")
    s = s / math.sqrt(q.shape[-1])
    n = s.shape[-1]
    return s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), -math.inf)


def _leave_one_out_lse(x: Tensor) -> Tensor:
    """``out[..., s] = logsumexp_{j ≠ s} x[..., j]`` (−inf where nothing is left), from prefix and suffix
    ``logcumsumexp``: O(n) per row, no subtraction of large terms."""
    pad = torch.full_like(x[..., :1], -math.inf)
    before = torch.cat([pad, x.logcumsumexp(-1)[..., :-1]], -1)
    after = torch.cat([x.flip(-1).logcumsumexp(-1).flip(-1)[..., 1:], pad], -1)
    return torch.logaddexp(before, after)


def _changed(patch: Tensor, run: Tensor) -> Float[Tensor, "prompt head pos"]:
    """1 where the patch changes a head's vector at a position, else 0 (``[prompt pos head d]`` inputs)."""
    return (patch != run).any(-1).permute(0, 2, 1).to(acc_dtype(run.dtype))


def qk_fix(q_run: Tensor, k_run: Tensor, q_patch: Tensor, k_patch: Tensor,
           grad_pattern: Float[Tensor, "prompt head dest src"]) -> tuple[Tensor, Tensor]:
    """Steps 3–4 for one layer: the QK-fixed scores of every query and key, ``[prompt head pos]`` each.

    ``q_*``, ``k_*``: ``[prompt pos head d_head]`` of the run and the patch; ``grad_pattern``: ∂metric/∂pattern
    on the run."""
    G = wide(grad_pattern)
    S = _scores(q_run, k_run)
    A = S.softmax(-1)
    # Step 3: every query row recomputed with its patched query.
    A_q = _scores(q_patch, k_run).softmax(-1)
    q_score = einsum(G, A_q - A, "prompt head dest src, prompt head dest src -> prompt head dest")
    # Step 4: column s of row t patched, every (t, s) at once.
    S_k = _scores(q_run, k_patch)  # S'[t, s] = q_t · k'_s / √d
    others = _leave_one_out_lse(S)  # Λ_ts
    total = torch.logaddexp(others, S_k)  # log of the patched row's normaliser (relative to exp(S))
    p_new = (S_k - total).exp()  # patched weight of s in row t
    rest = (others - total).exp()  # 1 − p_new, computed without cancellation
    log_pos, log_neg = G.clamp(min=0).log(), (-G).clamp(min=0).log()
    g_others = (_leave_one_out_lse(S + log_pos) - others).exp() - (_leave_one_out_lse(S + log_neg) - others).exp()
    g_others = torch.where(others > -math.inf, g_others, 0)  # Ḡ_t¬s; 0 where s is the row's only source
    expected = einsum(A, G, "prompt head dest src, prompt head dest src -> prompt head dest")
    effect = p_new * G + rest * g_others - expected[..., None]
    n = effect.shape[-1]
    effect = effect.masked_fill(torch.ones(n, n, dtype=torch.bool, device=effect.device).triu(1), 0)
    k_score = reduce(effect, "prompt head dest src -> prompt head src", "sum")
    return q_score * _changed(q_patch, q_run), k_score * _changed(k_patch, k_run)


# ----------------------------------------------------------------------------- steps 2–4 for one gradient

def _score_kinds(w: Weights, kinds: tuple[str, ...], grads: Sites, run: Sites, patch: Sites,
                 ) -> dict[str, Tensor]:
    """Steps 2–4 with one set of gradients: ``{kind: scores}`` (axes ``core.node_axes(kind)``)."""
    out = {kind: contract_nodes(kind, grads, run, patch, w.n_layers)[0] for kind in kinds if kind not in QK_KINDS}
    if any(k in kinds for k in QK_KINDS):
        fixed = [qk_fix(run[("head_q", L)], run[("head_k", L)], patch[("head_q", L)], patch[("head_k", L)],
                        grads[("head_pattern", L)]) for L in range(w.n_layers)]
        for i, kind in enumerate(QK_KINDS):
            if kind in kinds:
                out[kind] = torch.stack([f[i] for f in fixed], dim=1)  # [prompt layer head pos]
    return out


# ----------------------------------------------------------------------------- step 5: GradDrop

def _site_layer(key: tuple[str, int]) -> int:
    """The block a site belongs to (−1: the embeddings, before every block)."""
    return -1 if key[0] in EMBED_KINDS else key[1]


def dropped_grads(acts: Sites, grads: Sites, layer: int) -> Sites:
    """∂metric/∂site with block ``layer``'s write to the residual stream stop-gradiented (step 5), from the
    run's live graph (``acts``, recorded with ``resid_pre`` and ``resid_post``) and its plain gradients."""
    g_post = grads[("resid_post", layer)]
    out: Sites = {}
    before = [k for k in acts if _site_layer(k) < layer]
    for key in acts:
        at = _site_layer(key)
        if at > layer or key == ("resid_post", layer):
            out[key] = grads[key]  # downstream of the dropped write: unchanged
        elif key == ("resid_pre", layer):
            out[key] = g_post  # through the skip connection only
        elif at == layer:
            out[key] = torch.zeros_like(grads[key])  # inside the dropped block
    if before:
        upstream = torch.autograd.grad(acts[("resid_pre", layer)], [acts[k] for k in before], grad_outputs=g_post,
                                       retain_graph=True, allow_unused=True)
        for key, g in zip(before, upstream, strict=True):
            out[key] = torch.zeros_like(grads[key]) if g is None else g
    return out


# ----------------------------------------------------------------------------- the method

def atp_star_scores(w: Weights, batch: PromptBatch, kinds: tuple[str, ...] = ATP_KINDS,
                    directions: tuple[str, ...] = ("denoise",), grad_drop: bool = False, per_position: bool = True,
                    ) -> dict[tuple[str, str], tuple[Tensor, tuple[str, ...]]]:
    """Steps 1–5 on any engine weights: ``{(direction, kind): (scores, axes)}`` per prompt (``per_position``
    False: positions summed, inside GradDrop's |·|)."""
    if grad_drop and w.n_layers < 2:
        raise MethodError("atp_star grad_drop needs at least 2 layers (Eq. (11) divides by L − 1)")
    sites = set(kinds)
    if any(k in kinds for k in QK_KINDS):
        sites |= {"head_q", "head_k", "head_pattern"}
    if grad_drop:
        sites |= {"resid_pre", "resid_post"}
    acts, grads = atp_forwards(w, batch, tuple(sites), directions, retain_graph=grad_drop)  # step 1
    out = {}
    for d in directions:
        run, patch = RUN_AND_PATCH[d]
        if not grad_drop:
            with torch.no_grad():
                scores = _score_kinds(w, kinds, grads[run], acts[run], acts[patch])
            for kind in kinds:
                out[(d, kind)] = views(scores[kind], node_axes(kind), True, per_position)
            continue
        total: dict[str, Tensor] = {}
        axes: dict[str, tuple[str, ...]] = {}
        for layer in range(w.n_layers):  # step 5
            g = dropped_grads(acts[run], grads[run], layer)
            with torch.no_grad():
                for kind, s in _score_kinds(w, kinds, g, acts[run], acts[patch]).items():
                    s, axes[kind] = views(s, node_axes(kind), True, per_position)
                    total[kind] = s.abs() if kind not in total else total[kind] + s.abs()
        for kind in kinds:
            out[(d, kind)] = (total[kind] / (w.n_layers - 1), axes[kind])
    return out


@register("atp_star", produces="nodes", options=AtpStarOptions, kinds=ATP_KINDS)
def atp_star(model: LoadedModel, batch: PromptBatch, cfg: MethodConfig) -> MethodResult:
    """AtP* (Kramár et al. 2024): AtP with the exact attention pattern for queries and keys; GradDrop optional."""
    kinds = tuple(k for k in ATP_KINDS if k in (cfg.kinds or ATP_KINDS))
    raw = atp_star_scores(weights(model), batch, kinds, cfg.directions, cfg.options.grad_drop, cfg.per_position)
    nodes = []
    for (direction, kind), (s, axes) in raw.items():
        s, axes = views(s, axes, cfg.per_prompt, per_position=True)
        nodes.append(NodeScores(kind, direction, as_scores(s), axes))
    return MethodResult(nodes=nodes)


@register_cost("atp_star")
def atp_star_cost(w: Work, cfg: MethodConfig) -> Cost:
    """AtP's passes and sites, plus the QK fix's sites; GradDrop: ~(L − 1)/2 more backwards and the residual
    sites (the QK fix and the rescorings are small beside the passes: 1.12× AtP measured, bench)."""
    kinds = tuple(cfg.kinds or ATP_KINDS)
    sites = set(kinds)
    if any(k in kinds for k in QK_KINDS):
        sites |= {"head_q", "head_k", "head_pattern"}
    backwards = 1.0
    if cfg.options.grad_drop:
        sites |= {"resid_pre", "resid_post"}
        backwards += (w.shape.n_layers - 1) / 2
    return atp_cost(w, cfg, kinds, backwards=backwards, sites=tuple(sorted(sites)))
