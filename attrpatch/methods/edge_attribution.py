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
4. Chunk the prompts so that one pass's split activations and gradients fit ``MEMORY_BUDGET``.

Config read: ``directions``, ``per_prompt``, ``per_position``, ``max_rows`` (prompts per pass at most).
``kinds`` is not read: edge methods score every edge.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from attrpatch.engine import Weights, forward, weights
from attrpatch.graph import SRC_SITES, EdgeGraph, source_writes
from attrpatch.methods import MethodConfig, register
from attrpatch.metrics import ids_logit_diff
from attrpatch.models import LoadedModel
from attrpatch.scores import EdgeScores, MethodResult
from attrpatch.tasks import PromptBatch

# Bytes one pass may hold in split activations and target gradients: with gpt2-xl's 6.2 GB of fp32 weights
# this keeps EAP under ~12 GB on the 24 GiB CPU host (bench/bench_edges_xl_memory.py measures it).
MEMORY_BUDGET = 4 * 2**30
DST_SITES = ("head_q_in", "head_k_in", "head_v_in", "mlp_in")


def score_axes(per_prompt: bool, per_position: bool) -> tuple[str, ...]:
    return ("prompt",) * per_prompt + ("pos",) * per_position + ("src", "dst")


def run_and_patch(batch: PromptBatch, direction: str) -> tuple[Tensor, Tensor]:
    """(run tokens, patch tokens): denoise runs corrupted and patches clean; noise the reverse."""
    if direction == "denoise":
        return batch.corrupt_tokens, batch.clean_tokens
    return batch.clean_tokens, batch.corrupt_tokens


def rows_per_pass(w: Weights, n_pos: int, max_rows: int, budget: int = MEMORY_BUDGET) -> int:
    """Step 4: rows (prompts, or prompts × IG steps) one split forward+backward may take.

    Per row and position a pass holds, in floats of d_model: the LayerNorm inputs and outputs of every
    head's q/k/v input (6 · n_layers · n_heads), the target gradients (n_dst) and the source writes and
    their changes (3 · n_src), plus the ordinary activations (~12 · n_layers)."""
    g = EdgeGraph.of(w)
    per_row = 4 * n_pos * w.d_model * (6 * w.n_layers * w.n_heads + 12 * w.n_layers + g.n_dst + 3 * g.n_src)
    return max(1, min(max_rows, budget // per_row))


@torch.no_grad()
def run_sources(w: Weights, tokens: Int[Tensor, "batch pos"], answer_pos: Int[Tensor, " batch"]
                ) -> Float[Tensor, "batch pos src d_model"]:
    """Step 1: every source's write on one input (no gradients, no split)."""
    acts: dict[tuple[str, int], Tensor] = {}

    def keep(kind: str, layer: int, x: Tensor) -> Tensor:
        if kind in SRC_SITES:
            acts[(kind, layer)] = x
        return x

    forward(w, tokens, answer_pos, keep)
    return source_writes(w, acts)


def target_grads(w: Weights, tokens: Int[Tensor, "rows pos"], answer_pos: Int[Tensor, " rows"],
                 answer_ids: Int[Tensor, " batch"], wrong_ids: Int[Tensor, " batch"],
                 embed: Callable[[Tensor], Tensor] | None = None
                 ) -> tuple[Float[Tensor, "rows pos src d_model"], list[Float[Tensor, "rows pos dst d_model"]]]:
    """Step 2: the source writes of a run and ∂metric/∂(input of every target), one block per layer.

    ``embed`` optionally replaces the token embedding (EAP-IG interpolates it). Block ``L`` holds the
    targets ``EdgeGraph.dst_block(L)`` (q heads, k heads, v heads, mlp_in); the last block is logits."""
    acts: dict[tuple[str, int], Tensor] = {}

    def edit(kind: str, layer: int, x: Tensor) -> Tensor:
        if kind == "embed":
            x = (x if embed is None else embed(x)).detach().requires_grad_(True)
        if kind in SRC_SITES or kind in DST_SITES or kind == "logits":
            acts[(kind, layer)] = x
        return x

    with torch.enable_grad():
        logits = forward(w, tokens, answer_pos, edit, split=True)
        metric = ids_logit_diff(logits, answer_ids, wrong_ids).sum()
        sites = [acts[(s, layer)] for layer in range(w.n_layers) for s in DST_SITES] + [acts[("logits", w.n_layers)]]
        grads = torch.autograd.grad(metric, sites)
    blocks = [torch.cat([*grads[4 * layer: 4 * layer + 3], grads[4 * layer + 3][:, :, None]], dim=2)
              for layer in range(w.n_layers)]
    blocks.append(grads[-1][:, :, None])
    with torch.no_grad():
        src = source_writes(w, {k: v.detach() for k, v in acts.items() if k[0] in SRC_SITES})
    return src, blocks


def contract(graph: EdgeGraph, delta: Float[Tensor, "rows pos src d_model"],
             blocks: list[Float[Tensor, "rows pos dst d_model"]], out: Tensor, per_prompt: bool,
             per_position: bool) -> None:
    """Step 3: ``out[..., src, dst] += Σ (a_patch − a_run) · grad``, one einsum per block of targets.

    Only the sources upstream of a block (a prefix of the sources) enter its einsum; ``out`` has the axes
    ``score_axes(per_prompt, per_position)`` with the prompt axis already sliced to these rows."""
    for layer, grad in enumerate(blocks):
        n_src = graph.n_src if layer == graph.n_layers else graph.n_src_before_mlp(layer)
        # Batched over (prompt, pos) with no copies, then reduced: 4x faster than contracting the sums in
        # the einsum, which makes torch copy both operands into [src|dst, prompt·pos·d_model] layout.
        cell = torch.einsum("bpsd,bptd->bpst", delta[:, :, :n_src], grad)
        if not per_position:
            cell = cell.sum(1)
        if not per_prompt:
            cell = cell.sum(0)
        out[..., :n_src, graph.dst_block(layer)] += cell


def finish(graph: EdgeGraph, out: Tensor, n_prompts: int, per_prompt: bool) -> Tensor:
    """Zero the cells that are not edges (e.g. a head into its own layer's q) and average over prompts."""
    out = out.masked_fill(~graph.valid.to(out.device), 0)
    return out if per_prompt else out / n_prompts


def empty_scores(graph: EdgeGraph, batch: PromptBatch, per_prompt: bool, per_position: bool,
                 dtype: torch.dtype, device: torch.device) -> Tensor:
    shape = (len(batch),) * per_prompt + (batch.n_pos,) * per_position + (graph.n_src, graph.n_dst)
    return torch.zeros(shape, dtype=dtype, device=device)


def eap_scores(w: Weights, batch: PromptBatch, directions: tuple[str, ...] = ("denoise",),
               per_prompt: bool = True, per_position: bool = True, max_rows: int = 256,
               budget: int = MEMORY_BUDGET) -> dict[str, Tensor]:
    """Steps 1–4 for each direction: ``{direction: scores}`` with axes ``score_axes(per_prompt, per_position)``."""
    graph = EdgeGraph.of(w)
    out = {d: empty_scores(graph, batch, per_prompt, per_position, w.W_E.dtype, w.device) for d in directions}
    rows = rows_per_pass(w, batch.n_pos, max_rows, budget)
    for start in range(0, len(batch), rows):
        part = batch.select(range(start, min(start + rows, len(batch))))
        sources: dict[int, Tensor] = {}  # id of the token tensor → its source writes (reused across directions)
        for direction in directions:
            run, patch = run_and_patch(part, direction)
            src_run, blocks = target_grads(w, run, part.answer_pos, part.answer_ids, part.wrong_ids)
            sources[id(run)] = src_run
            if id(patch) not in sources:
                sources[id(patch)] = run_sources(w, patch, part.answer_pos)
            target = out[direction][start:start + len(part)] if per_prompt else out[direction]
            if per_position:  # a shard is trimmed to its own longest prompt
                target = target[..., : part.n_pos, :, :]
            with torch.no_grad():
                contract(graph, sources[id(patch)] - src_run, blocks, target, per_prompt, per_position)
            del blocks
    return {d: finish(graph, s, len(batch), per_prompt) for d, s in out.items()}


@register("edge_attribution", produces="edges")
def edge_attribution(model: LoadedModel, batch: PromptBatch, cfg: MethodConfig) -> MethodResult:
    """Edge attribution patching (EAP, Syed et al. 2023): every edge from one forward+backward per direction."""
    w = weights(model)
    graph = EdgeGraph.of(w)
    scores = eap_scores(w, batch, cfg.directions, cfg.per_prompt, cfg.per_position, cfg.max_rows)
    axes = score_axes(cfg.per_prompt, cfg.per_position)
    return MethodResult(edges=[EdgeScores(d, graph.index(), s, axes) for d, s in scores.items()])
