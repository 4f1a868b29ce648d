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
   the masks and δ broadcast per circuit, chunked so one pass fits ``MEMORY_BUDGET``.

No pruning of dangling edges: with patching, an edge out of a source whose inputs are all ablated already
carries that source's corrupted write, and an edge into a target whose outputs are all ablated never reaches
the metric, so pruning (EAP-IG ``Graph.prune``) changes the edge count but not m(C).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from attrpatch.components import Node
from attrpatch.engine import Weights, forward
from attrpatch.errors import AttrpatchError
from attrpatch.metrics import ids_logit_diff
from attrpatch.scores import EdgeIndex
from attrpatch.tasks import PromptBatch

# Bytes one pass may hold in δ (rows · pos · src · d_model) and one layer's split q/k/v inputs: by
# rows_per_pass's count ~145 circuit × prompt rows of gpt2-small or ~11 of gpt2-xl at 20 positions.
MEMORY_BUDGET = 2 * 2**30
ABLATIONS = ("patch", "mean")
QKV_SITES = {"head_q_in": "head_q", "head_k_in": "head_k", "head_v_in": "head_v"}


class CircuitError(AttrpatchError):
    """A circuit or edge index that cannot be evaluated; the message says how to fix it."""


@dataclass(frozen=True)
class SiteMap:
    """Where each source and target of an ``EdgeIndex`` lives in the engine (built once per index).

    ``up_attn[l]`` / ``up_mlp[l]`` are the source indices upstream of layer l's attention / MLP inputs."""

    embed: int
    heads: tuple[Tensor, ...]  # per layer: source indices of heads 0..H-1
    mlps: tuple[int, ...]
    dst_qkv: dict[tuple[str, int], Tensor]  # (head_q_in | head_k_in | head_v_in, layer) → target indices [H]
    dst_mlp: tuple[int, ...]
    dst_logits: int
    up_attn: tuple[Tensor, ...]
    up_mlp: tuple[Tensor, ...]

    @classmethod
    def build(cls, index: EdgeIndex, n_layers: int, n_heads: int) -> SiteMap:
        src = {n: i for i, n in enumerate(index.src)}
        dst = {n: i for i, n in enumerate(index.dst)}
        want_src = [Node("embed", 0)] + [Node("head_out", lyr, h) for lyr in range(n_layers) for h in range(n_heads)] \
            + [Node("mlp_out", lyr) for lyr in range(n_layers)]
        want_dst = [Node(k, lyr, h) for k in QKV_SITES.values() for lyr in range(n_layers) for h in range(n_heads)] \
            + [Node("mlp_in", lyr) for lyr in range(n_layers)] + [Node("logits", n_layers)]
        missing = [n for n in want_src if n not in src] + [n for n in want_dst if n not in dst]
        if missing or len(src) != len(want_src) or len(dst) != len(want_dst):
            raise CircuitError(
                f"the edge index is not the full graph of a {n_layers}-layer, {n_heads}-head GPT-2 "
                f"(missing e.g. {missing[:3]}): rank with an edge method over attrpatch.graph.EdgeGraph")
        heads = tuple(torch.tensor([src[Node("head_out", lyr, h)] for h in range(n_heads)]) for lyr in range(n_layers))
        mlps = tuple(src[Node("mlp_out", lyr)] for lyr in range(n_layers))
        embed = src[Node("embed", 0)]
        up_attn, up_mlp = [], []
        before = [embed]
        for lyr in range(n_layers):
            up_attn.append(torch.tensor(sorted(before)))
            before += heads[lyr].tolist()
            up_mlp.append(torch.tensor(sorted(before)))
            before.append(mlps[lyr])
        return cls(
            embed=embed, heads=heads, mlps=mlps,
            dst_qkv={(site, lyr): torch.tensor([dst[Node(kind, lyr, h)] for h in range(n_heads)])
                     for site, kind in QKV_SITES.items() for lyr in range(n_layers)},
            dst_mlp=tuple(dst[Node("mlp_in", lyr)] for lyr in range(n_layers)),
            dst_logits=dst[Node("logits", n_layers)], up_attn=tuple(up_attn), up_mlp=tuple(up_mlp),
        )


def _prefix_or_index(x: Tensor, idx: Tensor, dim: int) -> Tensor:
    """``x.index_select(dim, idx)``, as a view when ``idx`` is 0..n-1 (the EdgeGraph order)."""
    if bool((idx == torch.arange(len(idx))).all()):
        return x.narrow(dim, 0, len(idx))
    return x.index_select(dim, idx.to(x.device))


@torch.no_grad()
def source_writes(w: Weights, sites: SiteMap, n_src: int, tokens: Int[Tensor, "batch pos"],
                  answer_pos: Int[Tensor, " batch"]) -> Float[Tensor, "batch pos src d_model"]:
    """Step 1: every source's write on one input, in the index's source order (a head's write is z·W_O)."""
    out = torch.zeros(*tokens.shape, n_src, w.d_model, dtype=w.W_E.dtype, device=w.device)

    def keep(kind: str, layer: int, x: Tensor) -> Tensor:
        if kind == "resid_pre" and layer == 0:
            out[:, :, sites.embed] = x
        elif kind == "head_out":
            out[:, :, sites.heads[layer].to(x.device)] = torch.einsum("bphe,hed->bphd", x, w.W_O[layer])
        elif kind == "mlp_out":
            out[:, :, sites.mlps[layer]] = x
        return x

    forward(w, tokens, answer_pos, keep)
    return out


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


def rows_per_pass(w: Weights, n_src: int, n_pos: int, max_rows: int, budget: int = MEMORY_BUDGET) -> int:
    """Step 4: circuit × prompt rows one pass may take. Without gradients only one layer's tensors live at
    a time besides δ: per row and position, δ (n_src · d_model), the split q/k/v inputs and their
    LayerNorms (6 · n_heads · d_model) and the ordinary block activations (~12 · d_model)."""
    per_row = 4 * n_pos * w.d_model * (n_src + 6 * w.n_heads + 12)
    return max(1, min(max_rows, budget // per_row))


@torch.no_grad()
def _run_circuits(w: Weights, sites: SiteMap, ablate: Float[Tensor, "circuit src dst"],
                  clean: Int[Tensor, "batch pos"], answer_pos: Int[Tensor, " batch"],
                  abl_writes: Float[Tensor, "batch pos src d_model"], answer_ids: Tensor,
                  wrong_ids: Tensor) -> Float[Tensor, "circuit batch"]:
    """Steps 2–3 for a few circuits stacked along the batch axis: the logit difference per circuit, prompt."""
    n_c, n_src = ablate.shape[0], ablate.shape[1]
    b, p = clean.shape
    delta = torch.zeros(n_c, b, p, n_src, w.d_model, dtype=abl_writes.dtype, device=abl_writes.device)

    def set_delta(idx, live: Tensor) -> None:  # live: [c·b, p, (H,) d_model]
        live = live.reshape(n_c, b, *live.shape[1:])
        delta[:, :, :, idx] = abl_writes[None, :, :, idx] - live

    def added(up: Tensor, dst_idx: Tensor | int, spec: str) -> Tensor:
        d = _prefix_or_index(delta, up, 3)
        m = _prefix_or_index(ablate, up, 1)
        m = m[:, :, dst_idx.to(m.device)] if isinstance(dst_idx, Tensor) else m[:, :, dst_idx]
        return torch.einsum(spec, d, m)

    def edit(kind: str, layer: int, x: Tensor) -> Tensor:
        if kind == "resid_pre" and layer == 0:
            set_delta(sites.embed, x)
        elif kind == "head_out":
            set_delta(sites.heads[layer].to(x.device), torch.einsum("bphe,hed->bphd", x, w.W_O[layer]))
        elif kind == "mlp_out":
            set_delta(sites.mlps[layer], x)
        elif kind in QKV_SITES:
            upd = added(sites.up_attn[layer], sites.dst_qkv[(kind, layer)], "cbpsd,csh->cbphd")
            return x + upd.reshape(x.shape)
        elif kind == "mlp_in":
            upd = added(sites.up_mlp[layer], sites.dst_mlp[layer], "cbpsd,cs->cbpd")
            return x + upd.reshape(x.shape)
        elif kind == "logits":
            upd = torch.einsum("cbpsd,cs->cbpd", delta, ablate[:, :, sites.dst_logits])
            return x + upd.reshape(x.shape)
        return x

    logits = forward(w, clean.repeat(n_c, 1), answer_pos.repeat(n_c), edit, split=True)
    return ids_logit_diff(logits, answer_ids, wrong_ids).reshape(n_c, b)


def circuit_metric(w: Weights, index: EdgeIndex, circuits: Bool[Tensor, "circuit src dst"], batch: PromptBatch,
                   ablation: str = "patch", max_rows: int = 256,
                   budget: int = MEMORY_BUDGET) -> Float[Tensor, "circuit batch"]:
    """The logit difference per circuit and prompt, with every valid edge outside the circuit ablated.

    ``circuits[c, s, d]`` marks the edges kept in circuit c (cells that are not edges are ignored);
    ``ablation`` is ``"patch"`` (the prompt's own corrupted run) or ``"mean"`` (per-template mean of the
    corrupted runs in ``batch``). Steps 1–4 of the module docstring."""
    if ablation not in ABLATIONS:
        raise CircuitError(f"unknown ablation {ablation!r}: use one of {list(ABLATIONS)}")
    n_src, n_dst = len(index.src), len(index.dst)
    if circuits.dim() != 3 or tuple(circuits.shape[1:]) != (n_src, n_dst):
        raise CircuitError(f"circuits must be bool [circuit, {n_src}, {n_dst}] over the edge index, "
                           f"got shape {tuple(circuits.shape)}")
    sites = SiteMap.build(index, w.n_layers, w.n_heads)
    valid = index.valid.to(w.device)
    ablate = (valid[None] & ~circuits.to(device=w.device, dtype=torch.bool)).to(w.W_E.dtype)
    abl = source_writes(w, sites, n_src, batch.corrupt_tokens, batch.answer_pos)
    if ablation == "mean":
        abl = template_mean(abl, batch)
    rows = rows_per_pass(w, n_src, batch.n_pos, max_rows, budget)
    b_chunk = min(len(batch), rows)
    c_chunk = max(1, rows // b_chunk)
    out = torch.empty(circuits.shape[0], len(batch), dtype=w.W_E.dtype, device=w.device)
    for b0 in range(0, len(batch), b_chunk):
        sl = slice(b0, min(b0 + b_chunk, len(batch)))
        for c0 in range(0, circuits.shape[0], c_chunk):
            cs = slice(c0, min(c0 + c_chunk, circuits.shape[0]))
            out[cs, sl] = _run_circuits(w, sites, ablate[cs], batch.clean_tokens[sl], batch.answer_pos[sl],
                                        abl[sl], batch.answer_ids[sl], batch.wrong_ids[sl])
    return out
