"""Exact edge patching: the ground truth an edge attribution score approximates.

    python -c "from attrpatch import load_model, make_batch; from attrpatch.methods import run_method, method_config; m = load_model('ioi-tiny'); r = run_method('edge_activation', m, make_batch('ioi', m.tokenizer, 4), method_config('edge_activation', edge_subset=0.01, per_position=False)); print(r.edges[0].index.n_edges)"

Algorithm (edge / path patching as in Wang et al. 2022 and Goldowsky-Dill et al. 2023, restricted to one
edge: only the target's input sees the source's change; everything else keeps the run's values):

1. Run the run input (no gradients) and keep the residual stream entering every layer and the metric
   m_run; run the patch input and keep every source's write, giving Δsrc = a_src,patch − a_src,run.
2. Choose the edges: all (``edge_subset`` None), or a fraction f of them, half the top edges by |EAP score|
   (same direction, mean over prompts, summed over positions) and half drawn at random from the rest
   (``seed``).
3. For edge src → dst with dst in layer L, restart the forward at L from the cached residual stream, add
   Δsrc to dst's input only (the engine's split q/k/v / mlp_in / logits site, block L alone split), run the
   rest with the last block at the answer position only and read the logit difference directly:

       score(src → dst) = metric(run with input_dst += Δsrc) − m_run

   Many edges go into one forward as copies of the batch stacked along the batch axis (at most
   ``max_rows`` rows per forward). With ``per_position`` each copy adds Δsrc at one position only.
4. Return ``EdgeScores`` over the graph's nodes whose index marks only the edges patched.

Options: ``EdgeActivationOptions.edge_subset``; config read: ``directions``, ``per_prompt``,
``per_position``, ``max_rows``, ``seed``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from attrpatch.components import QKV_INPUT_SITES
from attrpatch.engine import Recorder, Start, Weights, block, forward, unembed, weights
from attrpatch.graph import EdgeGraph
from attrpatch.methods import MethodConfig, MethodError, Options, register, register_cost
from attrpatch.methods.core import (
    Cost,
    Work,
    acc_dtype,
    as_scores,
    edge_axes,
    edge_loop_cost,
    edge_rows,
    edge_scores,
    forward_flops,
    report,
    rows_per_pass,
    run_and_patch,
    run_sources,
    token_layer_flops,
    wide,
)
from attrpatch.models import LoadedModel
from attrpatch.scores import EdgeScores, MethodResult
from attrpatch.tasks import PromptBatch

ALL_POSITIONS = -1


@dataclass(frozen=True)
class EdgeActivationOptions(Options):
    edge_subset: float | None = None  # a fraction of the edges (top by |EAP| + random); None = every edge

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.edge_subset is not None and not 0 < self.edge_subset <= 1:
            raise MethodError(f"edge_subset must be in (0, 1] or None, got {self.edge_subset}")


@torch.no_grad()
def run_stream(w: Weights, tokens: Int[Tensor, "batch pos"], answer_pos: Int[Tensor, " batch"],
               answer_ids: Tensor, wrong_ids: Tensor) -> tuple[list[Float[Tensor, "batch pos d_model"]], Tensor]:
    """Step 1: the residual stream entering each layer (and, last, the input of the unembedding) and the
    run's logit difference."""
    rec = Recorder(("resid_pre", "logits"))
    diff = forward(w, tokens, answer_pos, rec, diff=(answer_ids, wrong_ids))
    return [rec.acts[("resid_pre", layer)] for layer in range(w.n_layers)] + [rec.acts[("logits", w.n_layers)]], diff


def choose_edges(w: Weights, batch: PromptBatch, direction: str, fraction: float | None, seed: int,
                 max_rows: int) -> Bool[Tensor, "src dst"]:
    """Step 2: all edges, or ceil(f·E) of them: the top half by |EAP| and a random half of the rest."""
    graph = EdgeGraph.of(w)
    valid = graph.valid.to(w.device)
    if fraction is None or fraction >= 1:
        return valid
    n_keep = patched_edges(graph, fraction)
    eap = edge_scores(w, batch, directions=(direction,), per_prompt=False, per_position=False,
                      max_rows=max_rows)[direction]
    flat_valid = valid.flatten().nonzero()[:, 0]
    order = eap.abs().flatten()[flat_valid].argsort(descending=True, stable=True)
    n_top = (n_keep + 1) // 2
    top, rest = flat_valid[order[:n_top]], flat_valid[order[n_top:]]
    gen = torch.Generator().manual_seed(seed)
    rand = rest[torch.randperm(len(rest), generator=gen)[: n_keep - n_top].to(rest.device)]
    keep = torch.zeros(graph.n_src * graph.n_dst, dtype=torch.bool, device=w.device)
    keep[torch.cat([top, rand])] = True
    return keep.view(graph.n_src, graph.n_dst)


class _AddAtTarget:
    """Step 3's edit: adds copy c's Δ to its own target's input at layer ``layer`` (split sites only)."""

    def __init__(self, graph: EdgeGraph, layer: int, dst: Tensor, delta: Tensor):
        self.layer = layer
        self.delta = delta  # [copies, batch, pos, d_model]: the change each copy adds
        self.sites: dict[str, tuple[Tensor, Tensor]] = {}  # site → (copies, head of each)
        if layer == graph.n_layers:
            self.sites["logits"] = (torch.arange(len(dst), device=dst.device), dst)
            return
        base = layer * graph.per_layer_dst
        for j, site in enumerate(QKV_INPUT_SITES):
            rel = dst - base - j * graph.n_heads
            sel = ((rel >= 0) & (rel < graph.n_heads)).nonzero()[:, 0]
            if len(sel):
                self.sites[site] = (sel, rel[sel])
        sel = (dst == graph.dst_mlp(layer)).nonzero()[:, 0]
        if len(sel):
            self.sites["mlp_in"] = (sel, dst[sel])

    def __call__(self, kind: str, layer: int, x: Tensor) -> Tensor:
        if kind not in self.sites or layer != self.layer:
            return x
        copies, heads = self.sites[kind]
        k = self.delta.shape[0]
        x = x.reshape(k, -1, *x.shape[1:]).clone()  # also makes the expanded q/k/v input its own tensor
        if x.dim() == 5:  # [copies, batch, pos, head, d_model]
            x[copies, :, :, heads] += self.delta[copies]
        else:
            x[copies] += self.delta[copies]
        return x.flatten(0, 1)


def bytes_per_row(w: Weights, n_pos: int) -> int:
    """Memory of one patched prompt row in a pass: the split block's q/k/v inputs and their LayerNorms
    (6 · n_heads), Δ and the ordinary activations (~16), in d_model floats per position."""
    return w.W_E.element_size() * n_pos * w.d_model * (6 * w.n_heads + 16)


@torch.no_grad()
def exact_edge_scores(w: Weights, batch: PromptBatch, direction: str, keep: Bool[Tensor, "src dst"] | None = None,
                      per_prompt: bool = True, per_position: bool = True, max_rows: int = 256,
                      delta_scale: float = 1.0) -> Tensor:
    """Steps 1 and 3 for one direction, scores (``acc_dtype``) with axes ``edge_axes(per_prompt, per_position)``.

    ``delta_scale`` patches a_run + scale·Δ instead of a_patch (1 = the real patch; tests shrink it)."""
    graph = EdgeGraph.of(w)
    keep = graph.valid.to(w.device) if keep is None else keep.to(w.device) & graph.valid.to(w.device)
    run, patch = (t.to(w.device) for t in run_and_patch(batch, direction))
    n, n_pos = len(batch), batch.n_pos
    ids = (batch.answer_ids, batch.wrong_ids)
    stream, base = run_stream(w, run, batch.answer_pos, *ids)
    delta = (run_sources(w, patch, batch.answer_pos) - run_sources(w, run, batch.answer_pos)) * delta_scale
    delta = delta.permute(2, 0, 1, 3)  # [src, batch, pos, d_model]

    src, dst = keep.nonzero(as_tuple=True)
    if per_position:
        pos = torch.arange(n_pos, device=w.device).repeat(len(src))
        src, dst = src.repeat_interleave(n_pos), dst.repeat_interleave(n_pos)
    else:
        pos = torch.full_like(src, ALL_POSITIONS)
    dst_layer = torch.div(dst, graph.per_layer_dst, rounding_mode="floor")
    out = torch.zeros(n, *(n_pos,) * per_position, graph.n_src, graph.n_dst, dtype=acc_dtype(w.dtype), device=w.device)
    copies_per_pass = max(1, rows_per_pass(bytes_per_row(w, n_pos), max_rows, w.device) // n)
    answer_pos = batch.answer_pos.to(w.device)
    done = 0
    for layer in range(graph.n_layers + 1):
        jobs = (dst_layer == layer).nonzero()[:, 0]
        for start in range(0, len(jobs), copies_per_pass):
            job = jobs[start:start + copies_per_pass]
            k = len(job)
            d = delta[src[job]]
            if per_position:
                at = torch.arange(n_pos, device=w.device)[None, :] == pos[job][:, None]
                d = d * at[:, None, :, None]
            edit = _AddAtTarget(graph, layer, dst[job], d)
            resid = stream[layer].repeat(k, 1, 1)
            rows_pos = answer_pos.repeat(k)
            if layer < graph.n_layers:
                resid = block(w, layer, resid, edit, split=True)
                patched = forward(w, None, rows_pos, start=Start(layer + 1, resid), answer_only=True, diff=ids)
            else:
                patched = unembed(w, resid, rows_pos, edit, split=True, diff=ids)
            effect = (wide(patched).view(k, n) - wide(base)).T
            cell = (pos[job], src[job], dst[job]) if per_position else (src[job], dst[job])
            out[(slice(None), *cell)] = effect
            done += k
            report(done, len(src))
    return out if per_prompt else out.mean(0)


@register("edge_activation", produces="edges", exact=True, options=EdgeActivationOptions)
def edge_activation(model: LoadedModel, batch: PromptBatch, cfg: MethodConfig) -> MethodResult:
    """Exact edge patching: patch one edge at a time (many per forward) and measure the metric change."""
    w = weights(model)
    graph = EdgeGraph.of(w)
    if cfg.max_rows < len(batch):
        raise MethodError(f"max_rows={cfg.max_rows} is smaller than the batch ({len(batch)} prompts): one patched "
                          "copy needs a row per prompt, so raise max_rows or use smaller shards")
    edges = []
    for direction in cfg.directions:
        keep = choose_edges(w, batch, direction, cfg.options.edge_subset, cfg.seed, cfg.max_rows)
        scores = exact_edge_scores(w, batch, direction, keep, cfg.per_prompt, cfg.per_position, cfg.max_rows)
        edges.append(EdgeScores(direction, graph.subset(keep.cpu()), as_scores(scores),
                                edge_axes(cfg.per_prompt, cfg.per_position)))
    return MethodResult(edges=edges)


def patched_edges(graph: EdgeGraph, fraction: float | None) -> int:
    return graph.n_edges if fraction is None or fraction >= 1 else max(1, math.ceil(fraction * graph.n_edges))


@register_cost("edge_activation")
def edge_activation_cost(w: Work, cfg: MethodConfig) -> Cost:
    S = w.shape
    graph = EdgeGraph(S.n_layers, S.n_heads)
    k = patched_edges(graph, cfg.options.edge_subset)
    d = len(cfg.directions)
    rows = d * edge_rows(w, k, cfg.per_prompt, cfg.per_position)
    # edges by the layer of their target; each patched copy runs n prompt rows from that layer on
    into = [int(graph.valid[:, graph.dst_block(layer)].sum()) for layer in range(S.n_layers + 1)]
    tok = token_layer_flops(S, w.P)
    copy_flops = sum(n_in / graph.n_edges * w.n * w.P * (S.n_layers - layer) * tok for layer, n_in in enumerate(into))
    copies = k * (w.P if cfg.per_position else 1)
    flops = d * (copies * copy_flops + 3 * forward_flops(S, w.n, w.P))
    choose = edge_loop_cost(w, dataclasses.replace(cfg, per_prompt=False, per_position=False), w.n) \
        if cfg.options.edge_subset is not None and cfg.options.edge_subset < 1 else None
    if choose is not None:
        flops += d * choose.flops
    dense = w.n * (w.P if cfg.per_position else 1) * graph.n_src * graph.n_dst
    fixed = 4 * dense * (d + 1) + 40 * rows + w.dtype_bytes * w.n * w.P * S.d_model * (S.n_layers + 1 + 2 * graph.n_src)
    per_pass = max(1, cfg.max_rows // w.n) * w.n
    peak = max(fixed + per_pass * bytes_per_row_for(S, w.P, w.dtype_bytes), choose.peak_bytes if choose else 0)
    return Cost({"edges": rows}, forward_rows=d * copies * w.n, flops=flops, fixed_bytes=int(fixed),
                peak_bytes=int(peak))


def bytes_per_row_for(shape, n_pos: int, dtype_bytes: int) -> int:
    return dtype_bytes * n_pos * shape.d_model * (6 * shape.n_heads + 16)
