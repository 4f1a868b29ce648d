"""The end of a sweep: ``analysis.compare``'s table, figures and W&B logging, then the table on the terminal.

    python -c "from sweeps.summary import render; help(render)"

1. ``analysis.compare.compare`` over the whole root (the same join and statistics ``python -m analysis.compare``
   prints), out of core: DuckDB works within ``analysis.compare.MEMORY_LIMIT`` and spills to a temporary
   directory, so the driver's memory does not grow with the dataset.
2. Figures (``analysis.plots``) under ``ROOT/plots`` — written locally first for a remote root, then copied —
   from a stratified sample of at most ``SCATTER_POINTS`` per facet.
3. One W&B run per (model, task) (``analysis.wandb_log``), unless ``wandb.mode=disabled``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import tempfile
from pathlib import Path

from analysis.compare import compare, figures, sample_points, to_markdown
from attrpatch.errors import ResultsError

log = logging.getLogger(__name__)


def summarise(report) -> None:
    """Steps 1–3: fills ``report.correlations``, ``report.plots`` and ``report.wandb_dirs``."""
    cfg, root = report.cfg, report.root
    try:
        df, res = compare(root)
    except ResultsError as e:  # nothing pairs (e.g. only exact methods ran): no table, no figures
        log.info("no comparison: %s", e)
        return
    seconds = collections.defaultdict(float)
    for r in report.records:
        seconds[(r["model"], r["task"], r["method"])] += r["compute_s"]
    for r in df.to_dict("records"):
        report.correlations.append({
            "model": r["model"], "task": r["task"], "approx": r["method"], "exact": r["reference"],
            "table": r["level"], "kind": r["kind"], "direction": r["direction"], "granularity": r["granularity"],
            "n": int(r["n_scores"]), "pearson": _nan(r["pearson"]), "spearman": _nan(r["spearman"]),
            "approx_s": seconds[(r["model"], r["task"], r["method"])],
            "exact_s": seconds[(r["model"], r["task"], r["reference"])]})
    if df.empty:
        return
    points = sample_points(res, df)
    local = Path(root.path("plots")) if root.local else Path(tempfile.mkdtemp(prefix="attrpatch-plots-"))
    written: list[Path] = []
    if cfg.output.plots:
        for (model, task), sub in df.groupby(["model", "task"]):
            out = local / f"model={model}" / f"task={task}"
            written += figures(sub, points[(points["model"] == model) & (points["task"] == task)], out, by_size=False)
        local.mkdir(parents=True, exist_ok=True)
        written += figures(df, points.iloc[:0], local, by_size=True)[:1] if df["model"].nunique() > 1 else []
        (local / "compare.md").write_text(to_markdown(df))
        df.to_csv(local / "compare.csv", index=False)
        if not root.local:
            for p in [*written, local / "compare.md", local / "compare.csv"]:
                root.write_bytes(f"plots/{p.relative_to(local)}", p.read_bytes())
        report.plots += [root.display(f"plots/{p.relative_to(local)}") for p in written]
    if cfg.wandb.mode != "disabled":
        from analysis.wandb_log import log_comparison

        directory = root.path() if root.local else os.path.abspath(os.path.join("wandb-runs", cfg.name))
        for (model, task), sub in df.groupby(["model", "task"]):
            figs = [p for p in written if p.parent == local / f"model={model}" / f"task={task}"]
            pts = points[(points["model"] == model) & (points["task"] == task)]
            report.wandb_dirs.append(log_comparison(
                sub, pts, figs, directory, project=cfg.wandb.project, mode=cfg.wandb.mode, name=f"{model}/{task}",
                group=cfg.wandb.group or cfg.name, entity=cfg.wandb.entity, tags=[cfg.name, model, task, *cfg.wandb.tags],
                config={**dataclasses.asdict(cfg), "run_model": model, "run_task": task, "results_root": root.uri}))


def _nan(v):
    return math.nan if v is None else float(v)


def render(report, console) -> None:
    """The end-of-sweep table (model × task × comparison × kind: scores, Pearson, Spearman, time) and paths."""
    from rich.table import Table

    t = Table(title=f"sweep {report.cfg.name}: approximation vs exact patching, per component kind")
    for col, just in (("model · task", "left"), ("approximation vs exact", "left"), ("time (s)", "right"),
                      ("kind", "left"), ("scores", "right"), ("pearson", "right"), ("spearman", "right")):
        t.add_column(col, justify=just, no_wrap=True)
    last = None
    for r in report.correlations:
        group = (r["model"], r["task"], r["approx"], r["exact"], r["direction"], r["granularity"])
        first = group != last
        if first and last is not None:
            t.add_section()
        last = group
        label = f"{r['approx']} vs {r['exact']} ({r['direction']}, per {r['granularity']})"
        t.add_row(f"{r['model']} · {r['task']}" if first else "", label if first else "",
                  f"{r['approx_s']:.1f} / {r['exact_s']:.1f}" if first else "", r["kind"], f"{r['n']:,}",
                  _fmt(r["pearson"]), _fmt(r["spearman"]))
    if not report.correlations:
        t.add_row("—", "no approximation ran beside an exact method", "", "", "", "", "")
    console.print(t)
    ran = f"{report.ran} cells run, {report.skipped} resumed" if report.skipped else f"{report.ran} cells run"
    if report.recomputed:
        ran += f" ({len(report.recomputed)} recomputed: their parts failed verification)"
    console.print(f"{ran} in {report.wall_s:.0f} s (worker compute {report.compute_s:.0f} s, summary "
                  f"{report.summary_s:.1f} s)")
    root = report.root
    glob = f"{root.display('nodes')}/**/*.parquet"
    console.print(f"Parquet dataset: {root.display()}  (e.g. duckdb -c \"select * from read_parquet('{glob}', "
                  "hive_partitioning=true)\")")
    if report.plots:
        console.print(f"plots:           {root.display('plots')}  ({len(report.plots)} PNG)")
    for d in report.wandb_dirs:
        console.print(f"W&B run:         {d}")
    console.print(f"manifest:        {root.display('manifest.json')}")


def _fmt(v: float) -> str:
    return "—" if v is None or math.isnan(v) else f"{v:+.3f}"
