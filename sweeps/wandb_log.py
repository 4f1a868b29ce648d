"""W&B logging: one run per (model, task), grouped by sweep; offline by default (no account, no network).

    wandb sync results/default/wandb/offline-run-*     # upload offline runs later, with a key

Each run gets: the resolved sweep config plus its model and task; one image per comparison (the same PNG
as under ROOT/plots); a ``correlations`` table (comparison × kind: n, Pearson, Spearman, times); and
summary metrics ``<approx>_vs_<exact>/<kind>/pearson`` and ``…/spearman``. The run directory lives under
the results root (``ROOT/wandb/``) when the root is local, else under ``./wandb-runs/<sweep>``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile

COLUMNS = ["approx", "exact", "table", "kind", "n", "pearson", "spearman", "approx_s", "exact_s"]


def wandb_dir(report) -> str:
    root = report.root
    path = root.local_path() if root.local else os.path.abspath(os.path.join("wandb-runs", report.cfg.name))
    os.makedirs(path, exist_ok=True)
    return path


def log_run(report, model: str, task: str, rows: list[dict], figures: dict[str, str]) -> str:
    """Log one (model, task) run; returns its run directory."""
    os.environ.setdefault("WANDB_SILENT", "true")  # no banner lines between the progress bar and the table
    directory = wandb_dir(report)
    os.environ["WANDB_DIR"] = directory
    import wandb

    cfg = report.cfg
    run = wandb.init(
        project=cfg.wandb.project, entity=cfg.wandb.entity, group=cfg.wandb.group or cfg.name,
        name=f"{model}/{task}", job_type="sweep", tags=[cfg.name, model, task, *cfg.wandb.tags],
        dir=directory, mode=cfg.wandb.mode, reinit="create_new",
        config={**dataclasses.asdict(cfg), "run_model": model, "run_task": task, "results_root": report.root.uri},
        settings=wandb.Settings(silent=True, x_disable_stats=True, console="off", disable_git=True),
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            images = {}
            for name, rel in figures.items():
                if report.root.local:
                    path = report.root.local_path(rel)
                else:
                    path = os.path.join(tmp, f"{name}.png")
                    with open(path, "wb") as f, report.root.fs.open_input_stream(report.root.path(rel)) as src:
                        f.write(src.read())
                images[f"scatter/{name}"] = wandb.Image(path, caption=name)
            table = wandb.Table(columns=COLUMNS, data=[[_clean(r[c]) for c in COLUMNS] for r in rows])
            run.log({**images, "correlations": table})
        for r in rows:
            key = f"{r['approx']}_vs_{r['exact']}/{r['kind']}"
            run.summary[f"{key}/pearson"] = _clean(r["pearson"])
            run.summary[f"{key}/spearman"] = _clean(r["spearman"])
            run.summary[f"{key}/n"] = r["n"]
        run_dir = os.path.dirname(run.dir)  # run.dir is <run dir>/files
    finally:
        run.finish()
    return run_dir


def _clean(v):
    """NaN is not valid JSON for W&B summaries: store None."""
    return None if isinstance(v, float) and math.isnan(v) else v


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
    out = {"summary": {}, "history_keys": set(), "name": None, "group": None, "job_type": None, "tags": []}

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
