"""Open a results root as DuckDB views, so a user's script is a few lines of SQL or a DataFrame.

    python -c "from analysis.query import open_results; print(open_results('ROOT').sql('select * from nodes limit 5'))"

Views (each exists only when its directory holds Parquet files; Hive partitions give the columns ``model``,
``task`` and ``method`` as strings):

* ``nodes``, ``edges``, ``prompts`` — the tables of the results contract (``../shared/DESIGN.md``);
* one view per extra table directory (e.g. ``faithfulness``), read the same way;
* ``node_pairs`` / ``edge_pairs`` — every approximation joined with its exact reference on the index
  columns (``score`` = the approximation, ``exact`` = the reference); see ``pair_sql``;
* ``faithfulness_curves`` — faithfulness pooled over prompt shards, with CPR and CMD per curve;
* ``models`` — ``model``, ``n_params_m`` for every model directory (registry first, then ``manifest.json``;
  NULL when unknown).

Rows are first pooled over shards (a weighted mean by ``n_prompts`` of the rows that share a key), so
shard-mean rows (``prompt`` null) from several shards join one-to-one, and per-prompt rows are unchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import duckdb
import pandas as pd

from attrpatch.errors import AttrpatchError

CONTRACT_TABLES = ("nodes", "edges", "prompts")
NODE_KEY = ("direction", "component", "layer", "head", "pos", "src_pos", "prompt")
EDGE_KEY = ("direction", "src_component", "src_layer", "src_head", "dst_component", "dst_layer", "dst_head",
            "pos", "prompt")
PARTITIONS = ("model", "task")
NODE_REFERENCE = "activation"  # exact activation patching: the ground truth for node scores
EDGE_REFERENCE = "edge_activation"  # exact edge patching: the ground truth for edge scores
NOT_TABLES = ("plots", "wandb")  # directories under ROOT that hold figures or W&B runs (and _*/.*: bookkeeping)


class ResultsError(AttrpatchError):
    """A results root that cannot be read; the message says what is missing."""


def _glob(root: Path, table: str) -> str:
    return str(root / table / "**" / "*.parquet")


def table_dirs(root: str | Path) -> list[str]:
    """Names of the directories under ``root`` that hold Parquet part files (contract tables first)."""
    root = Path(root)
    found = [d.name for d in sorted(root.iterdir()) if d.is_dir() and d.name not in NOT_TABLES
             and d.name[0] not in "._" and next(d.rglob("*.parquet"), None) is not None]
    return [t for t in CONTRACT_TABLES if t in found] + [t for t in found if t not in CONTRACT_TABLES]


def _null_safe(cols: tuple[str, ...], left: str, right: str) -> str:
    return " AND ".join(f"{left}.{c} IS NOT DISTINCT FROM {right}.{c}" for c in cols)


def pair_sql(table: str, key: tuple[str, ...], reference: str) -> str:
    """SQL joining every method of ``table`` except ``reference`` with ``reference`` on ``key``.

    Step 1: pool each side over shards (weighted mean of ``score`` by ``n_prompts`` per key).
    Step 2: join approximation and reference on model, task and the key, nulls equal to nulls.
    """
    ref = reference.replace("'", "''")
    cols = ", ".join((*PARTITIONS, "method", *key))
    pooled = (f"SELECT {cols}, sum(score * n_prompts) / sum(n_prompts) AS score, sum(n_prompts) AS n_prompts "
              f"FROM {table} GROUP BY {cols}")
    join_cols = (*PARTITIONS, *key)
    select = ", ".join(f"a.{c}" for c in (*PARTITIONS, "method", *key))
    return (f"WITH pooled AS ({pooled}) "
            f"SELECT {select}, a.score AS score, r.score AS exact, a.n_prompts AS n_prompts "
            f"FROM pooled a JOIN pooled r ON {_null_safe(join_cols, 'a', 'r')} "
            f"WHERE r.method = '{ref}' AND a.method <> '{ref}'")


FAITHFULNESS_CURVES_SQL = """
WITH pooled AS (
    SELECT model, task, method, direction, ranking, level, ablation, k_percent,
           sum(metric * n_prompts) / sum(n_prompts) AS metric,
           sum(metric_full * n_prompts) / sum(n_prompts) AS metric_full,
           sum(metric_empty * n_prompts) / sum(n_prompts) AS metric_empty,
           max(n_kept) AS n_kept, max(n_total) AS n_total, sum(n_prompts) AS n_prompts
    FROM faithfulness GROUP BY ALL
), curve AS (
    SELECT *, (metric - metric_empty) / (metric_full - metric_empty) AS faithfulness FROM pooled
), steps AS (
    SELECT *,
        (k_percent - lag(k_percent) OVER w) / 100 AS dx,
        faithfulness + lag(faithfulness) OVER w AS f_sum,
        abs(1 - faithfulness) + abs(1 - lag(faithfulness) OVER w) AS d_sum
    FROM curve
    WINDOW w AS (PARTITION BY model, task, method, direction, ranking, level, ablation ORDER BY k_percent)
)
SELECT * EXCLUDE (dx, f_sum, d_sum),
    sum(dx * f_sum / 2) OVER c AS cpr, sum(dx * d_sum / 2) OVER c AS cmd
FROM steps
WINDOW c AS (PARTITION BY model, task, method, direction, ranking, level, ablation)
"""


def _manifest_sizes(root: Path) -> dict[str, float]:
    """Model sizes named anywhere in manifest.json as {"name": M, "n_params_m": x} or {M: {"n_params_m": x}}."""
    path = root / "manifest.json"
    if not path.exists():
        return {}
    found: dict[str, float] = {}

    def walk(x) -> None:
        if isinstance(x, dict):
            if "n_params_m" in x and isinstance(x.get("name"), str):
                found[x["name"]] = float(x["n_params_m"])
            for k, v in x.items():
                if isinstance(v, dict) and "n_params_m" in v and "name" not in v:
                    found[k] = float(v["n_params_m"])
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(json.loads(path.read_text()))
    return found


def _manifest_paths(root: Path) -> dict[str, str]:
    """{model name: checkpoint directory} from the manifest's ``models`` map (local checkpoints)."""
    path = root / "manifest.json"
    models = json.loads(path.read_text()).get("models") if path.exists() else None
    return {k: v for k, v in models.items() if isinstance(v, str)} if isinstance(models, dict) else {}


def model_sizes(root: str | Path, models: list[str]) -> dict[str, float]:
    """Millions of parameters per model: ``attrpatch.models.REGISTRY`` first, then sizes named in the
    manifest, then the estimate of a local checkpoint the manifest points to, else NaN."""
    from attrpatch.models import REGISTRY, ModelLoadError, resolve_spec

    root = Path(root)
    sizes, paths = _manifest_sizes(root), _manifest_paths(root)
    out = {}
    for m in models:
        if m in REGISTRY:
            out[m] = REGISTRY[m].n_params_m
        elif m in sizes:
            out[m] = sizes[m]
        else:
            try:
                out[m] = resolve_spec(paths[m]).n_params_m if m in paths else math.nan
            except ModelLoadError:  # the checkpoint moved since the sweep: size unknown
                out[m] = math.nan
    return out


def open_results(root: str | Path, con: duckdb.DuckDBPyConnection | None = None,
                 node_reference: str = NODE_REFERENCE, edge_reference: str = EDGE_REFERENCE) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with one view per table of the results root (see the module docstring);
    ``node_pairs`` / ``edge_pairs`` compare every method with ``node_reference`` / ``edge_reference``."""
    root = Path(root)
    if not root.is_dir():
        raise ResultsError(f"results root {str(root)!r} is not a directory: pass the ROOT a sweep wrote "
                           "(it holds manifest.json, nodes/, edges/, prompts/)")
    tables = table_dirs(root)
    if not tables:
        raise ResultsError(f"no Parquet files under {str(root)!r}: run a sweep into it first, or pass the right "
                           "ROOT (tables live in ROOT/nodes/model=M/task=T/method=X/part-*.parquet)")
    con = con or duckdb.connect()
    for t in tables:
        path = _glob(root, t).replace("'", "''")
        con.execute(f"CREATE OR REPLACE VIEW {t} AS SELECT * FROM read_parquet('{path}', "
                    "hive_partitioning = true, hive_types_autocast = false, union_by_name = true)")
    for table, key, ref, view in (("nodes", NODE_KEY, node_reference, "node_pairs"),
                                  ("edges", EDGE_KEY, edge_reference, "edge_pairs")):
        if table in tables:
            con.execute(f"CREATE OR REPLACE VIEW {view} AS {pair_sql(table, key, ref)}")
    models = sorted({d.name.split("=", 1)[1] for t in tables for d in (root / t).glob("model=*") if d.is_dir()})
    sizes = model_sizes(root, models)
    frame = pd.DataFrame({"model": pd.Series(models, dtype=object),
                          "n_params_m": pd.Series([sizes[m] for m in models], dtype=float)})
    con.register("_models_frame", frame)
    con.execute("CREATE OR REPLACE TEMP TABLE models AS SELECT * FROM _models_frame")
    con.unregister("_models_frame")
    if "faithfulness" in tables:
        con.execute(f"CREATE OR REPLACE VIEW faithfulness_curves AS {FAITHFULNESS_CURVES_SQL}")
    return con
