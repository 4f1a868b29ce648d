"""Exhaustive activation patching at every granularity of TransformerLens 4.3 ``patching``, per prompt.

    python -c "from attrpatch import load_model, make_batch; from attrpatch.methods import run_method, MethodConfig; m = load_model('ioi-tiny'); r = run_method('activation', m, make_batch('ioi', m.tokenizer, 4), MethodConfig(kinds=('head_out',))); print([(n.component, n.axes, tuple(n.scores.shape)) for n in r.nodes])"

The ground truth the attribution methods estimate. For every patch ``i`` (a component, a layer, maybe a head,
a position or all positions, maybe a source position) and every prompt ``n``:

    score[n, i] = metric_n(run_n with activation i replaced by its value in the patch source) − metric_n(run_n)

with ``metric`` the logit difference (answer − wrong answer). ``denoise`` runs the corrupted prompt and
patches in clean activations (TransformerLens' direction); ``noise`` runs the clean prompt and patches in
corrupted ones. Activation patching: Vig et al. 2020, Meng et al. 2022 (causal tracing), Wang et al. 2022
(IOI); conventions of Zhang & Nanda 2023 and Heimersheim & Nanda 2024; the grid of TransformerLens
``patching.get_act_patch_*``.

Algorithm (per direction):

1. Cache the unpatched run and the patch source with ``engine.Recorder``: every patched site, plus the
   residual stream entering each block and each block's keys and values of the run.
2. List every (patch, prompt) row that can change the metric. A row is dropped, with score exactly 0, when
   its position lies after the prompt's answer position (causality: padding and later tokens never reach
   the metric) or when the source equals the run at every patched element (then the patched run *is* the
   unpatched run; on IOI this removes every position before the first corrupted token). A row's first
   changed position ``p0`` is its position, or, when it patches all positions, the first position where
   source and run differ (earlier positions are written with the values they already have).
3. Sort the rows by (layer L, p0, narrow) and cut each group into chunks of at most ``cfg.max_rows`` rows:
   many patches × prompts stacked along the batch axis. *Narrow* rows change block L's output at ``p0``
   only (a query, pattern row or cell, head output, attention/MLP output, mid residual at one position).
4. Run each chunk with ``patched_metric`` on the engine: restart at block L from the cached residual
   stream (``engine.Start``), compute only positions ``p0 …`` (earlier keys/values from the cache; block L
   on ``p0`` alone for narrow rows), apply every row's patch at its site in block L with one vectorised
   index assignment per granularity present, compute the last block at the answer position only and read
   the logit difference directly (``answer_only``, ``diff``).
5. Subtract the unpatched metric and scatter the rows into one dense tensor per granularity (no ``.item()``).

Granularities (names of TransformerLens' ``get_act_patch_<name>``; output component and axes):

============================================  =============  ===========================================
``resid_pre``, ``resid_mid``, ``attn_out``,    same kind      ``prompt layer pos``
``mlp_out`` (patch one position of a layer)
``attn_head_{out,q,k,v}_by_pos``              ``head_out``,  ``prompt layer head pos``
                                              ``head_q/k/v``
``attn_head_pattern_by_pos`` (a dest row)     head_pattern   ``prompt layer head pos``
``attn_head_pattern_dest_src_pos`` (a cell)   head_pattern   ``prompt layer head pos src_pos``
``attn_head_{out,q,k,v,pattern}_all_pos``     head kinds     ``prompt layer head`` (pos null)
``{resid_pre,resid_mid,attn_out,mlp_out}``    layer kinds    ``prompt layer`` (not in TransformerLens:
``_all_pos``                                                 the whole layer at every position)
``block_every``, ``attn_head_all_pos_every``,  the union of their parts, as in TransformerLens
``attn_head_by_pos_every``
============================================  =============  ===========================================

Choosing what to compute: ``ActivationOptions.granularities`` (a list of the names above) when given;
otherwise every granularity of the kinds in ``cfg.kinds`` (None = all nine patchable kinds) at the positional
scope of ``cfg.per_position``: True = by position (plus the dest × src cells for ``head_pattern``), False =
all positions at once (``pos`` null, as the results contract defines). ``cfg.per_prompt=False`` averages over the prompts.
``cfg.max_rows`` bounds the rows (patched runs) per forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from attrpatch.components import HEAD_VECTOR_KINDS, LAYER_KINDS
from attrpatch.engine import KV, Edit, Recorder, Start, Weights, block, cache_kv, forward, identity, weights
from attrpatch.methods import MethodConfig, MethodError, Options, register, register_cost
from attrpatch.methods.core import (
    Cost,
    Work,
    acc_dtype,
    as_scores,
    forward_flops,
    node_rows,
    report,
    rows_per_pass,
    run_and_patch,
    token_layer_flops,
    wide,
)
from attrpatch.models import LoadedModel
from attrpatch.scores import MethodResult, NodeScores
from attrpatch.tasks import PromptBatch

log = logging.getLogger(__name__)

POS_KINDS = ("resid_pre", "resid_mid", *LAYER_KINDS)  # [batch pos d_model] sites
PATCH_KINDS = (*POS_KINDS, *HEAD_VECTOR_KINDS, "head_pattern")


@dataclass(frozen=True)
class Granularity:
    """One TransformerLens patching grid: which kind is patched, and over which positions at once."""

    name: str
    kind: str
    scope: str  # "by_pos": one position (pattern: one dest row); "all_pos": every position; "dest_src": one cell

    @property
    def axes(self) -> tuple[str, ...]:
        head = () if self.kind in POS_KINDS else ("head",)
        pos = {"by_pos": ("pos",), "all_pos": (), "dest_src": ("pos", "src_pos")}[self.scope]
        return ("prompt", "layer", *head, *pos)


_TL_HEAD = {"head_out": "out", "head_q": "q", "head_k": "k", "head_v": "v", "head_pattern": "pattern"}
GRANULARITIES: dict[str, Granularity] = {}
for _kind in POS_KINDS:
    GRANULARITIES[_kind] = Granularity(_kind, _kind, "by_pos")
    GRANULARITIES[f"{_kind}_all_pos"] = Granularity(f"{_kind}_all_pos", _kind, "all_pos")
for _kind, _tl in _TL_HEAD.items():
    for _scope in ("by_pos", "all_pos"):
        GRANULARITIES[f"attn_head_{_tl}_{_scope}"] = Granularity(f"attn_head_{_tl}_{_scope}", _kind, _scope)
GRANULARITIES["attn_head_pattern_dest_src_pos"] = Granularity("attn_head_pattern_dest_src_pos", "head_pattern",
                                                              "dest_src")
COMPOSITES: dict[str, tuple[str, ...]] = {
    "block_every": ("resid_pre", "attn_out", "mlp_out"),
    "attn_head_all_pos_every": tuple(f"attn_head_{t}_all_pos" for t in _TL_HEAD.values()),
    "attn_head_by_pos_every": tuple(f"attn_head_{t}_by_pos" for t in _TL_HEAD.values()),
}


@dataclass(frozen=True)
class ActivationOptions(Options):
    granularities: tuple[str, ...] | None = None  # TransformerLens grid names (module docstring); None: by kinds

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.granularities is None:
            return
        if not self.granularities:
            raise MethodError("granularities is empty: name at least one granularity (or null for the kinds' own)")
        unknown = [n for n in self.granularities if n not in GRANULARITIES and n not in COMPOSITES]
        if unknown:
            raise MethodError(f"unknown activation-patching granularities {unknown}: use names of TransformerLens "
                              f"get_act_patch_<name>: {sorted([*GRANULARITIES, *COMPOSITES])}")

    def check(self, cfg: MethodConfig) -> None:
        select_granularities(cfg)


def select_granularities(cfg: MethodConfig) -> tuple[Granularity, ...]:
    """The granularities ``cfg`` asks for (see the module docstring), in a fixed order, checked."""
    kinds = PATCH_KINDS if cfg.kinds is None else tuple(cfg.kinds)
    names = cfg.options.granularities if cfg.options is not None else None
    if names is not None:
        expanded = [g for name in names for g in COMPOSITES.get(name, (name,))]
        chosen = [GRANULARITIES[n] for n in dict.fromkeys(expanded)]
        outside = [g.name for g in chosen if g.kind not in kinds]
        if outside:
            raise MethodError(f"granularities {outside} patch kinds outside kinds={list(kinds)}: widen "
                              "kinds (or leave it null) or drop them from granularities")
        return tuple(chosen)
    scopes = ("by_pos", "dest_src") if cfg.per_position else ("all_pos",)
    return tuple(g for g in GRANULARITIES.values() if g.kind in kinds and g.scope in scopes)


def _needed(g: Granularity, run: Tensor, src: Tensor, valid_pos: Tensor) -> tuple[Tensor, Tensor | None]:
    """Step 2: bool over the granularity's grid (axes ``g.axes``): can this patch change this prompt's metric?
    For all-position patches also the first position where source and run differ (where the patch starts).

    ``run``/``src`` are the stacked site tensors ``[layer prompt …]``; ``valid_pos[n, p]`` = p ≤ answer_pos[n].
    """
    if g.kind == "head_pattern":  # [L N H dest src]
        diff = (run != src).permute(1, 0, 2, 3, 4) & valid_pos[:, None, None, :, None]
        if g.scope == "dest_src":
            return diff, None
        diff = diff.any(-1)  # [N L H dest]
    else:
        diff = (run != src).any(-1)  # [L N P] or [L N P H]
        if g.kind in POS_KINDS:
            diff = diff.permute(1, 0, 2) & valid_pos[:, None, :]  # [N L P]
        else:
            diff = diff.permute(1, 0, 3, 2) & valid_pos[:, None, None, :]  # [N L H P]
    if g.scope == "by_pos":
        return diff, None
    return diff.any(-1), diff.int().argmax(-1)  # argmax of a bool row: its first True


@dataclass
class _Rows:
    """The (patch, prompt) rows still to run, one column per coordinate (0 where a granularity has no axis)."""

    g: Int[Tensor, " row"]  # index into the granularity tuple
    n: Int[Tensor, " row"]
    layer: Int[Tensor, " row"]
    head: Int[Tensor, " row"]
    pos: Int[Tensor, " row"]
    src: Int[Tensor, " row"]
    p0: Int[Tensor, " row"]  # first position the patch changes: pos, or (all positions) the first that differs
    narrow: Tensor  # bool: the patch changes its block's output at p0 only (see patched_metric)

    def take(self, idx: Tensor) -> _Rows:
        return _Rows(*(getattr(self, f)[idx] for f in _FIELDS))


_FIELDS = ("g", "n", "layer", "head", "pos", "src", "p0", "narrow")
# Kinds whose by-position patch changes only the output of its own block at that position (a query, a
# pattern row/cell, a head output, an attention/MLP output, the mid residual); resid_pre, keys and values
# also change what later positions read in the same block.
NARROW_KINDS = ("head_q", "head_pattern", "head_out", "attn_out", "resid_mid", "mlp_out")


def _rows(grans: tuple[Granularity, ...], needed: list[Tensor], first_diff: list[Tensor | None],
          n_layers: int) -> _Rows:
    """Step 2: the coordinates of every needed row of every granularity, as one table."""
    cols: dict[str, list[Tensor]] = {f: [] for f in _FIELDS}
    for i, (g, need, first) in enumerate(zip(grans, needed, first_diff, strict=True)):
        coords = dict(zip(g.axes, need.nonzero().unbind(1), strict=True))
        zero = torch.zeros_like(coords["prompt"])
        cols["g"].append(torch.full_like(zero, i))
        cols["n"].append(coords["prompt"])
        cols["layer"].append(coords["layer"])
        cols["head"].append(coords.get("head", zero))
        cols["pos"].append(coords.get("pos", zero))
        cols["src"].append(coords.get("src_pos", zero))
        if g.scope == "all_pos":
            cols["p0"].append(first[tuple(coords[a] for a in g.axes)])
            cols["narrow"].append(torch.zeros_like(zero, dtype=torch.bool))
        else:
            cols["p0"].append(coords["pos"])
            cols["narrow"].append((coords["layer"] < n_layers - 1) & (g.kind in NARROW_KINDS))
    return _Rows(*(torch.cat(cols[f]) for f in _FIELDS))


def _chunks(rows: _Rows, n_pos: int, max_rows: int) -> list[tuple[int, int, bool, Tensor]]:
    """Step 3: (layer, p0, narrow, row indices) per chunk: rows grouped by (layer, p0, narrow), at most
    ``max_rows`` each."""
    key = (rows.layer * (n_pos + 1) + rows.p0) * 2 + rows.narrow.long()
    order = torch.sort(key, stable=True).indices
    groups, counts = torch.unique_consecutive(key[order], return_counts=True)
    out: list[tuple[int, int, bool, Tensor]] = []
    start = 0
    for k, c in zip(groups.tolist(), counts.tolist(), strict=True):
        layer, p0, narrow = k // 2 // (n_pos + 1), k // 2 % (n_pos + 1), bool(k % 2)
        for lo in range(start, start + c, max_rows):
            out.append((layer, p0, narrow, order[lo:min(lo + max_rows, start + c)]))
        start += c
    return out


def _patcher(grans: tuple[Granularity, ...], chunk: _Rows, layer: int, p0: int, src: dict[str, Tensor]) -> Edit:
    """Step 4: the edit of block ``layer`` that writes every row's source value at its own site (tensors in
    suffix coordinates: position ``p0`` is index 0)."""
    present = torch.unique(chunk.g).tolist()
    by_site: dict[str, list[tuple[Granularity, Tensor]]] = {}
    for i in present:
        by_site.setdefault(grans[i].kind, []).append((grans[i], (chunk.g == i).nonzero()[:, 0]))

    def edit(site: str, at: int, x: Tensor) -> Tensor:
        if at != layer:
            return x
        for g, idx in by_site.get(site, ()):
            s_l = src[site][layer]  # the source at this block, prompt-indexed
            n, h = chunk.n[idx], chunk.head[idx]
            if g.kind in POS_KINDS:  # x [R S D], s_l [N P D]
                if g.scope == "by_pos":
                    x[idx, 0] = s_l[n, p0]
                else:
                    x[idx] = s_l[n, p0:p0 + x.shape[1]]
            elif g.kind != "head_pattern":  # x [R S H E], s_l [N P H E]
                if g.scope == "by_pos":
                    x[idx, 0, h] = s_l[n, p0, h]
                else:
                    x[idx, :, h] = s_l[n, p0:p0 + x.shape[1], h]
            elif g.scope == "by_pos":  # x [R H S p0+S], s_l [N H P P]
                x[idx, h, 0] = s_l[n, h, p0, :x.shape[3]]
            elif g.scope == "dest_src":
                x[idx, h, 0, chunk.src[idx]] = s_l[n, h, p0, chunk.src[idx]]
            else:
                x[idx, h] = s_l[n, h, p0:x.shape[3], :x.shape[3]]
        return x

    return edit


def bytes_per_row(w: Weights, n_pos: int) -> int:
    """Memory of one patched run in a no-grad pass (one block's tensors live at a time): per position, the
    residual stream, LayerNorm, q/k/v, z, attention and MLP outputs (~8 d_model) and the MLP's hidden layer
    (2 d_mlp), plus the attention scores and pattern (2 · n_heads · n_pos)."""
    return w.W_E.element_size() * n_pos * (8 * w.d_model + 2 * w.d_mlp + 2 * w.n_heads * n_pos)


def patched_metric(w: Weights, resid_pre: Tensor, kv: KV, layer: int, p0: int, prompt: Int[Tensor, " row"],
                   answer_pos: Int[Tensor, " row"], ids: tuple[Tensor, Tensor], n_suffix: int, edit: Edit,
                   narrow: bool) -> Tensor:
    """Step 4: the logit difference of each row's run patched by ``edit`` in block ``layer``, computing
    positions ``p0 … p0 + n_suffix − 1`` only. ``narrow``: the patches change block ``layer``'s output at ``p0``
    only, so that block runs on position ``p0`` alone and the next one starts from the cached residual stream
    with ``p0`` replaced."""
    if narrow and layer < w.n_layers - 1:
        at_p0 = block(w, layer, resid_pre[layer][prompt, p0:p0 + 1], edit,
                      past=kv.before(layer, p0, prompt))
        resid = resid_pre[layer + 1][prompt, p0:p0 + n_suffix]  # advanced indexing: a copy
        resid[:, :1] = at_p0
        # the patch is in: no edit acts after block ``layer``, so even a last block started at runs at the
        # answer position only
        return forward(w, None, answer_pos, identity, start=Start(layer + 1, resid, p0, kv, prompt),
                       answer_only=True, diff=ids)
    start = Start(layer, resid_pre[layer][prompt, p0:p0 + n_suffix], p0, kv, prompt)
    return forward(w, None, answer_pos, edit, start=start, answer_only=True, diff=ids)


def patch_scores(w: Weights, run_tokens: Int[Tensor, "prompt pos"], src_tokens: Int[Tensor, "prompt pos"],
                 batch: PromptBatch, grans: tuple[Granularity, ...], max_rows: int) -> list[Tensor]:
    """Steps 1–5 for one direction: per granularity, the dense ``[prompt layer …]`` score tensor (``acc_dtype``)."""
    N, P = run_tokens.shape
    device = w.device
    answer_pos = batch.answer_pos.to(device)
    ans_ids, wrong_ids = batch.answer_ids.to(device), batch.wrong_ids.to(device)
    kinds = tuple(dict.fromkeys([g.kind for g in grans]))
    # Step 1: caches of the run (incl. residual stream and keys/values) and of the source.
    run_acts = Recorder((*kinds, "resid_pre", "head_k", "head_v"))
    base = forward(w, run_tokens, answer_pos, run_acts, diff=(ans_ids, wrong_ids))
    src_acts = Recorder(kinds)
    forward(w, src_tokens, answer_pos, src_acts, diff=(ans_ids, wrong_ids))
    kv = cache_kv(run_acts.acts, w.n_layers)
    resid_pre = run_acts.stack("resid_pre")
    run_stack = {k: run_acts.stack(k) for k in kinds}
    src_stack = {k: src_acts.stack(k) for k in kinds}
    # Step 2: the rows that can change the metric.
    valid_pos = torch.arange(P, device=device)[None, :] <= answer_pos[:, None]
    needed, first_diff = zip(*(_needed(g, run_stack[g.kind], src_stack[g.kind], valid_pos) for g in grans),
                             strict=True)
    rows = _rows(grans, list(needed), list(first_diff), w.n_layers)
    log.info("activation patching: %d of %d (patch, prompt) rows can change the metric", rows.n.numel(),
             sum(x.numel() for x in needed))
    # Steps 3–4: chunked suffix forwards.
    row_scores = torch.zeros(rows.n.numel(), dtype=acc_dtype(w.dtype), device=device)
    per_pass = rows_per_pass(bytes_per_row(w, P), max_rows, device)
    done = 0
    for layer, p0, narrow, idx in _chunks(rows, P, per_pass):
        chunk = rows.take(idx)
        n_suffix = int(answer_pos[chunk.n].max()) + 1 - p0
        metric = patched_metric(w, resid_pre, kv, layer, p0, chunk.n, answer_pos[chunk.n],
                                (ans_ids[chunk.n], wrong_ids[chunk.n]), n_suffix,
                                _patcher(grans, chunk, layer, p0, src_stack), narrow)
        row_scores[idx] = wide(metric - base[chunk.n])
        done += len(idx)
        report(done, len(row_scores))
    # Step 5: scatter into dense tensors (rows not run keep their exact score 0).
    out = []
    for i, (g, need) in enumerate(zip(grans, needed, strict=True)):
        dense = torch.zeros(need.shape, dtype=row_scores.dtype, device=device)
        mine = rows.g == i
        coords = {"prompt": rows.n, "layer": rows.layer, "head": rows.head, "pos": rows.pos, "src_pos": rows.src}
        dense[tuple(coords[a][mine] for a in g.axes)] = row_scores[mine]
        out.append(dense)
    return out


@register("activation", produces="nodes", exact=True, options=ActivationOptions, kinds=PATCH_KINDS)
def activation_patching(model: LoadedModel, batch: PromptBatch, cfg: MethodConfig) -> MethodResult:
    """Exact activation patching at every TransformerLens granularity, per prompt, both directions."""
    grans = select_granularities(cfg)
    w = weights(model)
    nodes: list[NodeScores] = []
    with torch.no_grad():
        for direction in cfg.directions:
            run, src = run_and_patch(batch, direction)
            dense = patch_scores(w, run.to(w.device), src.to(w.device), batch, grans, cfg.max_rows)
            for g, scores in zip(grans, dense, strict=True):
                axes = g.axes if cfg.per_prompt else g.axes[1:]
                nodes.append(NodeScores(g.kind, direction, as_scores(scores if cfg.per_prompt else scores.mean(0)),
                                        axes))
    return MethodResult(nodes=nodes)


def granularity_of(node: NodeScores) -> str:
    """The granularity name that produced a NodeScores (by its kind and axes)."""
    for g in GRANULARITIES.values():
        if g.kind == node.component and g.axes[1:] == tuple(a for a in node.axes if a != "prompt"):
            return g.name
    raise MethodError(f"no activation-patching granularity has kind {node.component!r} and axes {node.axes}")


def _grid_cells(shape, g: Granularity) -> int:
    return shape.n_layers * (1 if g.kind in POS_KINDS else shape.n_heads)


@register_cost("activation")
def activation_cost(w: Work, cfg: MethodConfig) -> Cost:
    """Rows: every cell of every grid (cells that cannot change the metric are written as exact zeros).
    Patched runs: the rows step 2 keeps — patches at or after each prompt's first differing position."""
    S = w.shape
    grans = select_granularities(cfg)
    rows = forward_rows = flops = 0.0
    tok = token_layer_flops(S, w.P)
    for g in grans:
        cells = _grid_cells(S, g)
        if g.scope == "all_pos":
            rows += cells * (w.n if cfg.per_prompt else 1)
            runs = [(f, L - f) for L, f in zip(w.lengths, w.first_diff, strict=True)]  # (p0, suffix length)
        elif g.scope == "by_pos":
            rows += node_rows(w, cfg.per_prompt, True, cells)
            runs = [(p, L - p) for L, f in zip(w.lengths, w.first_diff, strict=True) for p in range(f, L)]
        else:
            rows += node_rows(w, cfg.per_prompt, True, cells, pattern=True)
            runs = [(p, L - p) for L, f in zip(w.lengths, w.first_diff, strict=True) for p in range(f, L)
                    for _ in range(p + 1)]
        per_layer = cells // S.n_layers
        for layer in range(S.n_layers):
            # the blocks from the patched one on, the last at the answer position only (~half a block)
            blocks = S.n_layers - layer - 0.5 if layer < S.n_layers - 1 else 1.0
            flops += per_layer * sum(s * blocks * tok for _, s in runs)
        forward_rows += cells * len(runs)
    rows *= len(cfg.directions)
    cache = 3 * S.n_layers * w.n * w.P * S.d_model + 2 * S.n_layers * w.n * S.n_heads * w.P * w.P
    fixed = w.dtype_bytes * cache + 4 * rows
    per_pass = min(cfg.max_rows, max(1, forward_rows))
    peak = fixed + int(per_pass) * w.dtype_bytes * w.P * (8 * S.d_model + 2 * S.d_mlp + 2 * S.n_heads * w.P)
    d = len(cfg.directions)
    return Cost({"nodes": int(rows)}, forward_rows=d * forward_rows + 2 * d * w.n,
                flops=d * (flops + 2 * forward_flops(S, w.n, w.P)), fixed_bytes=int(fixed), peak_bytes=int(peak))
