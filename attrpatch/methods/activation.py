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

1. Cache the unpatched run and the patch source with ``engine.run_with_acts``: every patched site, plus the
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
4. Run each chunk with ``patching_engine.suffix_metric``: restart at block L from the cached residual
   stream, compute only positions ``p0 …`` (earlier keys/values from the cache; block L on ``p0`` alone for
   narrow rows), apply every row's patch at its site in block L with one vectorised index assignment per
   granularity present, compute the last block and the logit difference at the answer position only.
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

Choosing what to compute: ``cfg.extra["granularities"]`` (a list of the names above) when given; otherwise
every granularity of the kinds in ``cfg.kinds`` (None = all nine patchable kinds) at the positional scope of
``cfg.per_position``: True = by position (plus the dest × src cells for ``head_pattern``), False = all
positions at once (``pos`` null, as DESIGN.md defines). ``cfg.per_prompt=False`` averages over the prompts.
``cfg.max_rows`` bounds the rows (patched runs) per forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from attrpatch.components import HEAD_VECTOR_KINDS, LAYER_KINDS
from attrpatch.engine import Weights, run_with_acts, weights
from attrpatch.methods import MethodConfig, MethodError, register
from attrpatch.metrics import final_logit_diff
from attrpatch.models import LoadedModel
from attrpatch.patching_engine import RunCache, suffix_metric
from attrpatch.scores import MethodResult, NodeScores
from attrpatch.tasks import PromptBatch

log = logging.getLogger(__name__)

POS_KINDS = ("resid_pre", "resid_mid", *LAYER_KINDS)  # [batch pos d_model] sites
PATCH_KINDS = (*POS_KINDS, *HEAD_VECTOR_KINDS, "head_pattern")
SCOPES = ("by_pos", "all_pos", "dest_src")


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
EXTRA_KEYS = ("granularities",)


def select_granularities(cfg: MethodConfig) -> tuple[Granularity, ...]:
    """The granularities ``cfg`` asks for (see the module docstring), in a fixed order, checked."""
    unknown = sorted(set(cfg.extra) - set(EXTRA_KEYS))
    if unknown:
        raise MethodError(f"activation patching takes no option {unknown} in cfg.extra; known: {list(EXTRA_KEYS)}")
    kinds = PATCH_KINDS if cfg.kinds is None else tuple(cfg.kinds)
    bad = [k for k in kinds if k not in PATCH_KINDS]
    if bad or not kinds:
        raise MethodError(f"activation patching cannot patch kinds {bad or list(kinds)}: use a non-empty subset "
                          f"of {list(PATCH_KINDS)} in cfg.kinds (None = all)")
    if "granularities" in cfg.extra:
        names: list[str] = []
        for name in cfg.extra["granularities"]:
            if name not in GRANULARITIES and name not in COMPOSITES:
                raise MethodError(f"unknown activation-patching granularity {name!r}: use names of "
                                  f"TransformerLens get_act_patch_<name>: {sorted([*GRANULARITIES, *COMPOSITES])}")
            names.extend(COMPOSITES.get(name, (name,)))
        chosen = [GRANULARITIES[n] for n in dict.fromkeys(names)]
        outside = [g.name for g in chosen if g.kind not in kinds]
        if outside:
            raise MethodError(f"granularities {outside} patch kinds outside cfg.kinds={list(kinds)}: widen "
                              "cfg.kinds (or leave it None) or drop them from cfg.extra['granularities']")
        if not chosen:
            raise MethodError("cfg.extra['granularities'] is empty: name at least one granularity")
        return tuple(chosen)
    scopes = ("by_pos", "dest_src") if cfg.per_position else ("all_pos",)
    return tuple(g for g in GRANULARITIES.values() if g.kind in kinds and g.scope in scopes)


def _site_stack(acts: dict[tuple[str, int], Tensor], kind: str, n_layers: int) -> Tensor:
    return torch.stack([acts[(kind, layer)] for layer in range(n_layers)])


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
    narrow: Tensor  # bool: the patch changes its block's output at p0 only (see suffix_metric)

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


def _patcher(grans: tuple[Granularity, ...], chunk: _Rows, layer: int, p0: int, src: dict[str, Tensor]):
    """Step 4: the edit of block ``layer`` that writes every row's source value at its own site (tensors in
    suffix coordinates: position ``p0`` is index 0)."""
    present = torch.unique(chunk.g).tolist()
    by_site: dict[str, list[tuple[Granularity, Tensor]]] = {}
    for i in present:
        by_site.setdefault(grans[i].kind, []).append((grans[i], (chunk.g == i).nonzero()[:, 0]))

    def edit(site: str, x: Tensor) -> Tensor:
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


def patch_scores(w: Weights, run_tokens: Int[Tensor, "prompt pos"], src_tokens: Int[Tensor, "prompt pos"],
                 batch: PromptBatch, grans: tuple[Granularity, ...], max_rows: int) -> list[Tensor]:
    """Steps 1–5 for one direction: per granularity, the dense ``[prompt layer …]`` score tensor."""
    N, P = run_tokens.shape
    device = w.device
    answer_pos = batch.answer_pos.to(device)
    kinds = tuple(dict.fromkeys([g.kind for g in grans]))
    # Step 1: caches of the run (incl. residual stream and keys/values) and of the source.
    run_logits, run_acts = run_with_acts(w, run_tokens, answer_pos, kinds=(*kinds, "resid_pre", "head_k", "head_v"))
    _, src_acts = run_with_acts(w, src_tokens, answer_pos, kinds=kinds)
    cache = RunCache(*(_site_stack(run_acts, k, w.n_layers) for k in ("resid_pre", "head_k", "head_v")))
    run_stack = {k: _site_stack(run_acts, k, w.n_layers) for k in kinds}
    src_stack = {k: _site_stack(src_acts, k, w.n_layers) for k in kinds}
    ans_ids, wrong_ids = batch.answer_ids.to(device), batch.wrong_ids.to(device)
    base = final_logit_diff(run_logits, batch)
    u_dir = (w.W_U[:, ans_ids] - w.W_U[:, wrong_ids]).T  # [N D]
    u_bias = w.b_U[ans_ids] - w.b_U[wrong_ids]
    # Step 2: the rows that can change the metric.
    valid_pos = torch.arange(P, device=device)[None, :] <= answer_pos[:, None]
    needed, first_diff = zip(*(_needed(g, run_stack[g.kind], src_stack[g.kind], valid_pos) for g in grans),
                             strict=True)
    rows = _rows(grans, list(needed), list(first_diff), w.n_layers)
    log.info("activation patching: %d of %d (patch, prompt) rows can change the metric", rows.n.numel(),
             sum(x.numel() for x in needed))
    # Steps 3–4: chunked suffix forwards.
    row_scores = torch.zeros(rows.n.numel(), device=device)
    for layer, p0, narrow, idx in _chunks(rows, P, max_rows):
        chunk = rows.take(idx)
        n_suffix = int(answer_pos[chunk.n].max()) + 1 - p0
        metric = suffix_metric(w, cache, layer, p0, chunk.n, answer_pos[chunk.n], u_dir[chunk.n],
                               u_bias[chunk.n], n_suffix, _patcher(grans, chunk, layer, p0, src_stack), narrow)
        row_scores[idx] = metric - base[chunk.n]
    # Step 5: scatter into dense tensors (rows not run keep their exact score 0).
    out = []
    for i, (g, need) in enumerate(zip(grans, needed, strict=True)):
        dense = torch.zeros(need.shape, device=device)
        mine = rows.g == i
        coords = {"prompt": rows.n, "layer": rows.layer, "head": rows.head, "pos": rows.pos, "src_pos": rows.src}
        dense[tuple(coords[a][mine] for a in g.axes)] = row_scores[mine]
        out.append(dense)
    return out


@register("activation", produces="nodes", exact=True)
def activation_patching(model: LoadedModel, batch: PromptBatch, cfg: MethodConfig) -> MethodResult:
    """Exact activation patching at every TransformerLens granularity, per prompt, both directions."""
    grans = select_granularities(cfg)
    w = weights(model)
    nodes: list[NodeScores] = []
    with torch.no_grad():
        for direction in cfg.directions:
            run, src = ((batch.corrupt_tokens, batch.clean_tokens) if direction == "denoise"
                        else (batch.clean_tokens, batch.corrupt_tokens))
            dense = patch_scores(w, run.to(w.device), src.to(w.device), batch, grans, cfg.max_rows)
            for g, scores in zip(grans, dense, strict=True):
                axes = g.axes if cfg.per_prompt else g.axes[1:]
                nodes.append(NodeScores(g.kind, direction, scores if cfg.per_prompt else scores.mean(0), axes))
    return MethodResult(nodes=nodes)


def granularity_of(node: NodeScores) -> str:
    """The granularity name that produced a NodeScores (by its kind and axes)."""
    for g in GRANULARITIES.values():
        if g.kind == node.component and g.axes[1:] == tuple(a for a in node.axes if a != "prompt"):
            return g.name
    raise MethodError(f"no activation-patching granularity has kind {node.component!r} and axes {node.axes}")
