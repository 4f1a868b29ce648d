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

Scores are reduced and accumulated in float32 whatever the model's dtype (``core.wide``). Steps 1–4 are
``core.atp_forwards`` and ``core.contract_nodes`` (``core.atp_scores``), shared with AtP* and RelP.

Node kinds (``cfg.kinds``, default all): ``embed`` (token embedding), ``pos_embed``, ``resid_pre``,
``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out`` (layer, pos); ``head_out`` (z), ``head_q``,
``head_k``, ``head_v`` (layer, head, pos); ``head_pattern`` (layer, head, pos, src_pos). ``pos_embed``
scores are zero whenever clean and corrupted prompts have equal lengths (the positions agree); they are
kept because the demo shows them.
"""

from __future__ import annotations

from attrpatch.engine import weights
from attrpatch.methods import MethodConfig, register, register_cost
from attrpatch.methods.core import (  # noqa: F401  (atp_scores, EMBED_KINDS: this module's public names)
    ATP_KINDS,
    EMBED_KINDS,
    Cost,
    Work,
    as_scores,
    atp_cost,
    atp_scores,
    views,
)
from attrpatch.models import LoadedModel
from attrpatch.scores import MethodResult, NodeScores
from attrpatch.tasks import PromptBatch


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


@register_cost("attribution")
def attribution_cost(w: Work, cfg: MethodConfig) -> Cost:
    return atp_cost(w, cfg, tuple(cfg.kinds or ATP_KINDS))
