"""Correlation views of a finished sweep: every approximation paired with the exact method of its family.

    python -c "from sweeps.summary import comparisons; print(comparisons(['attribution','activation','edge_attribution','edge_activation']))"

1. Pairs: each non-exact method that produces nodes (AtP, DLA, attention attribution, …) is paired with
   each exact node method (activation patching); each non-exact edge method (EAP, EAP-IG) with each exact
   edge method (edge patching).
2. Join, with DuckDB over the written part files, on the score's coordinates: (shard, direction,
   component, layer, head, pos, src_pos, prompt) for nodes; (shard, direction, src/dst component, layer,
   head, pos, prompt) for edges. Nulls match nulls; the shard keeps shard means apart.
3. Per component kind (the source→target kinds for edges): n, Pearson r and Spearman ρ.
4. Plots (``sweeps.plots``) under ROOT/plots and one W&B run per (model, task) (``sweeps.wandb_log``).
"""

from __future__ import annotations

import collections
import logging
import math

import duckdb
import numpy as np
import pyarrow as pa
from scipy import stats

from attrpatch.components import NODE_KINDS
from attrpatch.methods import get_method

log = logging.getLogger(__name__)

NODE_KEYS = ("direction", "component", "layer", "head", "pos", "src_pos", "prompt")
EDGE_KEYS = ("direction", "src_component", "src_layer", "src_head", "dst_component", "dst_layer", "dst_head",
             "pos", "prompt")
KIND_ORDER = {k: i for i, k in enumerate(NODE_KINDS)}


def comparisons(methods) -> list[tuple[str, str, str]]:
    """Step 1: (approximation, exact, table) for every pair of the same family among ``methods``."""
    out = []
    for table, produces in (("nodes", ("nodes", "both")), ("edges", ("edges", "both"))):
        infos = [get_method(m) for m in methods]
        exact = [i.name for i in infos if i.exact and i.produces in produces]
        approx = [i.name for i in infos if not i.exact and i.produces in produces]
        out += [(a, e, table) for a in approx for e in exact]
    return out


def _scores(report, model: str, task: str, method: str, table: str) -> pa.Table:
    """Every part of one (model, task, method) table, with its shard as a column."""
    parts = []
    for r in report.records:
        if (r["model"], r["task"], r["method"]) == (model, task, method) and table in r["rows"]:
            rel = f"{table}/model={model}/task={task}/method={method}/part-{r['shard']:05d}.parquet"
            t = report.root.read_table(rel)
            parts.append(t.append_column("shard", pa.array(np.full(t.num_rows, r["shard"], np.int32))))
    return pa.concat_tables(parts) if parts else None


def joined(a: pa.Table, b: pa.Table, table: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Step 2: {kind: (approx score, exact score, layer)} over the rows both methods scored."""
    keys = ("shard", *(NODE_KEYS if table == "nodes" else EDGE_KEYS))
    on = " and ".join(f"coalesce(a.{k}, -1) = coalesce(b.{k}, -1)" if k not in ("direction", "component",
                      "src_component", "dst_component") else f"a.{k} = b.{k}" for k in keys)
    kind = "a.component" if table == "nodes" else "a.src_component || '->' || a.dst_component"
    layer = "a.layer" if table == "nodes" else "a.dst_layer"
    con = duckdb.connect()
    con.register("a", a)
    con.register("b", b)
    res = con.sql(f"select {kind} as kind, {layer} as layer, a.score as x, b.score as y "
                      f"from a join b on {on} order by kind").to_arrow_table()
    con.close()
    out = {}
    kinds = res.column("kind").to_numpy(zero_copy_only=False)
    x, y = res.column("x").to_numpy(), res.column("y").to_numpy()
    layer_col = res.column("layer").to_numpy()
    for k in np.unique(kinds):
        sel = kinds == k
        out[str(k)] = (x[sel], y[sel], layer_col[sel])
    return dict(sorted(out.items(), key=lambda kv: (KIND_ORDER.get(kv[0], len(KIND_ORDER)), kv[0])))


def correlation(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Step 3: Pearson r and Spearman ρ (NaN when fewer than 3 pairs or a side is constant)."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    return float(np.corrcoef(x, y)[0, 1]), float(stats.spearmanr(x, y).statistic)


def summarise(report) -> None:
    """Steps 1-4 for every (model, task): fills report.correlations, report.plots, report.wandb_dirs."""
    from sweeps import plots, wandb_log

    cfg = report.cfg
    pairs = comparisons(cfg.methods)
    seconds = collections.defaultdict(float)
    for r in report.records:
        seconds[(r["model"], r["task"], r["method"])] += r["compute_s"]
    groups = sorted({(r["model"], r["task"]) for r in report.records})
    for model, task in groups:
        rows, figures = [], {}
        for approx, exact, table in pairs:
            a, b = (_scores(report, model, task, m, table) for m in (approx, exact))
            if a is None or b is None:
                continue
            facets = joined(a, b, table)
            for kind, (x, y, _) in facets.items():
                pearson, spearman = correlation(x, y)
                rows.append({"model": model, "task": task, "approx": approx, "exact": exact, "table": table,
                             "kind": kind, "n": int(len(x)), "pearson": pearson, "spearman": spearman,
                             "approx_s": seconds[(model, task, approx)], "exact_s": seconds[(model, task, exact)]})
            if cfg.output.plots and facets:
                rel = f"plots/model={model}/task={task}/{approx}_vs_{exact}.png"
                png = plots.scatter_grid(f"{model} · {task}\n{approx} vs {exact} ({table})", facets,
                                         xlabel=f"{approx} score", ylabel=f"{exact} score (ground truth)")
                report.root.write_bytes(rel, png)
                figures[f"{approx}_vs_{exact}"] = rel
                report.plots.append(report.root.path(rel))
        report.correlations += rows
        if cfg.wandb.mode != "disabled":
            run_dir = wandb_log.log_run(report, model, task, rows, figures)
            report.wandb_dirs.append(run_dir)


def render(report, console) -> None:
    """The end-of-sweep table (models × component kinds: correlation, number of scores, time) and paths."""
    from rich.table import Table

    t = Table(title=f"sweep {report.cfg.name}: approximation vs exact patching, per component kind")
    for col, just in (("model · task", "left"), ("approximation vs exact", "left"), ("time (s)", "right"),
                      ("kind", "left"), ("scores", "right"), ("pearson", "right"), ("spearman", "right")):
        t.add_column(col, justify=just, no_wrap=True)
    last = None
    for r in report.correlations:
        group = (r["model"], r["task"], r["approx"], r["exact"])
        first = group != last
        if first and last is not None:
            t.add_section()
        last = group
        t.add_row(f"{r['model']} · {r['task']}" if first else "", f"{r['approx']} vs {r['exact']}" if first else "",
                  f"{r['approx_s']:.1f} / {r['exact_s']:.1f}" if first else "", r["kind"], f"{r['n']:,}",
                  _fmt(r["pearson"]), _fmt(r["spearman"]))
    if not report.correlations:
        t.add_row("—", "no approximation ran beside an exact method", "", "", "", "", "")
    console.print(t)
    ran = f"{report.ran} cells run, {report.skipped} resumed" if report.skipped else f"{report.ran} cells run"
    console.print(f"{ran} in {report.wall_s:.0f} s (worker compute {report.compute_s:.0f} s)")
    root = report.root
    console.print(f"Parquet dataset: {root.uri}  (e.g. duckdb -c \"select * from read_parquet("
                  f"'{root.uri}/nodes/**/*.parquet', hive_partitioning=true)\")")
    if report.plots:
        console.print(f"plots:           {root.path('plots')}  ({len(report.plots)} PNG)")
    for d in report.wandb_dirs:
        console.print(f"W&B run:         {d}")
    console.print(f"manifest:        {root.path('manifest.json')}")


def _fmt(v: float) -> str:
    return "—" if v is None or math.isnan(v) else f"{v:+.3f}"
