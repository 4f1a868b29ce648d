"""W&B logging of a comparison: the figures, the statistics, and the sampled points you can explore.

    wandb sync results/default/wandb/offline-run-*     # upload offline runs later, with a key

``log_comparison`` makes one run (offline by default: no account, no network) holding:

* ``scatter/<figure>``: every PNG of the comparison (the same files as under ROOT/plots);
* ``correlations``: a table of the statistics (one row per comparison × kind);
* ``points``: a table of the sampled pairs (comparison, kind, layer, approximation, exact) — filter it by
  kind or layer in the W&B UI — and ``points/<comparison>/<kind>``, a native W&B scatter per kind;
* summary metrics ``<method>_vs_<reference>/<kind>/pearson``, ``…/spearman``, ``…/n`` (for the default
  granularity of each pair).

The sweep logs one run per (model, task) into ``ROOT/wandb`` (a local root) or ``./wandb-runs/<sweep>``;
``python -m analysis.compare --wandb`` one run for the whole root. ``read_offline_run`` reads a run's records
back without W&B's servers (the tests check what was logged that way).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

STAT_COLUMNS = ["level", "model", "task", "kind", "direction", "method", "reference", "granularity", "n_scores",
                "pearson", "spearman", "recall_top10", "recall_top5pct", "sign_agreement"]
POINT_COLUMNS = ["comparison", "kind", "layer", "approximation", "exact"]
CHART_POINTS = 500  # points per native scatter (the ``points`` table keeps every sampled pair)


def _clean(v):
    """NaN is not valid JSON for W&B summaries: store None."""
    if isinstance(v, float) and math.isnan(v):
        return None
    return v.item() if hasattr(v, "item") else v


def comparison_name(row) -> str:
    return f"{row['method']}_vs_{row['reference']}"


def log_comparison(df: pd.DataFrame, points: pd.DataFrame, figures: list[Path], directory: str | Path,
                   project: str = "attrpatch", mode: str = "offline", name: str | None = None,
                   group: str | None = None, entity: str | None = None, tags: list[str] | None = None,
                   config: dict | None = None, job_type: str = "sweep") -> str:
    """Log one run (see the module docstring); returns its run directory."""
    os.environ.setdefault("WANDB_SILENT", "true")  # no banner lines between the progress bar and the table
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    import wandb

    run = wandb.init(project=project, entity=entity, group=group, name=name, job_type=job_type, tags=tags or [],
                     dir=directory, mode=mode, reinit="create_new", config=config or {},
                     settings=wandb.Settings(silent=True, x_disable_stats=True, console="off", disable_git=True))
    try:
        images = {f"scatter/{p.stem}": wandb.Image(str(p), caption=p.stem) for p in figures}
        stats = wandb.Table(columns=STAT_COLUMNS, data=[[_clean(r[c]) for c in STAT_COLUMNS] for _, r in df.iterrows()])
        frame = pd.DataFrame({"comparison": points["method"] + "_vs_" + points["reference"], "kind": points["kind"],
                              "layer": points["layer"].astype(int), "approximation": points["score"].astype(float),
                              "exact": points["exact"].astype(float)})[POINT_COLUMNS]
        # lists, not wandb.Table(dataframe=…): W&B reads a DataFrame row by row (~5x slower)
        table = wandb.Table(columns=POINT_COLUMNS, data=frame.values.tolist(), allow_mixed_types=True)
        charts = {}
        for (comp, kind), sub in frame.groupby(["comparison", "kind"]):
            sub = sub.iloc[:CHART_POINTS]  # the sample is in hash order already: any prefix is a sample too
            chart = wandb.Table(columns=POINT_COLUMNS, data=sub.values.tolist(), allow_mixed_types=True)
            charts[f"points/{comp}/{kind}"] = wandb.plot.scatter(chart, "approximation", "exact",
                                                                 title=f"{comp} · {kind}")
        run.log({**images, "correlations": stats, "points": table, **charts})
        first = df.drop_duplicates(["method", "reference", "kind", "level"])
        for _, r in first.iterrows():
            key = f"{comparison_name(r)}/{r['kind']}"
            run.summary[f"{key}/pearson"] = _clean(r["pearson"])
            run.summary[f"{key}/spearman"] = _clean(r["spearman"])
            run.summary[f"{key}/n"] = int(r["n_scores"])
        run_dir = os.path.dirname(run.dir)  # run.dir is <run dir>/files
    finally:
        run.finish()
    return run_dir


def _log_records(path: str):
    """The records of a W&B transaction log (``run-*.wandb``): a LevelDB-style log of 32 KiB blocks, each
    record ``crc32 (4) | length (2, LE) | type (1: full, 2: first, 3: middle, 4: last) | data``."""
    import struct

    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run log")
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind == 0:
            break
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk


def read_offline_run(run_dir: str) -> dict:
    """What an offline run recorded, read back from its directory without W&B's servers: the run's
    identity (name, group, job type, tags), its summary and its logged keys (``wandb sync`` uploads
    exactly these records)."""
    import glob
    import json

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    out = {"summary": {}, "history_keys": set(), "name": None, "group": None, "job_type": None, "tags": [],
           "files": sorted(str(p.relative_to(run_dir)) for p in Path(run_dir, "files").rglob("*") if p.is_file())}

    def put(target: dict, key: str, nested, value_json: str) -> None:
        keys = list(nested) or [key]
        for k in keys[:-1]:
            target = target.setdefault(k, {})
        target[keys[-1]] = json.loads(value_json)

    for data in _log_records(path):
        rec = pb.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(name=rec.run.display_name, group=rec.run.run_group, job_type=rec.run.job_type,
                       tags=list(rec.run.tags))
        elif kind == "summary":
            for u in rec.summary.update:
                put(out["summary"], u.key, u.nested_key, u.value_json)
        elif kind == "history":
            out["history_keys"] |= {(list(i.nested_key) or [i.key])[0] for i in rec.history.item}
    return out
