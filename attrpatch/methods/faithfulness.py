"""Circuit faithfulness: keep the top-k% edges (or nodes) by a ranking method, ablate the rest, measure.

    python -c "from attrpatch import load_model, make_batch; from attrpatch.methods import run_method; m = load_model('ioi-tiny'); print(run_method('faithfulness', m, make_batch('ioi', m.tokenizer, 8)).tables['faithfulness'].to_pandas())"

Algorithm (MIB circuit-localization track, Mueller et al. 2025, arXiv:2504.13151, and its evaluation code
``MIB_circuit_track/evaluation.py::evaluate_area_under_curve``; the IOI minimal-circuit check of Wang et al.
2022 is the same measurement for one hand-picked circuit):

1. Rank: run ``options.ranking`` on the same batch (default ``edge_attribution`` for edges,
   ``attribution`` for nodes), mean over prompts and summed over positions, and order the edges (or the
   head_out / mlp_out nodes; ``embed`` always stays) by |score|, ties in index order.
2. For each k in ``K_PERCENT``: the circuit C_k is the top n_k = ⌊k/100 · N⌋ of the N ranked edges (nodes; a
   node circuit keeps every edge out of its nodes).
3. Measure m(C) = mean logit difference over the prompts with every edge outside C ablated
   (``attrpatch.circuits``: each ablated edge carries the corrupted write, ``ablation="patch"``, or the
   per-template mean of the corrupted writes, ``"mean"``), for C_k, the empty circuit ∅ and the full
   graph N (m(N) is the clean model's metric, computed through the same code so f(100%) = 1 exactly).
4. Faithfulness and its areas, with x = k/100 over the evaluated k (trapezoid, as MIB's ``log_scale=False``):

       f(k) = (m(C_k) − m(∅)) / (m(N) − m(∅))
       CPR  = Σ_i (x_{i+1} − x_i) · (f_i + f_{i+1}) / 2                 (area under f; higher is better)
       CMD  = Σ_i (x_{i+1} − x_i) · (|1 − f_i| + |1 − f_{i+1}|) / 2     (area between f and 1; lower is better)

``direction`` is the direction of the ranking scores; the ablation is always MIB's (run clean, ablate with
corrupted). f is NaN when m(N) = m(∅). Output: ``MethodResult.tables["faithfulness"]`` with
``FAITHFULNESS_SCHEMA``, one row per (direction, k); the metric columns let a reader pool shards
(``analysis.query`` view ``faithfulness_curves``).

Options (``FaithfulnessOptions``): ``ranking`` (a registered method), ``level`` (``"edge"`` | ``"node"``),
``ablation`` (``"patch"`` | ``"mean"``), ``k_percent`` (a list of percentages). Config read: ``directions``,
``max_rows``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from attrpatch.circuits import circuit_metric
from attrpatch.components import Node
from attrpatch.engine import weights
from attrpatch.methods import (
    MethodConfig,
    MethodError,
    Options,
    get_method,
    register,
    register_cost,
    run_method,
)
from attrpatch.methods.core import Cost, Work
from attrpatch.models import LoadedModel
from attrpatch.scores import EdgeIndex, EdgeScores, MethodResult, NodeScores
from attrpatch.tasks import PromptBatch

K_PERCENT = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)  # MIB's circuit sizes (% of edges)
DEFAULT_RANKING = {"edge": "edge_attribution", "node": "attribution"}  # the cheap estimate of each level
NODE_KINDS = ("head_out", "mlp_out")  # the nodes a node circuit chooses among (MIB: heads and MLPs)

FAITHFULNESS_SCHEMA = pa.schema([
    ("direction", pa.string()),  # direction of the ranking scores
    ("ranking", pa.string()),  # the method whose scores chose the circuit
    ("level", pa.string()),  # "edge" or "node": what k counts
    ("ablation", pa.string()),  # "patch" or "mean"
    ("k_percent", pa.float32()),  # nominal circuit size, % of the ranked edges (nodes)
    ("n_kept", pa.int32()),  # ranked edges (nodes) kept: ⌊k/100 · n_total⌋
    ("n_total", pa.int32()),  # edges (nodes) ranked
    ("n_edges_kept", pa.int32()),  # edges in the circuit (= n_kept for edge circuits)
    ("metric", pa.float32()),  # m(C): mean logit difference over the prompts
    ("metric_full", pa.float32()),  # m(N)
    ("metric_empty", pa.float32()),  # m(∅)
    ("faithfulness", pa.float32()),  # f(k)
    ("cpr", pa.float32()),  # area under f over x = k/100 (same on every row of a curve)
    ("cmd", pa.float32()),  # area between |1 − f| and 0
    ("n_prompts", pa.int32()),
])


def areas(k_percent, f) -> tuple[float, float]:
    """Step 4: (CPR, CMD) of a curve f over k (percent), trapezoid over x = k/100 as MIB computes them."""
    x = np.asarray(k_percent, dtype=np.float64) / 100
    f = np.asarray(f, dtype=np.float64)
    if x.shape != f.shape or x.ndim != 1 or np.any(np.diff(x) <= 0):
        raise MethodError("k_percent must be strictly increasing and as long as the faithfulness curve")
    dx = np.diff(x)
    cpr = float(np.sum(dx * (f[1:] + f[:-1]) / 2))
    cmd = float(np.sum(dx * (np.abs(1 - f[1:]) + np.abs(1 - f[:-1])) / 2))
    return cpr, cmd


def n_kept(k_percent, n_total: int) -> np.ndarray:
    """Step 2: ⌊k/100 · N⌋ (MIB's ``int(pct * n)``), robust to 0.29·100 = 28.999…"""
    return np.floor(np.asarray(k_percent, dtype=np.float64) * n_total / 100 + 1e-9).astype(np.int64)


def _reduce(scores: Tensor, axes: tuple[str, ...], keep: tuple[str, ...]) -> Tensor:
    """Mean over ``prompt``, sum over ``pos`` / ``src_pos``: the scores on the ``keep`` axes only."""
    x = scores.detach().float()
    for i in reversed(range(len(axes))):
        if axes[i] == "prompt":
            x = x.mean(i)
        elif axes[i] not in keep:
            x = x.sum(i)
    return x


def rank_positions(values: Tensor, valid: Tensor) -> Tensor:
    """Step 1: each valid cell's place in the order by |value| (0 = first; stable ties); invalid = a huge number."""
    flat = values.abs().flatten().masked_fill(~valid.flatten(), -math.inf)
    order = torch.sort(flat, descending=True, stable=True).indices
    pos = torch.empty_like(order)
    pos[order] = torch.arange(len(order), device=order.device)
    return pos.masked_fill(~valid.flatten(), torch.iinfo(pos.dtype).max).view(values.shape)


def edge_circuits(es: EdgeScores, n: np.ndarray) -> Tensor:
    """Steps 1–2 at the edge level: bool [len(n), src, dst], the top n[i] edges by |score|."""
    ranks = rank_positions(_reduce(es.scores, es.axes, ("src", "dst")), es.index.valid.to(es.scores.device))
    return ranks[None] < torch.as_tensor(n, device=ranks.device)[:, None, None]


def node_circuits(nodes: list[NodeScores], index: EdgeIndex, n: np.ndarray) -> tuple[Tensor, int]:
    """Steps 1–2 at the node level: bool [len(n), src, dst] keeping every edge out of the top n[i] nodes
    (head_out, mlp_out) and out of ``embed``; and the number of ranked nodes."""
    src_pos = {node: i for i, node in enumerate(index.src)}
    ranked_src, values = [], []
    for ns in nodes:
        if ns.component not in NODE_KINDS:
            continue
        keep = ("layer", "head") if ns.component == "head_out" else ("layer",)
        v = _reduce(ns.scores, ns.axes, keep)
        if ns.component == "head_out":
            cells = [(lyr, h) for lyr in range(v.shape[0]) for h in range(v.shape[1])]
            ranked_src += [src_pos[Node("head_out", lyr, h)] for lyr, h in cells]
        else:
            ranked_src += [src_pos[Node("mlp_out", lyr)] for lyr in range(v.shape[0])]
        values.append(v.flatten())
    if not values:
        raise MethodError(f"the ranking method gave no {list(NODE_KINDS)} scores: use a node method such as "
                          "'attribution' or 'activation' for level='node'")
    vals = torch.cat(values)
    ranks = rank_positions(vals, torch.ones_like(vals, dtype=torch.bool))
    chosen = ranks[None] < torch.as_tensor(n, device=ranks.device)[:, None]  # [circuit, ranked node]
    keep_src = torch.zeros(len(n), len(index.src), dtype=torch.bool, device=chosen.device)
    keep_src[:, torch.tensor(ranked_src, device=chosen.device)] = chosen
    keep_src[:, [i for i, node in enumerate(index.src) if node.component == "embed"]] = True
    return keep_src[:, :, None] & index.valid.to(chosen.device)[None], len(ranked_src)


@dataclass(frozen=True)
class FaithfulnessOptions(Options):
    ranking: str | None = None  # the method whose scores choose the circuit; None: DEFAULT_RANKING[level]
    level: Literal["edge", "node"] = "edge"  # MIB's circuits are edge sets; "node" keeps top heads/MLPs
    ablation: Literal["patch", "mean"] = "patch"  # corrupted write, or its per-template mean
    k_percent: tuple[float, ...] = K_PERCENT  # circuit sizes, % of the ranked edges (nodes)

    def __post_init__(self) -> None:
        super().__post_init__()
        ks = tuple(float(k) for k in self.k_percent)
        object.__setattr__(self, "k_percent", ks)
        if not ks or any(not 0 <= k <= 100 for k in ks) or list(ks) != sorted(set(ks)):
            raise MethodError(f"k_percent must be strictly increasing percentages in [0, 100], got {list(ks)}")

    @property
    def ranking_method(self) -> str:
        return self.ranking or DEFAULT_RANKING[self.level]

    def check(self, cfg: MethodConfig) -> None:
        info = get_method(self.ranking_method)
        need = "edges" if self.level == "edge" else "nodes"
        if info.name == "faithfulness" or info.produces not in (need, "both"):
            raise MethodError(f"ranking={info.name!r} produces {info.produces}, but level={self.level!r} ranks "
                              f"{need}: use e.g. {DEFAULT_RANKING[self.level]!r}")


def full_index(model: LoadedModel) -> EdgeIndex:
    from attrpatch.graph import EdgeGraph

    return EdgeGraph.of(model).index()


def curve_rows(direction: str, ranking: str, level: str, ablation: str, ks: tuple[float, ...],
               n: np.ndarray, n_total: int, n_edges: np.ndarray, metric_by_n: dict[int, float],
               n_prompts: int) -> pa.Table:
    """Step 4 for one curve: the table rows, with f, CPR and CMD."""
    full, empty = metric_by_n[n_total], metric_by_n[0]
    m = np.array([metric_by_n[int(x)] for x in n], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = (m - empty) / (full - empty)
    cpr, cmd = areas(ks, f) if len(ks) > 1 else (math.nan, math.nan)
    rows = len(ks)
    return pa.Table.from_arrays([
        pa.array([direction] * rows), pa.array([ranking] * rows), pa.array([level] * rows),
        pa.array([ablation] * rows), pa.array(np.array(ks, np.float32)), pa.array(n.astype(np.int32)),
        pa.array(np.full(rows, n_total, np.int32)), pa.array(n_edges.astype(np.int32)),
        pa.array(m.astype(np.float32)), pa.array(np.full(rows, full, np.float32)),
        pa.array(np.full(rows, empty, np.float32)), pa.array(f.astype(np.float32)),
        pa.array(np.full(rows, cpr, np.float32)), pa.array(np.full(rows, cmd, np.float32)),
        pa.array(np.full(rows, n_prompts, np.int32)),
    ], schema=FAITHFULNESS_SCHEMA)


def evaluate_circuits(model: LoadedModel, batch: PromptBatch, index: EdgeIndex, circuits_for, n_total: int,
                      ks: tuple[float, ...], ablation: str, max_rows: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Steps 2–3: circuits for every distinct size (plus ∅ and N), one measurement each.

    ``circuits_for(sizes)`` gives the bool circuits of the given sizes. Equal sizes share one circuit and
    one measurement, so f = 0 exactly when nothing is kept and f = 1 exactly when everything is."""
    n = n_kept(ks, n_total)
    sizes = np.unique(np.concatenate([[0, n_total], n]))
    circuits = circuits_for(sizes)
    metric = circuit_metric(weights(model), index, circuits, batch, ablation, max_rows).double().mean(1)
    metric_by_n = {int(s): float(v) for s, v in zip(sizes, metric.tolist(), strict=True)}
    n_edges_by_n = dict(zip(sizes.tolist(), circuits.flatten(1).sum(1).tolist(), strict=True))
    return n, np.array([n_edges_by_n[int(x)] for x in n]), metric_by_n


def edge_curve(model: LoadedModel, batch: PromptBatch, es: EdgeScores, ranking: str = "given",
               ks: tuple[float, ...] = K_PERCENT, ablation: str = "patch", max_rows: int = 256) -> pa.Table:
    """Steps 1–4 for edge scores: the faithfulness rows of the top-k% edges by |score|."""
    n_total = es.index.n_edges
    n, n_edges, metric_by_n = evaluate_circuits(model, batch, es.index, lambda sizes: edge_circuits(es, sizes),
                                                n_total, ks, ablation, max_rows)
    return curve_rows(es.direction, ranking, "edge", ablation, ks, n, n_total, n_edges, metric_by_n, len(batch))


def node_curve(model: LoadedModel, batch: PromptBatch, nodes: list[NodeScores], index: EdgeIndex,
               ranking: str = "given", ks: tuple[float, ...] = K_PERCENT, ablation: str = "patch",
               max_rows: int = 256) -> pa.Table:
    """Steps 1–4 for node scores (one direction): the rows of the top-k% head_out / mlp_out nodes."""
    directions = {ns.direction for ns in nodes}
    if len(directions) != 1:
        raise MethodError(f"node_curve takes the node scores of one direction, got {sorted(directions)}")
    n_total = sum(1 for s in index.src if s.component in NODE_KINDS)
    n, n_edges, metric_by_n = evaluate_circuits(
        model, batch, index, lambda sizes: node_circuits(nodes, index, sizes)[0], n_total, ks, ablation, max_rows)
    return curve_rows(directions.pop(), ranking, "node", ablation, ks, n, n_total, n_edges, metric_by_n, len(batch))


@register("faithfulness", produces="tables", options=FaithfulnessOptions)
def faithfulness(model: LoadedModel, batch: PromptBatch, cfg: MethodConfig) -> MethodResult:
    """Circuit faithfulness f(k), CPR and CMD (MIB circuit track) of the top-k edges/nodes of a ranking."""
    opts = cfg.options
    ranking, level, ablation, ks = opts.ranking_method, opts.level, opts.ablation, opts.k_percent
    kinds = NODE_KINDS if level == "node" else None
    ranked = run_method(ranking, model, batch,
                        replace(cfg, per_prompt=False, per_position=False, kinds=kinds, options=None))
    tables = []
    for direction in cfg.directions:
        if level == "edge":
            (es,) = [e for e in ranked.edges if e.direction == direction]
            tables.append(edge_curve(model, batch, es, ranking, ks, ablation, cfg.max_rows))
        else:
            nodes = [ns for ns in ranked.nodes if ns.direction == direction]
            tables.append(node_curve(model, batch, nodes, full_index(model), ranking, ks, ablation, cfg.max_rows))
    return MethodResult(tables={"faithfulness": pa.concat_tables(tables)})


@register_cost("faithfulness")
def faithfulness_cost(w: Work, cfg: MethodConfig) -> Cost:
    from attrpatch.graph import EdgeGraph
    from attrpatch.methods.core import forward_flops

    opts = cfg.options
    S = w.shape
    graph = EdgeGraph(S.n_layers, S.n_heads)
    info = get_method(opts.ranking_method)
    kinds = NODE_KINDS if opts.level == "node" else None
    if info.cost is None:
        raise MethodError(f"ranking method {info.name!r} has no cost model")
    rank = info.cost(w, replace(cfg, per_prompt=False, per_position=False, kinds=kinds, options=info.options()))
    n_total = graph.n_edges if opts.level == "edge" else S.n_layers * (S.n_heads + 1)
    sizes = len(np.unique(np.concatenate([[0, n_total], n_kept(opts.k_percent, n_total)])))
    d = len(cfg.directions)
    # each circuit: a split forward of the clean prompts with δ added at every target input
    delta = 2.0 * w.n * w.P * S.d_model * graph.n_edges
    flops = rank.flops + d * sizes * (forward_flops(S, w.n, w.P, logits=False) + delta)
    per_row = w.dtype_bytes * w.P * S.d_model * (graph.n_src + 6 * S.n_heads + 12)
    fixed = rank.fixed_bytes + w.dtype_bytes * w.n * w.P * graph.n_src * S.d_model
    return Cost({"faithfulness": d * len(opts.k_percent)}, forward_rows=rank.forward_rows + d * sizes * w.n,
                flops=flops, fixed_bytes=int(fixed),
                peak_bytes=int(max(rank.peak_bytes, fixed + min(cfg.max_rows, sizes * w.n) * per_row)))
