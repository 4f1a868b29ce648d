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
5. Views (``core.views``): ``per_position=False`` sums the ``pos`` (and ``src_pos``) axes — the demo's
   "all positions", "block every" and "head every" views; ``per_prompt=False`` takes the mean over prompts.

Scores are reduced and accumulated in float32 whatever the model's dtype (``core.wide``).

Node kinds (``cfg.kinds``, default all): ``embed`` (token embedding), ``pos_embed``, ``resid_pre``,
``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out`` (layer, pos); ``head_out`` (z), ``head_q``,
``head_k``, ``head_v`` (layer, head, pos); ``head_pattern`` (layer, head, pos, src_pos). ``pos_embed``
scores are zero whenever clean and corrupted prompts have equal lengths (the positions agree); they are
kept because the demo shows them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import einsum
from torch import Tensor

from attrpatch.components import HEAD_VECTOR_KINDS, NODE_KINDS
from attrpatch.engine import Recorder, Weights, forward, weights
from attrpatch.methods import MethodConfig, register, register_cost
from attrpatch.methods.core import (
    RUN_AND_PATCH,
    Cost,
    Work,
    activation_bytes,
    as_scores,
    forward_flops,
    node_rows,
    run_and_patch_names,
    tokens_of,
    views,
    wide,
)
from attrpatch.metrics import final_logit_diff
from attrpatch.models import LoadedModel
from attrpatch.scores import MethodResult, NodeScores
from attrpatch.tasks import PromptBatch

EMBED_KINDS = ("embed", "pos_embed")
ATP_KINDS = NODE_KINDS  # every node kind of the vocabulary

Metric = Callable[[Tensor, PromptBatch], Tensor]

# Step 4: one contraction per kind (per layer; the layer results are stacked). The axis names of the site
# tensors (``components.py``) and the score axes they leave.
_SITE_AXES = {
    **{k: "prompt pos d_model" for k in NODE_KINDS if k not in (*HEAD_VECTOR_KINDS, "head_pattern")},
    **{k: "prompt pos head d_head" for k in HEAD_VECTOR_KINDS},
    "head_pattern": "prompt head pos src_pos",
}
_SCORE_AXES = {
    **{k: "prompt pos" for k in _SITE_AXES},
    **{k: "prompt head pos" for k in HEAD_VECTOR_KINDS},
    "head_pattern": "prompt head pos src_pos",
}


def contract(kind: str, grads: dict, run: dict, patch: dict, n_layers: int) -> tuple[Tensor, tuple[str, ...]]:
    """Step 4 for one kind: Σ_d g · (a_patch − a_run) for every prompt, layer, head and position, in ``acc_dtype``.

    Layer by layer (stacking the inputs first would copy every activation once more)."""
    spec = f"{_SITE_AXES[kind]}, {_SITE_AXES[kind]} -> {_SCORE_AXES[kind]}"
    axes = tuple(_SCORE_AXES[kind].split())
    if kind in EMBED_KINDS:
        key = (kind, 0)
        return einsum(wide(grads[key]), wide(patch[key] - run[key]), spec), axes
    per_layer = [einsum(wide(grads[(kind, layer)]), wide(patch[(kind, layer)] - run[(kind, layer)]), spec)
                 for layer in range(n_layers)]
    return torch.stack(per_layer, dim=1), (axes[0], "layer", *axes[1:])


def atp_scores(w: Weights, batch: PromptBatch, kinds: tuple[str, ...] = ATP_KINDS,
               directions: tuple[str, ...] = ("denoise",), metric: Metric = final_logit_diff,
               ) -> dict[tuple[str, str], tuple[Tensor, tuple[str, ...]]]:
    """Steps 1–4 on any engine weights: ``{(direction, kind): (scores, axes)}``, per prompt and position.

    ``metric(engine_logits, batch) -> [batch]`` is differentiated; the method uses the logit difference.
    """
    for d in directions:
        run_and_patch_names(d)
    differentiated = {RUN_AND_PATCH[d][0] for d in directions}
    acts: dict[str, Recorder] = {}
    grads: dict[str, dict[tuple[str, int], Tensor]] = {}
    for which in ("clean", "corrupt"):  # steps 1 and 2: the two forwards
        grad = which in differentiated
        sites = Recorder(kinds, leaves=grad)
        with torch.set_grad_enabled(grad):
            logits = forward(w, tokens_of(batch, which).to(w.device), batch.answer_pos, sites)
        acts[which] = sites
        if grad:  # step 3: one backward per differentiated run, for every site at once
            keys = list(sites.acts)
            g = torch.autograd.grad(metric(logits, batch).sum(), [sites.acts[k] for k in keys])
            grads[which] = dict(zip(keys, g, strict=True))
    out = {}
    with torch.no_grad():
        for d in directions:
            run, patch = RUN_AND_PATCH[d]
            for kind in kinds:  # step 4
                out[(d, kind)] = contract(kind, grads[run], acts[run].acts, acts[patch].acts, w.n_layers)
    return out


@register("attribution", produces="nodes", kinds=ATP_KINDS)
def attribution(model: LoadedModel, batch: PromptBatch, cfg: MethodConfig) -> MethodResult:
    """Attribution patching (AtP) for every node kind of the Attribution Patching Demo, both directions."""
    kinds = cfg.kinds or ATP_KINDS
    raw = atp_scores(weights(model), batch, tuple(k for k in ATP_KINDS if k in kinds), cfg.directions)
    nodes = []
    for (direction, kind), (s, axes) in raw.items():
        s, axes = views(s, axes, cfg.per_prompt, cfg.per_position)
        nodes.append(NodeScores(kind, direction, as_scores(s), axes))
    return MethodResult(nodes=nodes)


def _cells(shape, kind: str) -> int:
    if kind in EMBED_KINDS:
        return 1
    if kind in (*HEAD_VECTOR_KINDS, "head_pattern"):
        return shape.n_layers * shape.n_heads
    return shape.n_layers


def site_bytes(w: Work, kinds: tuple[str, ...]) -> int:
    """Bytes of the recorded sites of one run over the shard (the pattern is [head, pos, pos] per layer)."""
    S, n, P = w.shape, w.n, w.P
    per = 0
    for kind in kinds:
        if kind == "head_pattern":
            per += S.n_layers * S.n_heads * P * P
        else:
            per += _cells(S, kind) * P * (S.d_head if kind in HEAD_VECTOR_KINDS else S.d_model)
    return w.dtype_bytes * n * per


@register_cost("attribution")
def attribution_cost(w: Work, cfg: MethodConfig) -> Cost:
    kinds = cfg.kinds or ATP_KINDS
    rows = len(cfg.directions) * sum(node_rows(w, cfg.per_prompt, cfg.per_position, _cells(w.shape, k),
                                               pattern=k == "head_pattern") for k in kinds)
    n_grad = len({RUN_AND_PATCH[d][0] for d in cfg.directions})
    flops = forward_flops(w.shape, w.n, w.P) * (2 + 2 * n_grad)
    fixed = site_bytes(w, kinds) * (2 + n_grad) + n_grad * w.n * activation_bytes(w.shape, w.P, w.dtype_bytes, True)
    return Cost({"nodes": rows}, forward_rows=w.n * (2 + 2 * n_grad), flops=flops, fixed_bytes=fixed, peak_bytes=fixed)
