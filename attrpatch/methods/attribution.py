"""Attribution patching (AtP): every node kind of the Attribution Patching Demo from two forwards and one backward.

    python -c "from attrpatch import load_model, make_batch; from attrpatch.methods import run_method; m = load_model('ioi-tiny'); r = run_method('attribution', m, make_batch('ioi', m.tokenizer, 8)); print([(n.component, tuple(n.scores.shape)) for n in r.nodes])"

Algorithm (Nanda 2023, "Attribution Patching: Activation Patching At Industrial Scale"; the node
granularities of its demo notebook; Syed, Rager & Conmy 2023, "Attribution Patching Outperforms
Automated Circuit Discovery", for the noising direction). For a direction, the *run* prompt is the one
whose forward is differentiated and the *patch* prompt supplies the activations patched in:
``denoise`` runs the corrupted prompt and patches clean activations (gradient on the corrupted run, as
the demo); ``noise`` runs the clean prompt and patches corrupted activations (as ACDC++).

1. Patch forward: run the patch prompt through ``attrpatch.engine`` and keep ``a_patch`` at every site
   of the requested kinds (no graph unless another direction differentiates this run).
2. Run forward: run the run prompt with autograd on and keep ``a_run`` at the same sites; the token and
   position embeddings are made leaves so the graph reaches every site.
3. One backward for everything: ``g = torch.autograd.grad(Σ_prompts metric, [all sites])``. Prompts do
   not interact, so the gradient of the sum is each prompt's own gradient; positions after a prompt's
   answer position get ``g = 0`` by causality (padding never scores).
4. Score, one einsum per kind and layer over prompts, heads and positions at once:

       AtP(node) = Σ_d  g[..., d] · (a_patch − a_run)[..., d]
                 ≈ metric(run with a_patch at node) − metric(run)      (first-order Taylor)

   summing over the node's vector dimension (d_model, or d_head for head_out/q/k/v; a pattern cell
   is a scalar, so head_pattern is an elementwise product).
5. Views: ``per_position=False`` sums the ``pos`` (and ``src_pos``) axes — the demo's "all positions",
   "block every" and "head every" views; ``per_prompt=False`` takes the mean over prompts.

Node kinds (``cfg.kinds``, default all): ``embed`` (token embedding), ``pos_embed``, ``resid_pre``,
``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out`` (layer, pos); ``head_out`` (z), ``head_q``,
``head_k``, ``head_v`` (layer, head, pos); ``head_pattern`` (layer, head, pos, src_pos). ``pos_embed``
scores are zero whenever clean and corrupted prompts have equal lengths (the positions agree); they are
kept because the demo shows them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from attrpatch.components import DIRECTIONS, HEAD_VECTOR_KINDS, LAYER_KINDS, NODE_KINDS, RESID_KINDS
from attrpatch.engine import Weights, forward, weights
from attrpatch.methods import MethodConfig, MethodError, register
from attrpatch.metrics import final_logit_diff
from attrpatch.models import LoadedModel
from attrpatch.scores import MethodResult, NodeScores
from attrpatch.tasks import PromptBatch

EMBED_KINDS = ("embed", "pos_embed")
D_MODEL_KINDS = (*RESID_KINDS, *LAYER_KINDS)
ATP_KINDS = NODE_KINDS  # every node kind of the vocabulary

Metric = Callable[[Tensor, PromptBatch], Tensor]


def check_kinds(kinds: tuple[str, ...] | None, allowed: tuple[str, ...], method: str) -> tuple[str, ...]:
    """The requested kinds in vocabulary order, or one error naming the bad ones and the allowed set."""
    if kinds is None:
        return allowed
    bad = [k for k in kinds if k not in allowed]
    if bad or not kinds:
        raise MethodError(f"method {method!r} scores the kinds {list(allowed)}; got {list(kinds)}: "
                          f"pass cfg.kinds as a non-empty subset of those (or None for all)")
    return tuple(k for k in allowed if k in kinds)


def check_no_extra(cfg: MethodConfig, method: str) -> None:
    if cfg.extra:
        raise MethodError(f"method {method!r} takes no cfg.extra options, got {sorted(cfg.extra)}: remove them")


def _tokens(batch: PromptBatch, which: str, w: Weights) -> Tensor:
    return (batch.clean_tokens if which == "clean" else batch.corrupt_tokens).to(w.device)


class SiteRecorder:
    """Step 1/2: an engine edit that keeps the site tensors of ``kinds`` (and, with ``grad``, makes the
    embeddings leaves so that every site is in the graph)."""

    def __init__(self, kinds: tuple[str, ...], grad: bool):
        self.kinds = frozenset(kinds)
        self.grad = grad
        self.acts: dict[tuple[str, int], Tensor] = {}

    def __call__(self, kind: str, layer: int, x: Tensor) -> Tensor:
        if self.grad and kind in EMBED_KINDS:
            x = x.detach().clone().requires_grad_(True)
        if kind in self.kinds:
            self.acts[(kind, layer)] = x
        return x


def stack_sites(acts: dict[tuple[str, int], Tensor], kind: str, n_layers: int) -> Tensor:
    """Sites of one kind stacked along a leading layer axis (embeddings: no layer axis)."""
    if kind in EMBED_KINDS:
        return acts[(kind, 0)]
    return torch.stack([acts[(kind, layer)] for layer in range(n_layers)])


# Step 4: one contraction per kind (per layer; the layer results are stacked). Output axes:
# prompt, [layer], [head], pos, [src_pos].
_EINSUM = {
    **{k: ("bpd,bpd->bp", ("prompt", "pos")) for k in EMBED_KINDS},
    **{k: ("bpd,bpd->bp", ("prompt", "layer", "pos")) for k in D_MODEL_KINDS},
    **{k: ("bphe,bphe->bhp", ("prompt", "layer", "head", "pos")) for k in HEAD_VECTOR_KINDS},
    "head_pattern": ("bhqk,bhqk->bhqk", ("prompt", "layer", "head", "pos", "src_pos")),
}


def contract(kind: str, grads: dict, run: dict, patch: dict, n_layers: int) -> tuple[Tensor, tuple[str, ...]]:
    """Step 4 for one kind: Σ_d g · (a_patch − a_run) for every prompt, layer, head and position.

    Layer by layer (stacking the inputs first would copy every activation once more)."""
    spec, axes = _EINSUM[kind]
    if kind in EMBED_KINDS:
        return torch.einsum(spec, grads[(kind, 0)], patch[(kind, 0)] - run[(kind, 0)]), axes
    per_layer = [torch.einsum(spec, grads[(kind, layer)], patch[(kind, layer)] - run[(kind, layer)])
                 for layer in range(n_layers)]
    return torch.stack(per_layer, dim=1), axes


def atp_scores(w: Weights, batch: PromptBatch, kinds: tuple[str, ...] = ATP_KINDS,
               directions: tuple[str, ...] = ("denoise",), metric: Metric = final_logit_diff,
               ) -> dict[tuple[str, str], tuple[Tensor, tuple[str, ...]]]:
    """Steps 1–4 on any engine weights: ``{(direction, kind): (scores, axes)}``, per prompt and position.

    ``metric(engine_logits, batch) -> [batch]`` is differentiated; the method uses the logit difference.
    """
    for d in directions:
        if d not in DIRECTIONS:
            raise MethodError(f"unknown direction {d!r}: use 'denoise' (run corrupted, patch clean) or 'noise'")
    run_of = {"denoise": "corrupt", "noise": "clean"}
    differentiated = {run_of[d] for d in directions}
    acts: dict[str, SiteRecorder] = {}
    grads: dict[str, dict[tuple[str, int], Tensor]] = {}
    for which in ("clean", "corrupt"):  # steps 1 and 2: the two forwards
        grad = which in differentiated
        sites = SiteRecorder(kinds, grad)
        with torch.set_grad_enabled(grad):
            logits = forward(w, _tokens(batch, which, w), batch.answer_pos.to(w.device), sites)
        acts[which] = sites
        if grad:  # step 3: one backward per differentiated run, for every site at once
            keys = list(sites.acts)
            g = torch.autograd.grad(metric(logits, batch).sum(), [sites.acts[k] for k in keys])
            grads[which] = dict(zip(keys, g, strict=True))
    out = {}
    with torch.no_grad():
        for d in directions:
            run, patch = run_of[d], ("clean" if run_of[d] == "corrupt" else "corrupt")
            for kind in kinds:  # step 4
                out[(d, kind)] = contract(kind, grads[run], acts[run].acts, acts[patch].acts, w.n_layers)
    return out


def views(scores: Tensor, axes: tuple[str, ...], per_prompt: bool, per_position: bool,
          ) -> tuple[Tensor, tuple[str, ...]]:
    """Step 5: sum positions away (``per_position=False``) and/or average prompts (``per_prompt=False``)."""
    if not per_position:
        drop = [i for i, a in enumerate(axes) if a in ("pos", "src_pos")]
        if drop:
            scores = scores.sum(dim=drop)
            axes = tuple(a for a in axes if a not in ("pos", "src_pos"))
    if not per_prompt:
        scores = scores.mean(dim=axes.index("prompt"))
        axes = tuple(a for a in axes if a != "prompt")
    return scores, axes


@register("attribution", produces="nodes")
def attribution(model: LoadedModel, batch: PromptBatch, cfg: MethodConfig) -> MethodResult:
    """Attribution patching (AtP) for every node kind of the Attribution Patching Demo, both directions."""
    kinds = check_kinds(cfg.kinds, ATP_KINDS, "attribution")
    check_no_extra(cfg, "attribution")
    raw = atp_scores(weights(model), batch, kinds, cfg.directions)
    nodes = []
    for (direction, kind), (s, axes) in raw.items():
        s, axes = views(s, axes, cfg.per_prompt, cfg.per_position)
        nodes.append(NodeScores(kind, direction, s.detach().float().cpu(), axes))
    return MethodResult(nodes=nodes)
