"""How well each approximation matches exact patching: one join, one set of statistics, one set of figures.

    python -m analysis.compare ROOT [--out DIR] [--wandb]

The end of every sweep calls these same functions (``sweeps.summary``), so the table a sweep prints and the
one this command writes are the same numbers.

1. Pairs: every approximation beside every exact method of its table (``analysis.query.pair_sql``: pooled
   over shards, brought to the coarser granularity of the two).
2. Statistics per (level, model, task, kind, direction, method, reference, granularity), all in DuckDB over
   every pair (out of core: ``memory_limit`` and a spill directory keep the driver's memory bounded):

   * ``n_scores``; ``pearson`` = ``corr(score, exact)``;
   * ``spearman`` — Pearson correlation of the average ranks (ties share their mean rank, as scipy does);
   * ``recall_top10`` / ``recall_top5pct`` — |top-k(approx) ∩ top-k(exact)| / k, both by |score|, with
     k = min(10, n) and k = ceil(5% of n) (ties broken by the index columns, so the result is deterministic);
   * ``sign_agreement`` — fraction of pairs with sign(score) = sign(exact) (zero counts as its own sign).

   The kind is the ``component`` for nodes and ``src_component->dst_component`` for edges. Model size and
   width come from the sweep manifest (``analysis.query.model_sizes``).
3. Points for figures: a stratified sample, at most ``SCATTER_POINTS`` per (comparison, kind) facet, chosen by
   a hash of the pair's index (deterministic); the figures state n and how many are drawn.

Writes ``compare.md``, ``compare.csv``, ``correlation_by_size.png`` and one ``scatter_<…>.png`` per comparison
(``analysis.plots``) to ``--out`` (default ``ROOT/plots``; a local directory); ``--wandb`` logs them, with the
sampled points as a table and a native scatter per kind (``analysis.wandb_log``).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
from pathlib import Path

import duckdb
import pandas as pd

from analysis.query import Results, model_sizes, open_root
from attrpatch.errors import AttrpatchError, ResultsError
from attrpatch.results import EDGE_KEY, NODE_KEY, ResultsRoot

log = logging.getLogger(__name__)

TOP_K = 10  # the absolute top-k of the comparison (AtP* reports recall of the top handful of components)
TOP_FRACTION = 0.05  # the relative top-k: 5% of the scored components
SCATTER_POINTS = 2000  # points drawn per facet: enough to see the shape, small enough for a PNG and W&B
MEMORY_LIMIT = "2GB"  # DuckDB's working memory for the end-of-sweep join and statistics; beyond it, it spills
GROUP = ("level", "model", "task", "kind", "direction", "method", "reference", "granularity")
COLUMNS = (*GROUP, "n_params_m", "d_model", "n_scores", "pearson", "spearman", "recall_top10", "recall_top5pct",
           "sign_agreement")


def materialize(res: Results) -> list[dict]:
    """Step 1: every pair of every group into one DuckDB table ``_pairs (gid, layer, score, exact, rid)`` — a
    small integer group id, and a hash of the pair's index columns (deterministic ties and sampling) — so the
    statistics sort numbers, not strings (every sort spills to disk past the memory limit). Returns the groups,
    in gid order."""
    parts = [*res.pairs.get("nodes", []), *res.pairs.get("edges", [])]
    if not parts:
        raise ResultsError("nothing to compare: the root has no approximation beside an exact method "
                           "(run a method such as attribution with activation, or edge_attribution with "
                           "edge_activation)")
    selects = []
    for gid, p in enumerate(parts):
        key = NODE_KEY if p.level == "nodes" else EDGE_KEY
        cols = [c for c in key if c != "direction"]
        layer = "layer" if p.level == "nodes" else "dst_layer"
        selects.append(f"SELECT {gid}::INTEGER AS gid, {layer}::SMALLINT AS layer, score::DOUBLE AS score, "
                       f"exact::DOUBLE AS exact, hash({', '.join(cols)}) AS rid FROM ({p.sql})")
    res.con.execute("CREATE OR REPLACE TEMP TABLE _pairs AS " + " UNION ALL ".join(selects))
    return [p.group for p in parts]


STATS_SQL = """
WITH r AS (
    SELECT gid, score, exact,
        -- average ranks (ties share their mean rank): (lowest rank + highest rank) / 2 of each value's peers
        (rank() OVER ws + count(*) OVER (ws RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)) / 2.0 AS rank_score,
        (rank() OVER we + count(*) OVER (we RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)) / 2.0 AS rank_exact
    FROM _pairs
    WINDOW ws AS (PARTITION BY gid ORDER BY score), we AS (PARTITION BY gid ORDER BY exact)
)
SELECT gid, count(*) AS n_scores, corr(score, exact) AS pearson, corr(rank_score, rank_exact) AS spearman,
    avg(CASE WHEN sign(score) = sign(exact) THEN 1.0 ELSE 0.0 END) AS sign_agreement
FROM r GROUP BY gid
"""


TOPK_SQL = """
WITH k AS (
    SELECT gid, least({top_k}, n_scores) AS k1, greatest(1, CAST(ceil({fraction} * n_scores - 1e-9) AS BIGINT)) AS k2
    FROM _stats
), r AS (
    SELECT gid,
        row_number() OVER (PARTITION BY gid ORDER BY abs(score) DESC, rid) AS top_score,
        row_number() OVER (PARTITION BY gid ORDER BY abs(exact) DESC, rid) AS top_exact
    FROM _pairs
)
SELECT gid,
    count(*) FILTER (WHERE top_score <= k1 AND top_exact <= k1) / any_value(k1) AS recall_top10,
    count(*) FILTER (WHERE top_score <= k2 AND top_exact <= k2) / any_value(k2) AS recall_top5pct
FROM r JOIN k USING (gid) GROUP BY gid
"""


def compare(root: str | Path | ResultsRoot, exact: set[str] | None = None, memory_limit: str | None = MEMORY_LIMIT,
            temp_directory: str | None = None) -> tuple[pd.DataFrame, Results]:
    """Steps 1–2: the comparison table (columns ``COLUMNS``) and the opened root it came from (with the
    materialised ``_pairs`` table that ``sample_points`` reads)."""
    res = open_root(root, exact=exact, memory_limit=memory_limit,
                    temp_directory=temp_directory or tempfile.gettempdir())
    groups = pd.DataFrame(materialize(res))
    groups["gid"] = range(len(groups))
    stats = res.con.execute(STATS_SQL).df()
    res.con.register("_stats", stats[["gid", "n_scores"]])
    top = res.con.execute(TOPK_SQL.format(top_k=TOP_K, fraction=TOP_FRACTION)).df()
    res.con.unregister("_stats")
    df = groups.merge(stats, on="gid").merge(top, on="gid")
    sizes = model_sizes(res.root, sorted(df["model"].unique()) if len(df) else [])
    df["n_params_m"] = df["model"].map(lambda m: sizes[m][0]).astype(float)
    df["d_model"] = df["model"].map(lambda m: sizes[m][1]).astype(float)
    df = df.sort_values(["level", "model", "task", "method", "reference", "granularity", "direction", "kind"])
    res.groups = groups
    return df[list(COLUMNS)].reset_index(drop=True), res


SAMPLE_SQL = """
WITH c AS (SELECT gid, count(*) AS n FROM _pairs GROUP BY gid)
SELECT gid, layer, score, exact FROM _pairs JOIN c USING (gid)
WHERE rid % greatest(1, n // {thin}) = 0
QUALIFY row_number() OVER (PARTITION BY gid ORDER BY rid) <= {per_facet}
"""


def sample_points(res: Results, df: pd.DataFrame, per_facet: int = SCATTER_POINTS) -> pd.DataFrame:
    """Step 3 for the groups of ``df``: (GROUP…, layer, score, exact), at most ``per_facet`` rows per group:
    a hash filter keeps ~2× the points in one pass (no sort of the whole table), then the lowest hashes."""
    if df.empty:
        return pd.DataFrame(columns=[*GROUP, "layer", "score", "exact"])
    pts = res.con.execute(SAMPLE_SQL.format(thin=2 * per_facet, per_facet=per_facet)).df()
    wanted = res.groups.merge(df[list(GROUP)], on=list(GROUP))
    return pts.merge(wanted, on="gid")[[*GROUP, "layer", "score", "exact"]]


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (no extra dependency)."""
    def fmt(v) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def figures(df: pd.DataFrame, points: pd.DataFrame, out: Path, by_size: bool = True) -> list[Path]:
    """``correlation_by_size.png`` (with ``by_size``) and one scatter grid per comparison (``analysis.plots``)."""
    from analysis import plots

    out.mkdir(parents=True, exist_ok=True)
    several = df["model"].nunique() > 1  # one model has no size axis to draw
    written = [plots.correlation_by_size(df, out / "correlation_by_size.png")] if by_size and several else []
    for key, facet_stats in df.groupby(["level", "model", "task", "method", "reference", "granularity", "direction"]):
        level, model, task, method, reference, gran, direction = key
        sel = points
        for col, v in zip(("level", "model", "task", "method", "reference", "granularity", "direction"), key, strict=True):
            sel = sel[sel[col] == v]
        name = plots.slug("scatter", level, model, task, method, reference, gran, direction) + ".png"
        title = f"{model} · {task} · {direction}\n{method} vs {reference} ({level}, per {gran})"
        written.append(plots.scatter_grid(title, facet_stats, sel, out / name, xlabel=f"{method} score",
                                          ylabel=f"{reference} score (ground truth)"))
    return written


def run(root: str | Path, out: str | Path | None = None, use_wandb: bool = False, project: str = "attrpatch",
        mode: str = "offline", exact: set[str] | None = None) -> tuple[pd.DataFrame, list[Path]]:
    """Everything the CLI does; returns the table and the written files."""
    root_ = ResultsRoot(str(root))
    if out is None:
        if not root_.local:
            raise ResultsError(f"{root_.display()} is not a local directory: pass --out DIR for the table and figures")
        out = Path(root_.path("plots"))
    out = Path(out)
    df, res = compare(root_, exact)
    if df.empty:
        log.warning("no approximation joined with an exact method in %s (tables present: %s)", root_.display(),
                    res.tables)
    points = sample_points(res, df)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(to_markdown(df))
    df.to_csv(out / "compare.csv", index=False)
    written = [out / "compare.md", out / "compare.csv"]
    if not df.empty:
        written += figures(df, points, out)
    if use_wandb:
        from analysis.wandb_log import log_comparison

        run_dir = log_comparison(df, points, [p for p in written if p.suffix == ".png"], out, project=project,
                                 mode=mode, name=f"compare/{root_.display().rstrip('/').rsplit('/', 1)[-1]}",
                                 job_type="compare")
        log.info("W&B run directory: %s", run_dir)
    return df, written


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(prog="python -m analysis.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("root", help="results root written by a sweep (directory or pyarrow.fs URI)")
    ap.add_argument("--out", default=None, help="output directory (default ROOT/plots)")
    ap.add_argument("--wandb", action="store_true", help="log the table, figures and sampled points to W&B")
    ap.add_argument("--wandb-project", default="attrpatch")
    ap.add_argument("--wandb-mode", default="offline", choices=("offline", "online"),
                    help="offline by default: no network needed; `wandb sync` uploads later")
    ap.add_argument("--exact", action="append", default=None,
                    help="a reference method (repeatable); default: every exact method in the root")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        df, written = run(args.root, args.out, args.wandb, args.wandb_project, args.wandb_mode,
                          set(args.exact) if args.exact else None)
    except (AttrpatchError, duckdb.Error) as e:
        sys.stderr.write(f"error: {str(e).splitlines()[0]}\n")
        return 2
    table = Table(*df.columns, title=f"approximation vs exact patching: {args.root}")
    for row in df.itertuples(index=False):
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    console = Console(width=220)
    console.print(table)
    for p in written:
        console.print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
