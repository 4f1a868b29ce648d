"""What the methods share, in one place: directions, the memory budget, views, and the EAP loop.

    python -c "from attrpatch.methods.core import run_and_patch, memory_budget; import torch; print(memory_budget(torch.device('cpu')) // 2**20, 'MiB')"

Every method imports this module and the registry (``attrpatch.methods``); no method imports another.

* **Directions.** ``denoise`` runs the corrupted prompt and patches clean activations (TransformerLens'
  ``patching``); ``noise`` runs the clean prompt and patches corrupted ones. ``run_and_patch`` is the one
  mapping.
* **Memory.** One budget for every chunked computation: the memory the device has free when a method
  asks (``torch.cuda.mem_get_info`` on CUDA, available RAM on a CPU), times this worker's share of the
  device (``device_share``: several fractional-GPU workers divide a GPU), less a safety margin, times the
  current ``budget_scale`` (halved on each out-of-memory retry, ``retry_on_oom``). ``rows_per_pass``
  turns a method's bytes per row into rows per pass.
* **Views.** ``views`` sums positions away and/or averages prompts, the same way for every node method.
* **The AtP passes** (``atp_forwards``, ``contract_nodes``, ``atp_scores``): the patch forward, the run
  forward with autograd (optionally under the engine's LRP ``rules``) and one backward to every site, and
  the per-kind contraction Σ_d g · (a_patch − a_run). Steps 1–4 of ``attribution.py``; AtP* and RelP build
  on the same passes.
* **The EAP loop** (``edge_scores``): chunk the prompts, compute the source changes of each direction and
  contract them with the target gradients a method supplies (EAP: at the run input; EAP-IG: averaged
  along the interpolation path; edge RelP: under the LRP rules). Steps 1–4 of ``edge_attribution.py``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from einops import einsum
from jaxtyping import Float, Int
from torch import Tensor

from attrpatch.components import DST_INPUT_SITE, HEAD_VECTOR_KINDS, NODE_KINDS, QKV_INPUT_SITES
from attrpatch.engine import Recorder, Weights, forward
from attrpatch.graph import SRC_SITES, EdgeGraph, source_writes
from attrpatch.methods import MethodError
from attrpatch.metrics import final_logit_diff
from attrpatch.tasks import PromptBatch

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------- directions

RUN_AND_PATCH = {"denoise": ("corrupt", "clean"), "noise": ("clean", "corrupt")}  # direction → (run, patch)


def tokens_of(batch: PromptBatch, which: str) -> Int[Tensor, "batch pos"]:
    """The clean or corrupted tokens of a batch."""
    return batch.clean_tokens if which == "clean" else batch.corrupt_tokens


def run_and_patch_names(direction: str) -> tuple[str, str]:
    """("corrupt", "clean") for denoise, ("clean", "corrupt") for noise: which prompt runs, which is patched in."""
    if direction not in RUN_AND_PATCH:
        raise MethodError(f"unknown direction {direction!r}: use 'denoise' (run corrupted, patch clean) or 'noise'")
    return RUN_AND_PATCH[direction]


def run_and_patch(batch: PromptBatch, direction: str) -> tuple[Tensor, Tensor]:
    """(run tokens, patch tokens) of a direction: denoise runs corrupted and patches clean; noise the reverse."""
    run, patch = run_and_patch_names(direction)
    return tokens_of(batch, run), tokens_of(batch, patch)


# --------------------------------------------------------------------------------------- memory

SAFETY_MARGIN = 0.25  # of the free memory, left for the allocator's fragmentation and the framework itself
_state = {"share": 1.0, "scale": 1.0}


@contextlib.contextmanager
def device_share(share: float) -> Iterator[None]:
    """Methods run inside see ``share`` of the device's free memory (a fractional-GPU worker's share)."""
    if not 0 < share <= 1:
        raise ValueError(f"device share must be in (0, 1], got {share}")
    old = _state["share"]
    _state["share"] = share
    try:
        yield
    finally:
        _state["share"] = old


@contextlib.contextmanager
def budget_scale(scale: float) -> Iterator[None]:
    """Multiply every budget by ``scale`` (``retry_on_oom`` halves it)."""
    old = _state["scale"]
    _state["scale"] = scale
    try:
        yield
    finally:
        _state["scale"] = old


def free_memory(device: torch.device) -> int:
    """Bytes the device can still allocate: CUDA's free memory plus what torch's cache holds; on a CPU the
    operating system's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    import psutil

    return int(psutil.virtual_memory().available)


def memory_budget(device: torch.device) -> int:
    """Bytes one pass of a chunked computation may hold (see the module docstring)."""
    return int(free_memory(device) * _state["share"] * (1 - SAFETY_MARGIN) * _state["scale"])


def rows_per_pass(bytes_per_row: int, max_rows: int, device: torch.device) -> int:
    """Rows (prompts, patched copies, circuit × prompt rows) one pass may take: within the budget and
    ``max_rows`` (both scaled down on out-of-memory retries), at least one."""
    cap = max(1, int(max_rows * _state["scale"]))
    return max(1, min(cap, memory_budget(device) // max(1, bytes_per_row)))


def retry_on_oom(fn: Callable[[], object], what: str, max_halvings: int = 10):
    """Run ``fn``; on an out-of-memory error halve the budget (and so every chunk) and run it again, up to
    ``max_halvings`` times. Logged once per call."""
    scale = _state["scale"]
    for attempt in range(max_halvings + 1):
        try:
            with budget_scale(scale):
                return fn()
        except torch.OutOfMemoryError:
            if attempt == max_halvings:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            scale /= 2
            if attempt == 0:
                log.warning("%s: out of memory; halving the chunk size and retrying (smaller passes, same "
                            "scores)", what)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------- progress

_reporter: list[Callable[[float], None]] = []


@contextlib.contextmanager
def reporting(callback: Callable[[float], None]) -> Iterator[None]:
    """Inside the block, methods report the fraction of their work done (0 … 1) to ``callback``."""
    _reporter.append(callback)
    try:
        yield
    finally:
        _reporter.pop()


def report(done: float, total: float) -> None:
    """A method's progress inside a cell (cheap: call it once per pass or chunk)."""
    if _reporter and total > 0:
        _reporter[-1](min(1.0, done / total))


# --------------------------------------------------------------------------------------- kinds and views

def check_kinds(kinds: tuple[str, ...] | None, allowed: tuple[str, ...], method: str) -> tuple[str, ...]:
    """The requested kinds in vocabulary order, or one error naming the bad ones and the allowed set."""
    if kinds is None:
        return allowed
    bad = [k for k in kinds if k not in allowed]
    if bad or not kinds:
        raise MethodError(f"method {method!r} scores the kinds {list(allowed)}; got {list(kinds)}: "
                          f"pass kinds as a non-empty subset of those (or None for all)")
    return tuple(k for k in allowed if k in kinds)


def views(scores: Tensor, axes: tuple[str, ...], per_prompt: bool, per_position: bool,
          ) -> tuple[Tensor, tuple[str, ...]]:
    """Sum positions away (``per_position=False``) and/or average prompts (``per_prompt=False``)."""
    if not per_position:
        drop = [i for i, a in enumerate(axes) if a in ("pos", "src_pos")]
        if drop:
            scores = scores.sum(dim=drop)
            axes = tuple(a for a in axes if a not in ("pos", "src_pos"))
    if not per_prompt:
        scores = scores.mean(dim=axes.index("prompt"))
        axes = tuple(a for a in axes if a != "prompt")
    return scores, axes


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores are reduced and accumulated in: float32 for float32 and lower precisions, float64
    for a float64 model (tests use one to measure algorithms, not rounding)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def wide(x: Tensor) -> Tensor:
    """``x`` in its accumulation dtype (bfloat16 / float16 → float32; float32 and float64 unchanged)."""
    return x.to(acc_dtype(x.dtype))


def as_scores(x: Tensor) -> Tensor:
    """Scores leave a method on the CPU in their accumulation dtype (already reduced in it)."""
    return x.detach().cpu()


# --------------------------------------------------------------------------------------- the AtP passes

EMBED_KINDS = ("embed", "pos_embed")
ATP_KINDS = NODE_KINDS  # every node kind of the vocabulary

Metric = Callable[[Tensor, PromptBatch], Tensor]

# One contraction per kind (per layer; the layer results are stacked). The axis names of the site tensors
# (``components.py``) and the score axes they leave.
SITE_AXES = {
    **{k: "prompt pos d_model" for k in NODE_KINDS if k not in (*HEAD_VECTOR_KINDS, "head_pattern")},
    **{k: "prompt pos head d_head" for k in HEAD_VECTOR_KINDS},
    "head_pattern": "prompt head pos src_pos",
}
SCORE_AXES = {
    **{k: "prompt pos" for k in SITE_AXES},
    **{k: "prompt head pos" for k in HEAD_VECTOR_KINDS},
    "head_pattern": "prompt head pos src_pos",
}

Sites = dict[tuple[str, int], Tensor]  # (kind, layer) → a site's tensor (activation or gradient)


def node_axes(kind: str) -> tuple[str, ...]:
    """The axes of a kind's stacked node scores: ``SCORE_AXES`` with ``layer`` after ``prompt`` (not for
    the embeddings)."""
    axes = tuple(SCORE_AXES[kind].split())
    return axes if kind in EMBED_KINDS else (axes[0], "layer", *axes[1:])


def contract_nodes(kind: str, grads: Sites, run: Sites, patch: Sites, n_layers: int,
                   ) -> tuple[Tensor, tuple[str, ...]]:
    """Σ_d g · (a_patch − a_run) for every prompt, layer, head and position of one kind, in ``acc_dtype``.

    Layer by layer (stacking the inputs first would copy every activation once more)."""
    spec = f"{SITE_AXES[kind]}, {SITE_AXES[kind]} -> {SCORE_AXES[kind]}"
    if kind in EMBED_KINDS:
        key = (kind, 0)
        return einsum(wide(grads[key]), wide(patch[key] - run[key]), spec), node_axes(kind)
    per_layer = [einsum(wide(grads[(kind, layer)]), wide(patch[(kind, layer)] - run[(kind, layer)]), spec)
                 for layer in range(n_layers)]
    return torch.stack(per_layer, dim=1), node_axes(kind)


def atp_forwards(w: Weights, batch: PromptBatch, sites: tuple[str, ...], directions: tuple[str, ...],
                 metric: Metric = final_logit_diff, rules: frozenset[str] | None = None,
                 retain_graph: bool = False) -> tuple[dict[str, Sites], dict[str, Sites]]:
    """AtP's passes: ``({"clean"|"corrupt": activations}, {run: gradients})`` at every site of ``sites``.

    1. The patch prompt runs forward without a graph (unless another direction differentiates it).
    2. The run prompt runs forward with autograd (token and position embeddings made leaves, so the graph
       reaches every site), under the engine's LRP ``rules`` when given (values unchanged).
    3. One backward per differentiated run for every site at once: ``∂ Σ_prompts metric / ∂ site``.
       Prompts do not interact, so this is each prompt's own gradient; positions after a prompt's answer
       get 0 by causality. A site the metric does not reach gets a zero gradient. ``retain_graph`` keeps
       the run's graph alive for further backwards (AtP*'s GradDrop) through the returned activations.

    ``metric(engine_logits, batch) -> [batch]``; the methods use the logit difference."""
    for d in directions:
        run_and_patch_names(d)
    differentiated = {RUN_AND_PATCH[d][0] for d in directions}
    acts: dict[str, Sites] = {}
    grads: dict[str, Sites] = {}
    for which in ("clean", "corrupt"):
        grad = which in differentiated
        rec = Recorder(sites, leaves=grad)
        with torch.set_grad_enabled(grad):
            logits = forward(w, tokens_of(batch, which).to(w.device), batch.answer_pos, rec,
                             rules=rules if grad else None)
        acts[which] = rec.acts
        if grad:
            keys = list(rec.acts)
            g = torch.autograd.grad(metric(logits, batch).sum(), [rec.acts[k] for k in keys],
                                    retain_graph=retain_graph, allow_unused=True)
            grads[which] = {k: torch.zeros_like(rec.acts[k]) if gk is None else gk
                            for k, gk in zip(keys, g, strict=True)}
    return acts, grads


def atp_scores(w: Weights, batch: PromptBatch, kinds: tuple[str, ...] = ATP_KINDS,
               directions: tuple[str, ...] = ("denoise",), metric: Metric = final_logit_diff,
               rules: frozenset[str] | None = None) -> dict[tuple[str, str], tuple[Tensor, tuple[str, ...]]]:
    """AtP (``rules`` None) or RelP (LRP ``rules``) on any engine weights: ``{(direction, kind): (scores,
    axes)}``, per prompt and position: ``atp_forwards`` then ``contract_nodes`` per kind."""
    acts, grads = atp_forwards(w, batch, kinds, directions, metric, rules)
    out = {}
    with torch.no_grad():
        for d in directions:
            run, patch = RUN_AND_PATCH[d]
            for kind in kinds:
                out[(d, kind)] = contract_nodes(kind, grads[run], acts[run], acts[patch], w.n_layers)
    return out


# --------------------------------------------------------------------------------------- the EAP loop

def edge_axes(per_prompt: bool, per_position: bool) -> tuple[str, ...]:
    return ("prompt",) * per_prompt + ("pos",) * per_position + ("src", "dst")


def edge_bytes_per_row(w: Weights, n_pos: int) -> int:
    """Memory of one prompt (row) in a split forward+backward: per position, in floats of d_model, the
    LayerNorm inputs and outputs of every head's q/k/v input (6 · n_layers · n_heads), the target gradients
    (n_dst), the source writes and their changes (3 · n_src), the ordinary activations (~12 · n_layers)."""
    g = EdgeGraph.of(w)
    floats = 6 * w.n_layers * w.n_heads + 12 * w.n_layers + g.n_dst + 3 * g.n_src
    return w.W_E.element_size() * n_pos * w.d_model * floats


@torch.no_grad()
def run_sources(w: Weights, tokens: Int[Tensor, "batch pos"], answer_pos: Int[Tensor, " batch"]
                ) -> Float[Tensor, "batch pos src d_model"]:
    """Step 1: every source's write on one input (no gradients, no split)."""
    rec = Recorder(SRC_SITES)
    forward(w, tokens, answer_pos, rec)
    return source_writes(w, rec.acts)


TargetGrads = list[Float[Tensor, "rows pos dst d_model"]]


def target_grads(w: Weights, tokens: Int[Tensor, "rows pos"], answer_pos: Int[Tensor, " rows"],
                 answer_ids: Int[Tensor, " batch"], wrong_ids: Int[Tensor, " batch"],
                 embed: Callable[[Tensor], Tensor] | None = None, rules: frozenset[str] | None = None,
                 ) -> tuple[Float[Tensor, "rows pos src d_model"], TargetGrads]:
    """Step 2: the source writes of a run and ∂metric/∂(input of every target), one block per layer.

    ``embed`` optionally replaces the token embedding (EAP-IG interpolates it); ``rules``: the engine's LRP
    rules for the backward (edge RelP). Block ``L`` holds the targets ``EdgeGraph.dst_block(L)`` (q heads,
    k heads, v heads, mlp_in); the last block is logits."""
    dst_sites = (*QKV_INPUT_SITES, DST_INPUT_SITE["mlp_in"])

    def replace_embed(kind: str, layer: int, x: Tensor) -> Tensor:
        if kind == "embed" and embed is not None:
            x = embed(x)
        return x

    rec = Recorder((*SRC_SITES, *dst_sites, "logits"), inner=replace_embed, leaves=True)
    with torch.enable_grad():
        diff = forward(w, tokens, answer_pos, rec, split=True, diff=(answer_ids, wrong_ids), rules=rules)
        sites = [rec.acts[(s, layer)] for layer in range(w.n_layers) for s in dst_sites]
        sites.append(rec.acts[("logits", w.n_layers)])
        grads = torch.autograd.grad(diff.sum(), sites)
    blocks = [torch.cat([*grads[4 * layer: 4 * layer + 3], grads[4 * layer + 3][:, :, None]], dim=2)
              for layer in range(w.n_layers)]
    blocks.append(grads[-1][:, :, None])
    with torch.no_grad():
        src = source_writes(w, {k: v.detach() for k, v in rec.acts.items() if k[0] in SRC_SITES})
    return src, blocks


def contract_edges(graph: EdgeGraph, delta: Float[Tensor, "rows pos src d_model"], blocks: TargetGrads,
                   out: Tensor, per_prompt: bool, per_position: bool) -> None:
    """Step 3: ``out[..., src, dst] += Σ (a_patch − a_run) · grad``, one contraction per block of targets,
    reduced and accumulated in ``out``'s dtype (``acc_dtype``).

    Only the sources upstream of a block (a prefix of the sources) enter its contraction; ``out`` has the
    axes ``edge_axes(per_prompt, per_position)`` with the prompt axis already sliced to these rows."""
    for layer, grad in enumerate(blocks):
        n_src = graph.n_src if layer == graph.n_layers else graph.n_src_before_mlp(layer)
        # Batched over (prompt, pos) with no copies, then reduced: 4x faster than contracting the sums in
        # the einsum, which makes torch copy both operands into [src|dst, prompt·pos·d_model] layout.
        cell = einsum(wide(delta[:, :, :n_src]), wide(grad),
                      "prompt pos src d_model, prompt pos dst d_model -> prompt pos src dst")
        if not per_position:
            cell = cell.sum(1)
        if not per_prompt:
            cell = cell.sum(0)
        out[..., :n_src, graph.dst_block(layer)] += cell


GradFn = Callable[[Weights, PromptBatch, Tensor, Tensor, int], tuple[Tensor | None, TargetGrads]]
"""A method's step 2: ``(w, part, run_tokens, patch_tokens, rows) -> (source writes of the run or None,
target gradient blocks)``; ``rows`` is the pass size the budget allows."""


def plain_grads(w: Weights, part: PromptBatch, run: Tensor, patch: Tensor, rows: int) -> tuple[Tensor, TargetGrads]:
    """EAP's step 2: the target gradients at the run input (and the run's source writes, same forward)."""
    return target_grads(w, run, part.answer_pos, part.answer_ids, part.wrong_ids)


def edge_scores(w: Weights, batch: PromptBatch, grads: GradFn = plain_grads, directions: tuple[str, ...] = ("denoise",),
                per_prompt: bool = True, per_position: bool = True, max_rows: int = 256,
                bytes_per_row: int | None = None) -> dict[str, Tensor]:
    """Steps 1–4 of EAP for each direction with the target gradients of ``grads``: ``{direction: scores}``
    (``acc_dtype``) with axes ``edge_axes(per_prompt, per_position)``; cells that are not edges are 0."""
    graph = EdgeGraph.of(w)
    shape = (len(batch),) * per_prompt + (batch.n_pos,) * per_position + (graph.n_src, graph.n_dst)
    out = {d: torch.zeros(shape, dtype=acc_dtype(w.dtype), device=w.device) for d in directions}
    rows = rows_per_pass(bytes_per_row or edge_bytes_per_row(w, batch.n_pos), max_rows, w.device)
    for start in range(0, len(batch), rows):
        part = batch.select(range(start, min(start + rows, len(batch))))
        sources: dict[int, Tensor] = {}  # id of a token tensor → its source writes (reused across directions)
        for direction in directions:
            run, patch = run_and_patch(part, direction)
            src_run, blocks = grads(w, part, run.to(w.device), patch.to(w.device), rows)
            sources[id(run)] = src_run if src_run is not None else run_sources(w, run.to(w.device), part.answer_pos)
            if id(patch) not in sources:
                sources[id(patch)] = run_sources(w, patch.to(w.device), part.answer_pos)
            target = out[direction][start:start + len(part)] if per_prompt else out[direction]
            if per_position:  # a shard is trimmed to its own longest prompt
                target = target[..., : part.n_pos, :, :]
            with torch.no_grad():
                contract_edges(graph, sources[id(patch)] - sources[id(run)], blocks, target, per_prompt, per_position)
            del blocks
        report(start + len(part), len(batch))
    valid = graph.valid.to(w.device)
    return {d: (s.masked_fill(~valid, 0) if per_prompt else s.masked_fill(~valid, 0) / len(batch))
            for d, s in out.items()}


# --------------------------------------------------------------------------------------- cost models

@dataclass(frozen=True)
class Work:
    """What a cost model reads about one cell: the model's shape and dtype, the shard's prompt lengths, and
    per prompt the first position where its clean and corrupted tokens differ (before it, every activation
    of the two runs is equal, so exact patching skips those patches)."""

    shape: ModelShape
    lengths: tuple[int, ...]
    first_diff: tuple[int, ...]
    dtype_bytes: int = 4

    @property
    def n(self) -> int:
        return len(self.lengths)

    @property
    def P(self) -> int:
        return max(self.lengths)


@dataclass(frozen=True)
class Cost:
    """A method's predicted cost for one cell (``sweeps.plan``): rows per table (exact), patched forward rows
    (forwards of one prompt, restarts included), FLOPs, the memory it needs whatever the chunking
    (``fixed_bytes``: caches, dense scores) and at its default chunking (``peak_bytes``), both beyond the
    weights."""

    rows: dict[str, int]
    forward_rows: float
    flops: float
    fixed_bytes: int
    peak_bytes: int


def token_layer_flops(shape: ModelShape, n_keys: int) -> float:
    """FLOPs of one position through one block: q/k/v and output projections, MLP, attention over n_keys."""
    D = shape.d_model
    return 8 * D * D + 4 * D * shape.d_mlp + 4 * n_keys * D


def forward_flops(shape: ModelShape, rows: float, n_pos: int, logits: bool = True) -> float:
    """FLOPs of full forwards of ``rows`` prompts of ``n_pos`` positions (logits at the answer only)."""
    unembed = 2 * shape.d_model * shape.vocab if logits else 2 * shape.d_model
    return rows * (n_pos * shape.n_layers * token_layer_flops(shape, n_pos) + unembed)


def activation_bytes(shape: ModelShape, n_pos: int, dtype_bytes: int, grad: bool) -> int:
    """Bytes one prompt's forward keeps for a backward (``grad``) or at most at once without it."""
    D = shape.d_model
    per_token_layer = 16 * D + 2 * shape.d_mlp + 2 * shape.n_heads * n_pos
    layers = shape.n_layers if grad else 1
    return dtype_bytes * n_pos * layers * per_token_layer * (2 if grad else 1)


def node_rows(w: Work, per_prompt: bool, per_position: bool, cells: int, pattern: bool = False) -> int:
    """Rows ``scores.node_table`` writes for ``cells`` components (layers × heads …) of one kind: one per real
    position (per causal dest × src cell for a pattern) per prompt, or one per position of the longest
    prompt for shard means."""
    if not per_position:
        return cells * (w.n if per_prompt else 1)
    per = [p * (p + 1) // 2 if pattern else p for p in w.lengths] if per_prompt else \
        [w.P * (w.P + 1) // 2 if pattern else w.P]
    return cells * sum(per)


def node_cells(shape: ModelShape, kind: str) -> int:
    """Components of one kind (layers × heads …), positions aside."""
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
            per += node_cells(S, kind) * P * (S.d_head if kind in HEAD_VECTOR_KINDS else S.d_model)
    return w.dtype_bytes * n * per


def atp_cost(w: Work, cfg, kinds: tuple[str, ...], backwards: float = 1.0, sites: tuple[str, ...] | None = None,
             ) -> Cost:
    """The cost of the AtP passes: rows of ``kinds`` per direction, two forwards and ``backwards`` backwards
    (each ~2 forwards) per differentiated run, the recorded ``sites`` (default ``kinds``) of both runs and
    their gradients, and the run's graph."""
    rows = len(cfg.directions) * sum(node_rows(w, cfg.per_prompt, cfg.per_position, node_cells(w.shape, k),
                                               pattern=k == "head_pattern") for k in kinds)
    n_grad = len({RUN_AND_PATCH[d][0] for d in cfg.directions})
    flops = forward_flops(w.shape, w.n, w.P) * (2 + 2 * backwards * n_grad)
    fixed = site_bytes(w, sites or kinds) * (2 + n_grad) \
        + n_grad * w.n * activation_bytes(w.shape, w.P, w.dtype_bytes, True)
    return Cost({"nodes": rows}, forward_rows=w.n * (2 + 2 * backwards * n_grad), flops=flops, fixed_bytes=fixed,
                peak_bytes=fixed)


def edge_rows(w: Work, n_edges: int, per_prompt: bool, per_position: bool) -> int:
    """Rows ``scores.edge_table`` writes for ``n_edges`` edges of one direction."""
    if per_position:
        return n_edges * (sum(w.lengths) if per_prompt else w.P)
    return n_edges * (w.n if per_prompt else 1)


def contraction_flops(w: Work) -> float:
    """FLOPs of step 3 of the EAP loop for one direction: every (prompt, position, upstream source, target)."""
    S = w.shape
    g = EdgeGraph(S.n_layers, S.n_heads)
    pairs = sum(g.n_src_before_mlp(layer) * g.per_layer_dst for layer in range(S.n_layers)) + g.n_src
    return 2.0 * w.n * w.P * pairs * S.d_model


def edge_loop_cost(w: Work, cfg, n_grad_rows: float) -> Cost:
    """The EAP loop's cost: ``n_grad_rows`` split forward+backward prompt rows per direction (1 per prompt for
    EAP, ``ig_steps`` for EAP-IG), the source forwards and the contraction; dense scores are fixed memory."""
    S = w.shape
    g = EdgeGraph(S.n_layers, S.n_heads)
    d = len(cfg.directions)
    rows = d * edge_rows(w, g.n_edges, cfg.per_prompt, cfg.per_position)
    flops = d * (3 * n_grad_rows * forward_flops(S, 1, w.P, logits=False) + contraction_flops(w)) \
        + 2 * forward_flops(S, w.n, w.P)
    dense = (w.n if cfg.per_prompt else 1) * (w.P if cfg.per_position else 1) * g.n_src * g.n_dst
    # dense scores (float32) per direction, and the rows they become (≈ 40 bytes a row while written)
    fixed = 4 * dense * d + 40 * rows
    per_row = 4 * w.P * S.d_model * (6 * S.n_layers * S.n_heads + 12 * S.n_layers + g.n_dst + 3 * g.n_src)
    peak = fixed + min(cfg.max_rows, max(1, int(n_grad_rows))) * per_row * w.dtype_bytes // 4
    return Cost({"edges": rows}, forward_rows=d * 3 * n_grad_rows + 2 * w.n, flops=flops, fixed_bytes=int(fixed),
                peak_bytes=int(peak))
