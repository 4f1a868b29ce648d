"""Open a results root as DuckDB views, so a user's script is a few lines of SQL or a DataFrame.

    python -c "from analysis.query import open_results; print(open_results('results/default').sql('select * from nodes limit 5'))"

Any root a sweep can write opens: a local directory, or a ``pyarrow.fs`` URI (``s3://bucket/prefix``, with
``?endpoint_override=HOST:PORT&scheme=http`` for an S3-compatible server). Views (each exists only when its
directory holds Parquet parts; the Hive partitions ``model``, ``task``, ``method`` are strings):

* ``nodes``, ``edges``, ``prompts`` — the tables of the results contract (``attrpatch.results``);
* one view per extra table directory (e.g. ``faithfulness``), read the same way;
* ``node_pairs`` / ``edge_pairs`` — every approximation beside every exact method of its table (``score``,
  ``exact``, ``reference``, ``granularity``), see ``pair_parts``;
* ``faithfulness_curves`` — faithfulness pooled over prompt shards, with CPR and CMD per curve;
* ``models`` — ``model``, ``n_params_m``, ``d_model`` per model (the sweep manifest first, then the registry,
  then a local checkpoint the manifest names; NULL when unknown).

Pairing (``pair_parts``), per (model, task, approximation, exact method, direction, component kind):

1. Pool each method over shards: rows sharing every key column get the ``n_prompts``-weighted mean of
   ``score`` (per-prompt rows are unchanged; shard means of several shards become one mean).
2. Find each side's granularities (``prompt`` null or not, ``pos`` null or not, ``src_pos`` null or not).
   For every granularity of the exact side, take the approximation's granularity closest to it and bring
   both to the coarser of the two on each axis: positions are summed away (the position-summed attribution
   estimates the all-positions patch), prompts averaged. So any two methods pair, whatever each was
   configured with; the ``granularity`` column names the level the pair was compared at.
3. Join on the remaining key columns, nulls equal to nulls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pandas as pd

from attrpatch.errors import ResultsError
from attrpatch.results import EDGE_KEY, NODE_KEY, ResultsRoot

__all__ = ["ResultsError", "open_results", "pair_parts", "model_sizes", "Results"]

PARTITIONS = ("model", "task")
NODE_IDENTITY = ("component", "layer", "head")  # which component (besides direction and the axes)
EDGE_IDENTITY = ("src_component", "src_layer", "src_head", "dst_component", "dst_layer", "dst_head")
AXES = {"nodes": ("prompt", "pos", "src_pos"), "edges": ("prompt", "pos")}
IDENTITY = {"nodes": NODE_IDENTITY, "edges": EDGE_IDENTITY}
KIND = {"nodes": "component", "edges": "src_component || '->' || dst_component"}


@dataclass
class Results:
    """An opened root: the connection and what it holds."""

    con: duckdb.DuckDBPyConnection
    root: ResultsRoot
    tables: list[str]
    pairs: dict[str, list] = None  # table → its PairPart groups
    groups: object = None  # analysis.compare: the groups of the materialised pairs (gid → columns)

    def __post_init__(self) -> None:
        if self.pairs is None:
            self.pairs = {}


def _granularity(axes: tuple[str, ...], present: tuple[bool, ...]) -> str:
    kept = [a for a, p in zip(axes, present, strict=True) if p]
    return "×".join(kept) if kept else "mean"


def _side_sql(table: str, where: str, have: tuple[bool, ...], target: tuple[bool, ...]) -> str:
    """Step 2 for one side: its pooled rows of one granularity (``where`` picks method, direction, kind, model,
    task), aggregated to ``target`` (present axes); rows already at the target pass through unaggregated (the
    common case, and the large one)."""
    axes, ident = AXES[table], IDENTITY[table]
    sig = " AND ".join(f"{a} IS {'NOT ' if h else ''}NULL" for a, h in zip(axes, have, strict=True))
    if have == target:
        return f"SELECT {', '.join((*ident, *axes))}, score, n_prompts FROM _pooled_{table} WHERE {where} AND {sig}"
    keep_pos = [a for a, t in zip(axes, target, strict=True) if t and a != "prompt"]
    inner_cols = ", ".join((*ident, *keep_pos, "prompt"))
    outer_cols = ", ".join((*ident, *keep_pos, *(["prompt"] if target[0] else [])))
    nulls = ", ".join(f"NULL::{'INTEGER' if a == 'prompt' else 'SMALLINT'} AS {a}"
                      for a, t in zip(axes, target, strict=True) if not t)
    return (f"SELECT {outer_cols}{', ' + nulls if nulls else ''}, sum(s * n) / sum(n) AS score, sum(n) AS n_prompts "
            f"FROM (SELECT {inner_cols}, sum(score) AS s, any_value(n_prompts) AS n FROM _pooled_{table} "
            f"WHERE {where} AND {sig} GROUP BY {inner_cols}) GROUP BY {outer_cols}")


@dataclass(frozen=True)
class PairPart:
    """One comparison group: an approximation beside an exact method for one model, task, direction, kind and
    granularity. ``sql`` selects the identity and axis columns, ``score``, ``exact`` and ``n_prompts``."""

    level: str
    model: str
    task: str
    kind: str
    direction: str
    method: str
    reference: str
    granularity: str
    sql: str

    @property
    def group(self) -> dict:
        return {k: getattr(self, k) for k in ("level", "model", "task", "kind", "direction", "method", "reference",
                                              "granularity")}


def _q(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def pair_parts(con: duckdb.DuckDBPyConnection, table: str, exact: set[str]) -> list[PairPart]:
    """Every (approximation, exact) group of ``table`` (steps 2–3 of the module docstring). Expects the view
    ``_pooled_<table>`` (step 1)."""
    axes, ident = AXES[table], IDENTITY[table]
    kind = KIND[table]
    flags = ", ".join(f"{a} IS NOT NULL" for a in axes)
    sigs = con.execute(f"SELECT DISTINCT model, task, method, direction, {kind} AS kind, {flags} "
                       f"FROM _pooled_{table}").fetchall()
    by: dict[tuple, set[tuple]] = {}
    for model, task, method, direction, k, *present in sigs:
        by.setdefault((model, task, direction, k, method), set()).add(tuple(present))
    parts = []
    for (model, task, direction, k, ref), ref_sigs in sorted(by.items()):
        if ref not in exact:
            continue
        for (m2, t2, d2, k2, method), approx_sigs in sorted(by.items()):
            if method in exact or (m2, t2, d2, k2) != (model, task, direction, k):
                continue
            for ge in sorted(ref_sigs):
                # the approximation's granularity sharing most axes with the exact one (finer wins ties)
                ga = max(sorted(approx_sigs), key=lambda g, ge=ge: (sum(a == b for a, b in zip(g, ge, strict=True)),
                                                                    sum(g)))
                target = tuple(a and b for a, b in zip(ga, ge, strict=True))
                base = f"model = {_q(model)} AND task = {_q(task)} AND direction = {_q(direction)} AND {kind} = {_q(k)}"
                a_sql = _side_sql(table, f"{base} AND method = {_q(method)}", ga, target)
                e_sql = _side_sql(table, f"{base} AND method = {_q(ref)}", ge, target)
                keys = (*ident, *(a for a, t in zip(axes, target, strict=True) if t))
                on = " AND ".join(f"a.{c} IS NOT DISTINCT FROM e.{c}" for c in keys)
                cols = ", ".join(f"a.{c}" for c in (*ident, *axes))
                parts.append(PairPart(table, model, task, k, direction, method, ref, _granularity(axes, target),
                                      f"SELECT {cols}, a.score AS score, e.score AS exact, a.n_prompts AS n_prompts "
                                      f"FROM ({a_sql}) a JOIN ({e_sql}) e ON {on}"))
    return parts


def pairs_view_sql(parts: list[PairPart]) -> str:
    """The user-facing view: every part with its group's columns (model, task, direction, method, reference,
    granularity) before the identity and axis columns, ``score``, ``exact`` and ``n_prompts``."""
    return " UNION ALL ".join(
        f"SELECT {_q(p.model)} AS model, {_q(p.task)} AS task, {_q(p.direction)} AS direction, "
        f"{_q(p.method)} AS method, {_q(p.reference)} AS reference, {_q(p.granularity)} AS granularity, * "
        f"FROM ({p.sql})" for p in parts)


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


def manifest(root: ResultsRoot) -> dict:
    try:
        return root.read_json("manifest.json") if root.exists("manifest.json") else {}
    except (OSError, ValueError):
        return {}


def model_sizes(root: ResultsRoot | str | Path, models: list[str]) -> dict[str, tuple[float, float]]:
    """(millions of parameters, d_model) per model: the sweep manifest first (it records both), then
    ``attrpatch.models`` (registry or a local checkpoint the manifest points to), else NaN."""
    from attrpatch.errors import ModelError
    from attrpatch.models import REGISTRY, model_shape, resolve_spec

    root = root if isinstance(root, ResultsRoot) else ResultsRoot(str(root))
    recorded = manifest(root).get("models")
    recorded = recorded if isinstance(recorded, dict) else {}
    out = {}
    for m in models:
        info = recorded.get(m)
        if isinstance(info, dict) and "n_params" in info:
            out[m] = (info["n_params"] / 1e6, float(info.get("d_model", math.nan)))
            continue
        source = info.get("source") if isinstance(info, dict) else info if isinstance(info, str) else None
        try:
            spec = REGISTRY[m] if m in REGISTRY else resolve_spec(source) if source else None
            shape = model_shape(spec) if spec is not None else None
        except (ModelError, OSError, ValueError):
            shape = None
        out[m] = (shape.n_params / 1e6, float(shape.d_model)) if shape is not None else (math.nan, math.nan)
    return out


def _exact_methods(methods: set[str]) -> set[str]:
    """The exact (ground-truth) methods among ``methods``, from the registry."""
    from attrpatch.methods import METHODS, load_builtin_methods

    load_builtin_methods()
    return {m for m in methods if m in METHODS and METHODS[m].exact}


def open_results(root: str | Path | ResultsRoot, con: duckdb.DuckDBPyConnection | None = None,
                 exact: set[str] | None = None, memory_limit: str | None = None,
                 temp_directory: str | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with one view per table of the results root (see the module docstring).
    ``exact`` names the reference methods (default: the registry's exact methods present); ``memory_limit``
    (e.g. ``"3GB"``) and ``temp_directory`` make DuckDB spill to disk instead of growing."""
    return open_root(root, con, exact, memory_limit, temp_directory).con


def open_root(root: str | Path | ResultsRoot, con: duckdb.DuckDBPyConnection | None = None,
              exact: set[str] | None = None, memory_limit: str | None = None,
              temp_directory: str | None = None) -> Results:
    """``open_results`` with what it found (the root and its tables)."""
    root = root if isinstance(root, ResultsRoot) else ResultsRoot(str(root))
    if not root.is_dir():
        raise ResultsError(f"results root {root.display()} is not a directory: pass the ROOT a sweep wrote "
                           "(it holds manifest.json, nodes/, edges/, prompts/)")
    tables = root.tables()
    if not tables:
        raise ResultsError(f"no Parquet files under {root.display()}: run a sweep into it first, or pass the right "
                           "ROOT (tables live in ROOT/nodes/model=M/task=T/method=X/part-*.parquet)")
    con = con or duckdb.connect()
    if memory_limit:
        con.execute(f"SET memory_limit = '{memory_limit}'")
        con.execute("SET preserve_insertion_order = false")
    if temp_directory:
        con.execute(f"SET temp_directory = '{temp_directory}'")
    for t in tables:
        _register(con, root, t)
    results = Results(con, root, tables)
    methods: set[str] = set()
    for table in ("nodes", "edges"):
        if table in tables:
            methods |= {r[0] for r in con.execute(f"SELECT DISTINCT method FROM {table}").fetchall()}
    refs = exact if exact is not None else _exact_methods(methods)
    for table, key, view in (("nodes", NODE_KEY, "node_pairs"), ("edges", EDGE_KEY, "edge_pairs")):
        if table not in tables:
            continue
        cols = ", ".join((*PARTITIONS, "method", *key))
        # per-prompt rows are unique per key already; only shard means (prompt null) pool across shards
        con.execute(f"CREATE OR REPLACE VIEW _pooled_{table} AS "
                    f"SELECT {cols}, score, n_prompts FROM {table} WHERE prompt IS NOT NULL UNION ALL "
                    f"SELECT {cols}, sum(score * n_prompts) / sum(n_prompts) AS score, sum(n_prompts) AS n_prompts "
                    f"FROM {table} WHERE prompt IS NULL GROUP BY {cols}")
        parts = pair_parts(con, table, refs)
        results.pairs[table] = parts
        if parts:
            con.execute(f"CREATE OR REPLACE VIEW {view} AS {pairs_view_sql(parts)}")
    models = sorted({r[0] for t in tables for r in con.execute(f"SELECT DISTINCT model FROM {t}").fetchall()})
    sizes = model_sizes(root, models)
    frame = pd.DataFrame({"model": pd.Series(models, dtype=object),
                          "n_params_m": pd.Series([sizes[m][0] for m in models], dtype=float),
                          "d_model": pd.Series([sizes[m][1] for m in models], dtype=float)})
    con.register("_models_frame", frame)
    con.execute("CREATE OR REPLACE TEMP TABLE models AS SELECT * FROM _models_frame")
    con.unregister("_models_frame")
    if "faithfulness" in tables:
        con.execute(f"CREATE OR REPLACE VIEW faithfulness_curves AS {FAITHFULNESS_CURVES_SQL}")
    return results


def _register(con: duckdb.DuckDBPyConnection, root: ResultsRoot, table: str) -> None:
    """A view over one table's parts: DuckDB reads a local root directly; any other file system through a
    pyarrow dataset (streamed: nothing is loaded up front)."""
    if root.local:
        path = f"{root.path(table)}/**/*.parquet".replace("'", "''")
        con.execute(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM read_parquet('{path}', "
                    "hive_partitioning = true, hive_types_autocast = false, union_by_name = true)")
        return
    import pyarrow as pa
    import pyarrow.dataset as ds

    files = [root.path(p) for p in root.list_files(table) if p.endswith(".parquet")
             and not p.rsplit("/", 1)[-1].startswith(".")]
    depth = max(p.count("=") for p in files)  # prompts: model, task; score tables: model, task, method
    keys = pa.schema([(k, pa.string()) for k in ("model", "task", "method")[:depth]])
    dataset = ds.dataset(files, filesystem=root.fs, format="parquet",
                         partitioning=ds.partitioning(keys, flavor="hive"), partition_base_dir=root.path(table))
    con.register(f"_arrow_{table}", dataset)
    con.execute(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM _arrow_{table}")


def table_dirs(root: str | Path | ResultsRoot) -> list[str]:
    """Names of the directories under ``root`` that hold Parquet part files (contract tables first)."""
    root = root if isinstance(root, ResultsRoot) else ResultsRoot(str(root))
    return root.tables() if root.is_dir() else []

