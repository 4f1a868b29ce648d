"""Edge attribution patching (EAP): a score for every edge of the GPT-2 graph from one backward pass.

    python -c "from attrpatch import load_model, make_batch; from attrpatch.methods import run_method; m = load_model('ioi-tiny'); print(run_method('edge_attribution', m, make_batch('ioi', m.tokenizer, 8)).edges[0].scores.shape)"

Algorithm (Syed, Rager & Conmy 2023, "Attribution Patching Outperforms Automated Circuit Discovery",
arXiv:2310.10348; the edge form of Nanda's attribution patching). Graph and order: ``attrpatch.graph``.

1. Run the patch input without gradients and keep every source's residual write a_src,patch.
2. Run the run input through the engine with ``split=True`` (every head's q/k/v input and the MLP input are
   separate tensors), keep a_src,run, and take ∂metric/∂(input of every target) with one
   ``torch.autograd.grad`` over all target sites (the metric is summed over prompts; prompts never mix).
3. For each block of targets (one layer's q/k/v inputs and its mlp_in; then logits) contract the changes of
   the sources upstream of the block with the block's gradients in one einsum:

       score(src → dst) = Σ_pos (a_src,patch − a_src,run)[pos] · ∂metric/∂(input of dst)[pos]

   kept per prompt and/or per position when asked (otherwise mean over prompts, sum over positions).
   Direction ``denoise`` runs the corrupted prompt and patches clean; ``noise`` the reverse.
4. Chunk the prompts so that one pass's split activations and gradients fit the memory budget
   (``core.rows_per_pass``).

Steps 1–4 are the shared EAP loop ``core.edge_scores``; EAP's step 2 is ``core.plain_grads`` (EAP-IG
differs only there). Config read: ``directions``, ``per_prompt``, ``per_position``, ``max_rows`` (prompts
per pass at most). ``kinds`` is not read: edge methods score every edge.
"""

from __future__ import annotations

from attrpatch.engine import weights
from attrpatch.graph import EdgeGraph
from attrpatch.methods import MethodConfig, register, register_cost
from attrpatch.methods.core import Cost, Work, as_scores, edge_axes, edge_loop_cost, edge_scores, plain_grads
from attrpatch.models import LoadedModel
from attrpatch.scores import EdgeScores, MethodResult
from attrpatch.tasks import PromptBatch


@register("edge_attribution", produces="edges")
def edge_attribution(model: LoadedModel, batch: PromptBatch, cfg: MethodConfig) -> MethodResult:
    """Edge attribution patching (EAP, Syed et al. 2023): every edge from one forward+backward per direction."""
    w = weights(model)
    scores = edge_scores(w, batch, plain_grads, cfg.directions, cfg.per_prompt, cfg.per_position, cfg.max_rows)
    index = EdgeGraph.of(w).index()
    axes = edge_axes(cfg.per_prompt, cfg.per_position)
    return MethodResult(edges=[EdgeScores(d, index, as_scores(s), axes) for d, s in scores.items()])


@register_cost("edge_attribution")
def edge_attribution_cost(w: Work, cfg: MethodConfig) -> Cost:
    return edge_loop_cost(w, cfg, n_grad_rows=w.n)
