"""How well each approximation matches exact patching, per model × task × component kind × direction.

    python -m analysis.compare ROOT [--out DIR] [--wandb]

For every approximation method against its exact reference — node methods (``attribution`` …) against
``activation``, edge methods (``edge_attribution``, ``eap_ig`` …) against ``edge_activation`` — joined on the
index columns (``analysis.query.pair_sql``), one row per (level, model, task, kind, direction, method):

* ``n_scores`` — joined scores; ``pearson`` — ``corr(score, exact)``;
* ``spearman`` — Pearson correlation of the average ranks (ties share their mean rank, as scipy does);
* ``recall_top10`` / ``recall_top5pct`` — |top-k(approx) ∩ top-k(exact)| / k, both by |score|, with
  k = min(10, n) and k = ceil(5% of n) (ties broken by the index columns, so the result is deterministic);
* ``sign_agreement`` — fraction of rows where sign(score) = sign(exact) (zero counts as its own sign).

The kind is the ``component`` for nodes and ``src_component->dst_component`` for edges. Model size (for the
x axis) comes from ``attrpatch.models.REGISTRY[model].n_params_m``, else from ``manifest.json``.

Writes ``compare.md``, ``compare.csv``, ``correlation_by_size.png`` (RelP / AtP*-style: correlation against
model size, one panel per kind) and ``scatter_<level>_<task>_<direction>_<method>.png`` (approximation
against exact, models × kinds) to ``--out`` (default ``ROOT/plots``); ``--wandb`` logs them to W&B (offline
unless ``--wandb-mode online``; the run directory is under ``--out``).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from pathlib import Path

import duckdb
import pandas as pd

from analysis.query import (
    EDGE_KEY,
    EDGE_REFERENCE,
    NODE_KEY,
    NODE_REFERENCE,
    model_sizes,
    open_results,
    table_dirs,
)

log = logging.getLogger(__name__)

TOP_K = 10  # the absolute top-k of the comparison (AtP* reports recall of the top handful of components)
TOP_FRACTION = 0.05  # the relative top-k: 5% of the scored components
SCATTER_POINTS = 2000  # points per scatter panel: enough to see the shape, small enough for a PNG
SCATTER_COLUMNS = 5  # panels per row: 15 edge kinds wrap into a readable 3 × 5 block per model
GROUP = ("level", "model", "task", "kind", "direction", "method")
COLUMNS = (*GROUP, "n_params_m", "n_scores", "pearson", "spearman", "recall_top10", "recall_top5pct",
           "sign_agreement")


def _row_id(key: tuple[str, ...]) -> str:
    return "concat_ws('|', " + ", ".join(f"coalesce(CAST({c} AS VARCHAR), '-')" for c in key) + ")"


def pairs_sql(con: duckdb.DuckDBPyConnection) -> str:
    """Step 1: one relation of (level, model, task, kind, direction, method, score, exact, rid) over the node
    and edge pair views that exist."""
    views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    parts = []
    if "node_pairs" in views:
        parts.append("SELECT 'nodes' AS level, model, task, component AS kind, direction, method, score, exact, "
                     f"{_row_id(NODE_KEY)} AS rid FROM node_pairs")
    if "edge_pairs" in views:
        parts.append("SELECT 'edges' AS level, model, task, src_component || '->' || dst_component AS kind, "
                     f"direction, method, score, exact, {_row_id(EDGE_KEY)} AS rid FROM edge_pairs")
    if not parts:
        raise ValueError("the results have neither nodes nor edges tables: nothing to compare")
    return " UNION ALL ".join(parts)


def stats_sql(pairs: str) -> str:
    """Step 2: the statistics of each group, all in DuckDB (window functions for ranks and top-k)."""
    g = ", ".join(GROUP)
    return f"""
WITH p AS ({pairs}), r AS (
    SELECT *,
        rank() OVER (PARTITION BY {g} ORDER BY score)
            + (count(*) OVER (PARTITION BY {g}, score) - 1) / 2.0 AS rank_score,
        rank() OVER (PARTITION BY {g} ORDER BY exact)
            + (count(*) OVER (PARTITION BY {g}, exact) - 1) / 2.0 AS rank_exact,
        row_number() OVER (PARTITION BY {g} ORDER BY abs(score) DESC, rid) AS top_score,
        row_number() OVER (PARTITION BY {g} ORDER BY abs(exact) DESC, rid) AS top_exact,
        count(*) OVER (PARTITION BY {g}) AS n
    FROM p
), k AS (
    SELECT *, least({TOP_K}, n) AS k1, greatest(1, CAST(ceil({TOP_FRACTION} * n - 1e-9) AS BIGINT)) AS k2 FROM r
)
SELECT {g}, count(*) AS n_scores, corr(score, exact) AS pearson, corr(rank_score, rank_exact) AS spearman,
    count(*) FILTER (WHERE top_score <= k1 AND top_exact <= k1) / any_value(k1) AS recall_top10,
    count(*) FILTER (WHERE top_score <= k2 AND top_exact <= k2) / any_value(k2) AS recall_top5pct,
    avg(CASE WHEN sign(score) = sign(exact) THEN 1.0 ELSE 0.0 END) AS sign_agreement
FROM k GROUP BY {g}
"""


def compare(root: str | Path, node_reference: str = NODE_REFERENCE,
            edge_reference: str = EDGE_REFERENCE) -> tuple[pd.DataFrame, duckdb.DuckDBPyConnection]:
    """The comparison table (columns ``COLUMNS``) and the connection it came from."""
    root = Path(root)
    con = open_results(root, node_reference=node_reference, edge_reference=edge_reference)
    df = con.execute(stats_sql(pairs_sql(con))).df()
    sizes = model_sizes(root, sorted(df["model"].unique()) if len(df) else [])
    df["n_params_m"] = df["model"].map(sizes).astype(float)
    df = df.sort_values(["level", "task", "kind", "direction", "method", "n_params_m", "model"])
    return df[list(COLUMNS)].reset_index(drop=True), con


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (no extra dependency)."""
    def fmt(v) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join(parts))


def plot_correlation_by_size(df: pd.DataFrame, path: Path) -> Path:
    """Pearson (solid) and Spearman (dashed) against model size, one panel per (level, kind)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = df[["level", "kind"]].drop_duplicates().sort_values(["level", "kind"]).itertuples(index=False)
    panels = list(panels)
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False, sharey=True)
    for ax, (level, kind) in zip(axes.flat, panels, strict=False):
        sub = df[(df["level"] == level) & (df["kind"] == kind)]
        for (task, direction, method), line in sub.groupby(["task", "direction", "method"]):
            line = line.sort_values("n_params_m")
            (h,) = ax.plot(line["n_params_m"], line["pearson"], "o-", label=f"{method} {direction} {task}")
            ax.plot(line["n_params_m"], line["spearman"], "s--", color=h.get_color(), alpha=0.6)
        ax.set_xscale("log")
        ax.set_title(f"{kind} ({level})", fontsize=9)
        ax.set_xlabel("parameters (M)")
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=6)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("correlation with exact\n(solid Pearson, dashed Spearman)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scatter_grids(con: duckdb.DuckDBPyConnection, df: pd.DataFrame, out: Path) -> list[Path]:
    """One figure per (level, task, direction, method): approximation against exact, models × kinds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = ", ".join(GROUP)
    points = con.execute(f"""
        WITH p AS ({pairs_sql(con)})
        SELECT {g}, score, exact FROM p
        QUALIFY row_number() OVER (PARTITION BY {g} ORDER BY hash(rid)) <= {SCATTER_POINTS}""").df()
    order = df.drop_duplicates("model").sort_values("n_params_m")["model"].tolist()
    paths = []
    for (level, task, direction, method), fig_pts in points.groupby(["level", "task", "direction", "method"]):
        models = [m for m in order if m in set(fig_pts["model"])]
        kinds = sorted(fig_pts["kind"].unique())
        panels = [(m, k) for m in models for k in kinds]  # model-major: each model's kinds wrap together
        cols = min(SCATTER_COLUMNS, len(kinds))
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 2.5 * rows), squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.axis("off")
        for ax, (model, kind) in zip(axes.flat, panels, strict=False):
            cell = fig_pts[(fig_pts["model"] == model) & (fig_pts["kind"] == kind)]
            if cell.empty:
                ax.axis("off")
                continue
            ax.scatter(cell["exact"], cell["score"], s=3, alpha=0.5)
            lo = min(cell["exact"].min(), cell["score"].min())
            hi = max(cell["exact"].max(), cell["score"].max())
            ax.plot([lo, hi], [lo, hi], color="grey", lw=0.5)
            ax.set_title(f"{model} · {kind}", fontsize=7)
            ax.tick_params(labelsize=6)
        fig.supxlabel("exact patching")
        fig.supylabel(f"{method} ({direction})")
        fig.tight_layout()
        path = out / f"scatter_{_slug(level, task, direction, method)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def log_to_wandb(df: pd.DataFrame, figures: list[Path], out: Path, project: str, mode: str) -> str:
    """Log the table and figures to W&B (offline by default); returns the run directory."""
    import wandb

    run = wandb.init(project=project, job_type="compare", dir=str(out), mode=mode)
    try:
        run.log({"compare": wandb.Table(dataframe=df)})
        run.log({f"plots/{p.stem}": wandb.Image(str(p)) for p in figures})
        return str(Path(run.dir).parent)
    finally:
        run.finish()


def run(root: str | Path, out: str | Path | None = None, use_wandb: bool = False, project: str = "attrpatch",
        mode: str = "offline", node_reference: str = NODE_REFERENCE,
        edge_reference: str = EDGE_REFERENCE) -> tuple[pd.DataFrame, list[Path]]:
    """Everything the CLI does; returns the table and the written files."""
    root = Path(root)
    out = Path(out) if out is not None else root / "plots"
    out.mkdir(parents=True, exist_ok=True)
    df, con = compare(root, node_reference, edge_reference)
    if df.empty:
        log.warning("no approximation joined with its reference (%s / %s) in %s: tables present %s",
                    node_reference, edge_reference, root, table_dirs(root))
    (out / "compare.md").write_text(to_markdown(df))
    df.to_csv(out / "compare.csv", index=False)
    figures = []
    if not df.empty:
        figures = [plot_correlation_by_size(df, out / "correlation_by_size.png"), *plot_scatter_grids(con, df, out)]
    written = [out / "compare.md", out / "compare.csv", *figures]
    if use_wandb:
        log.info("W&B run directory: %s", log_to_wandb(df, figures, out, project, mode))
    return df, written


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(prog="python -m analysis.compare", description=__doc__.split("\n\n")[2])
    ap.add_argument("root", help="results root written by a sweep")
    ap.add_argument("--out", default=None, help="output directory (default ROOT/plots)")
    ap.add_argument("--wandb", action="store_true", help="log the table and figures to W&B")
    ap.add_argument("--wandb-project", default="attrpatch")
    ap.add_argument("--wandb-mode", default="offline", choices=("offline", "online"),
                    help="offline by default: no network needed; `wandb sync` uploads later")
    ap.add_argument("--node-reference", default=NODE_REFERENCE)
    ap.add_argument("--edge-reference", default=EDGE_REFERENCE)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    df, written = run(args.root, args.out, args.wandb, args.wandb_project, args.wandb_mode,
                      args.node_reference, args.edge_reference)
    table = Table(*df.columns, title=f"approximation vs exact patching: {args.root}")
    for row in df.itertuples(index=False):
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    console = Console(width=200)
    console.print(table)
    for p in written:
        console.print(f"wrote {p}")


if __name__ == "__main__":
    main()
