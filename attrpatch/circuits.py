"""Run a model with only a circuit's edges intact: every other edge carries an ablated source write.

    python -c "from attrpatch.circuits import circuit_metric; help(circuit_metric)"

An edge (src → dst) is the source's write to the residual stream as read by the target's input (a head's
q/k/v input, an MLP input or the logits input). Ablating the edges outside a circuit C (MIB circuit track;
Hanna et al.'s EAP-IG ``evaluate_graph``, which MIB uses):

1. Run the corrupted prompt once, without gradients, and keep every source's write a_src,abl (or, with
   ``ablation="mean"``, the mean of those writes over the corrupted prompts of the same template, per
   position; the mean is over the prompts of the batch given).
2. Run the clean prompt with ``split=True`` (every target has its own input tensor). As each source is
   computed in this run, keep δ_src = a_src,abl − a_src,live.
3. At every target's input site add the ablated edges' differences:

       input(dst) = live input(dst) + Σ_{src upstream of dst, (src, dst) ∉ C} δ_src

   so an ablated edge carries the ablated write, and an edge in C carries the *live* write of its source —
   which has itself seen ablated inputs when its own incoming edges are outside C. This is the fixed-source
   semantics of EAP-IG / MIB (corrupted writes come from a separate corrupted run and are not recomputed);
   with every edge ablated each target reads exactly the corrupted run's residual stream, so m(∅) is the
   corrupted metric (for ``"patch"``); with every edge kept nothing is added and m(N) is the clean metric.
4. Many circuits at once: circuits are stacked along the batch axis (copy-major, circuit × prompt rows);
   the masks and δ broadcast per circuit, chunked so one pass fits the memory budget
   (``methods.core.rows_per_pass``).

No pruning of dangling edges: with patching, an edge out of a source whose inputs are all ablated already
carries that source's corrupted write, and an edge into a target whose outputs are all ablated never reaches
the metric, so pruning (EAP-IG ``Graph.prune``) changes the edge count but not m(C).
"""

from __future__ import annotations

import torch
from einops import einsum
from jaxtyping import Bool, Float, Int
from torch import Tensor

from attrpatch.components import QKV_INPUT_SITES
from attrpatch.engine import Weights, forward
from attrpatch.errors import ConfigError
from attrpatch.graph import EdgeGraph, head_writes
from attrpatch.methods.core import acc_dtype, rows_per_pass, run_sources
from attrpatch.scores import EdgeIndex
from attrpatch.tasks import PromptBatch

ABLATIONS = ("patch", "mean")


class CircuitError(ConfigError):
    """A circuit or edge index that cannot be evaluated; the message says how to fix it."""


def template_mean(writes: Float[Tensor, "batch pos src d_model"], batch: PromptBatch
                  ) -> Float[Tensor, "batch pos src d_model"]:
    """Step 1 (``ablation="mean"``): each prompt's writes replaced by the mean over the prompts of its
    template, per position, counting only each prompt's real (unpadded) positions."""
    templates = torch.tensor([p.template for p in batch.prompts])
    _, inverse = templates.unique(return_inverse=True)
    inverse = inverse.to(writes.device)
    real = (torch.arange(writes.shape[1], device=writes.device)[None] < batch.lengths.to(writes.device)[:, None])
    real = real.to(writes.dtype)
    n_groups = int(inverse.max()) + 1
    sums = torch.zeros(n_groups, *writes.shape[1:], dtype=writes.dtype, device=writes.device)
    sums.index_add_(0, inverse, writes * real[:, :, None, None])
    counts = torch.zeros(n_groups, writes.shape[1], dtype=writes.dtype, device=writes.device)
    counts.index_add_(0, inverse, real)
    return (sums / counts.clamp(min=1)[:, :, None, None])[inverse]


def bytes_per_row(w: Weights, n_src: int, n_pos: int) -> int:
    """Step 4: memory of one circuit × prompt row. Without gradients only one layer's tensors live at a
    time besides δ: per position, δ (n_src · d_model), the split q/k/v inputs and their LayerNorms
    (6 · n_heads · d_model) and the ordinary block activations (~12 · d_model)."""
    return w.W_E.element_size() * n_pos * w.d_model * (n_src + 6 * w.n_heads + 12)


@torch.no_grad()
def _run_circuits(w: Weights, graph: EdgeGraph, ablate: Float[Tensor, "circuit src dst"],
                  clean: Int[Tensor, "batch pos"], answer_pos: Int[Tensor, " batch"],
                  abl_writes: Float[Tensor, "batch pos src d_model"], answer_ids: Tensor,
                  wrong_ids: Tensor) -> Float[Tensor, "circuit batch"]:
    """Steps 2–3 for a few circuits stacked along the batch axis: the logit difference per circuit, prompt."""
    n_c = ablate.shape[0]
    b, p = clean.shape
    delta = torch.zeros(n_c, b, p, graph.n_src, w.d_model, dtype=abl_writes.dtype, device=abl_writes.device)

    def set_delta(idx: slice, live: Tensor) -> None:  # live: [c·b, p, (H,) d_model]
        live = live.reshape(n_c, b, p, -1, w.d_model)
        delta[:, :, :, idx] = abl_writes[None, :, :, idx] - live

    def added(n_up: int, dst: slice) -> Tensor:  # the ablated edges' δ summed into each target of ``dst``
        return einsum(delta[:, :, :, :n_up], ablate[:, :n_up, dst],
                      "circuit batch pos src d_model, circuit src dst -> circuit batch pos dst d_model")

    def edit(kind: str, layer: int, x: Tensor) -> Tensor:
        if kind == "resid_pre" and layer == 0:
            set_delta(slice(0, 1), x)
        elif kind == "head_out":
            set_delta(graph.head_src(layer), head_writes(w, layer, x).to(delta.dtype))
        elif kind == "mlp_out":
            mlp = graph.n_src_before_mlp(layer)
            set_delta(slice(mlp, mlp + 1), x)
        elif kind in QKV_INPUT_SITES:
            upd = added(graph.n_src_before_attn(layer), graph.dst_qkv(kind.removesuffix("_in"), layer))
            return x + upd.reshape(x.shape)
        elif kind == "mlp_in":
            dst = graph.dst_mlp(layer)
            return x + added(graph.n_src_before_mlp(layer), slice(dst, dst + 1)).reshape(x.shape)
        elif kind == "logits":
            return x + added(graph.n_src, graph.dst_block(graph.n_layers)).reshape(x.shape)
        return x

    diff = forward(w, clean.repeat(n_c, 1), answer_pos.repeat(n_c), edit, split=True, diff=(answer_ids, wrong_ids))
    return diff.reshape(n_c, b)


def circuit_metric(w: Weights, index: EdgeIndex, circuits: Bool[Tensor, "circuit src dst"], batch: PromptBatch,
                   ablation: str = "patch", max_rows: int = 256) -> Float[Tensor, "circuit batch"]:
    """The logit difference per circuit and prompt, with every valid edge outside the circuit ablated.

    ``index`` must be the full graph of the model (``EdgeGraph.index()``); ``circuits[c, s, d]`` marks the
    edges kept in circuit c (cells that are not edges are ignored); ``ablation`` is ``"patch"`` (the prompt's
    own corrupted run) or ``"mean"`` (per-template mean of the corrupted runs in ``batch``). Steps 1–4 of
    the module docstring."""
    if ablation not in ABLATIONS:
        raise CircuitError(f"unknown ablation {ablation!r}: use one of {list(ABLATIONS)}")
    graph = EdgeGraph.of(w)
    if set(index.src) != set(graph.src) or set(index.dst) != set(graph.dst) \
            or len(index.src) != graph.n_src or len(index.dst) != graph.n_dst:
        raise CircuitError(f"the edge index is not the full graph of a {w.n_layers}-layer, {w.n_heads}-head GPT-2: "
                           "rank with an edge method over attrpatch.graph.EdgeGraph (every edge, edge_subset null)")
    if circuits.dim() != 3 or tuple(circuits.shape[1:]) != (graph.n_src, graph.n_dst):
        raise CircuitError(f"circuits must be bool [circuit, {graph.n_src}, {graph.n_dst}] over the edge index, "
                           f"got shape {tuple(circuits.shape)}")
    # Into graph order (upstream sources a prefix of the sources), whatever order the index lists nodes in.
    src_at = torch.tensor([index.src.index(n) for n in graph.src])
    dst_at = torch.tensor([index.dst.index(n) for n in graph.dst])
    circuits = circuits[:, src_at][:, :, dst_at]
    valid = index.valid[src_at][:, dst_at].to(w.device)
    ablate = (valid[None] & ~circuits.to(device=w.device, dtype=torch.bool)).to(w.resid_dtype)
    abl = run_sources(w, batch.corrupt_tokens.to(w.device), batch.answer_pos)
    if ablation == "mean":
        abl = template_mean(abl, batch)
    rows = rows_per_pass(bytes_per_row(w, graph.n_src, batch.n_pos), max_rows, w.device)
    b_chunk = min(len(batch), rows)
    c_chunk = max(1, rows // b_chunk)
    out = torch.empty(circuits.shape[0], len(batch), dtype=acc_dtype(w.dtype), device=w.device)
    for b0 in range(0, len(batch), b_chunk):
        sl = slice(b0, min(b0 + b_chunk, len(batch)))
        for c0 in range(0, circuits.shape[0], c_chunk):
            cs = slice(c0, min(c0 + c_chunk, circuits.shape[0]))
            out[cs, sl] = _run_circuits(w, graph, ablate[cs], batch.clean_tokens[sl].to(w.device), batch.answer_pos[sl],
                                        abl[sl], batch.answer_ids[sl], batch.wrong_ids[sl])
    return out
