"""The sweep driver: Ray workers per model, a work queue of cells, resume, faults, then the summary.

    python -c "from sweeps.config import SweepConfig; from sweeps.driver import run_sweep; run_sweep(SweepConfig(name='demo'))"

1. Validate the config against the registries (no Ray yet), expand the grid, skip the cells whose
   completion record exists (resume), and delete temporary files a killed writer left behind.
2. Start or join Ray. For each model, start ``ShardWorker`` actors sized by its spec (``num_gpus`` —
   fractional for small models — only when the cluster has GPUs; ``num_cpus``; ``memory``), as many as
   fit. A worker gets cells only once it has loaded its model; ``cluster.in_flight`` cells are queued
   per worker so the next one starts without a driver round trip.
3. A worker killed mid-sweep is restarted by Ray (``max_restarts``) and its queued cells re-run
   (``max_task_retries``); beyond that the driver re-queues them on a fresh worker. Part names are
   deterministic and a finished cell is never recomputed, so retries cannot duplicate rows.
4. Ctrl-C: kill the workers, wait for them to exit, delete temporary files (finished parts stay), record
   the interruption in the manifest. Re-launching the same command resumes.
5. Summary: correlations, plots, W&B runs (``sweeps.summary``), manifest end time.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import importlib.metadata
import logging
import math
import os
import platform
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field

from attrpatch.errors import AttrpatchError
from sweeps.config import SweepConfig, validate
from sweeps.grid import Cell, ModelEntry, expand, model_entries
from sweeps.worker import ShardWorker
from sweeps.writer import ResultsRoot

log = logging.getLogger(__name__)

PACKAGES = ("attrpatch", "torch", "transformers", "transformer-lens", "ray", "hydra-core", "omegaconf",
            "wandb", "pyarrow", "duckdb", "numpy", "scipy", "matplotlib")
GiB = 2**30


class SweepError(AttrpatchError):
    """A sweep that cannot run or a cell that failed; the message names the cell or resource."""


@dataclass
class SweepReport:
    """What a launch did: every cell's completion record (this launch's and earlier ones) and the outputs."""

    cfg: SweepConfig
    root: ResultsRoot
    records: list[dict]
    ran: int
    skipped: int
    wall_s: float  # the whole launch, Ray start and model loads included
    dispatch_s: float  # from the first cell handed out to the last one finished
    workers: list[dict] = field(default_factory=list)  # info() of every worker started
    correlations: list[dict] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    wandb_dirs: list[str] = field(default_factory=list)

    @property
    def compute_s(self) -> float:
        """Σ worker compute time of the cells run in this launch."""
        return sum(r["compute_s"] for r in self.records if not r.get("resumed"))


# ---------------------------------------------------------------- step 2: sizing workers

def worker_plan(entry: ModelEntry, cfg: SweepConfig, resources: dict, n_cells: int) -> tuple[dict, int]:
    """Ray actor options for one model's workers and how many to start (pure: tested without Ray).

    GPUs are requested only when the cluster has some; a request larger than the whole cluster would wait
    forever, so it is an error before any work starts."""
    spec, opts = entry.spec, cfg.model
    cpus = opts.num_cpus if opts.num_cpus is not None else spec.num_cpus
    gpus = (opts.num_gpus if opts.num_gpus is not None else spec.num_gpus) if resources.get("GPU", 0) > 0 else 0
    memory_gb = opts.memory_gb if opts.memory_gb is not None else spec.memory_gb
    have = {"CPU": resources.get("CPU", 0), "GPU": resources.get("GPU", 0), "memory": resources.get("memory", 0)}
    need = {"CPU": cpus, "GPU": gpus, "memory": memory_gb * GiB}
    for key, option in (("CPU", "num_cpus"), ("GPU", "num_gpus"), ("memory", "memory_gb")):
        if need[key] > have[key] + 1e-9:
            shown = (f"{need[key] / GiB:.1f} GB", f"{have[key] / GiB:.1f} GB") if key == "memory" else (need[key], have[key])
            raise SweepError(
                f"model {entry.name!r} needs {shown[0]} {key} per worker but the cluster has {shown[1]}: "
                f"lower model.{option} or add resources to the cluster"
            )
    fits = [math.floor(have[k] / need[k] + 1e-9) for k in need if need[k] > 0]
    n = cfg.model.workers or max(1, min(fits) if fits else 1)
    options = {"num_cpus": cpus, "num_gpus": gpus, "memory": int(memory_gb * GiB),
               "max_restarts": cfg.cluster.max_restarts, "max_task_retries": cfg.cluster.max_task_retries}
    return options, max(1, min(n, n_cells))


# ---------------------------------------------------------------- the manifest

def _versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _git() -> dict:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return {"git_sha": sha, "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None}


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class Manifest:
    """ROOT/manifest.json: this launch's resolved config, versions, git sha and times; earlier launches
    of the same root are kept under ``launches``."""

    def __init__(self, root: ResultsRoot, cfg: SweepConfig, models: list[ModelEntry], n_cells: int):
        previous = root.read_json("manifest.json") if root.exists("manifest.json") else {}
        launches = previous.pop("launches", [])
        if previous:
            launches.append({k: previous[k] for k in ("start", "end", "status", "git_sha", "cells_run")
                             if k in previous})
        self.root = root
        self.data = {
            "sweep": cfg.name, "root": root.uri, "config": dataclasses.asdict(cfg),
            "models": {m.name: m.source for m in models}, "cells": n_cells, "versions": _versions(),
            **_git(), "start": _now(), "end": None, "status": "running", "cells_run": 0, "launches": launches,
        }
        self.save()

    def save(self) -> None:
        self.root.write_json("manifest.json", self.data)

    def finish(self, status: str, **extra) -> None:
        self.data.update(end=_now(), status=status, **extra)
        self.save()


# ---------------------------------------------------------------- step 2-4: dispatch

class _Pool:
    """One model's workers, its queue of cells, and what each worker has in flight."""

    def __init__(self, entry: ModelEntry, cells: list[Cell]):
        self.entry = entry
        self.queue = collections.deque(cells)
        self.total = len(cells)
        self.finished = 0
        self.actors: list = []
        self.live: set[int] = set()
        self.busy: collections.Counter = collections.Counter()


def _start_ray(cfg: SweepConfig) -> bool:
    """Start a local Ray or join a cluster; True when this call started it (and must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    c = cfg.cluster
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    if c.address is None:
        ray.init(num_cpus=c.num_cpus or os.cpu_count(), num_gpus=c.num_gpus, **kwargs)
    else:
        ray.init(address=c.address, **kwargs)
    return True


def _dispatch(cfg: SweepConfig, root: ResultsRoot, models: list[ModelEntry], todo: list[Cell],
              workers: list[dict], bar) -> tuple[list[dict], float]:
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    launch = uuid.uuid4().hex[:6]
    Remote = ray.remote(ShardWorker)
    resources = ray.cluster_resources()
    pools: dict[str, _Pool] = {}
    plans = {}
    for entry in models:
        cells = [c for c in todo if c.model == entry.name]
        if cells:
            pools[entry.name] = _Pool(entry, cells)
            plans[entry.name] = worker_plan(entry, cfg, resources, len(cells))
    pending: dict = {}  # ObjectRef → ("ready", model, i) or ("cell", model, i, cell)
    attempts: collections.Counter = collections.Counter()
    records: list[dict] = []
    pids: dict[tuple[str, int], tuple[str, int]] = {}  # (model, worker) → (host, pid)
    generation: collections.Counter = collections.Counter()  # a replaced worker gets a fresh actor name
    t_first = None

    def start_actor(model: str, i: int):
        options, _ = plans[model]
        pool = pools[model]
        threads = max(1, int(options["num_cpus"]))
        generation[(model, i)] += 1
        name = f"attrpatch/{cfg.name}/{launch}/{model}/{i}.{generation[(model, i)]}"
        actor = Remote.options(name=name, **options).remote(
            pool.entry, cfg, root, threads)
        if i < len(pool.actors):
            pool.actors[i] = actor
        else:
            pool.actors.append(actor)
        pending[actor.info.remote()] = ("ready", model, i)

    def feed(model: str, i: int) -> None:
        nonlocal t_first
        pool = pools[model]
        while pool.queue and pool.busy[i] < cfg.cluster.in_flight:
            cell = pool.queue.popleft()
            pending[pool.actors[i].run.remote(cell)] = ("cell", model, i, cell)
            pool.busy[i] += 1
            t_first = t_first or time.perf_counter()

    def release(model: str) -> None:
        """The model's cells are all done: free its workers (and forget those still starting)."""
        pool = pools[model]
        for ref in [r for r, what in pending.items() if what[1] == model]:
            del pending[ref]
        for actor in pool.actors:
            ray.kill(actor, no_restart=True)
        pool.actors, pool.live = [], set()

    for model, (_, n) in plans.items():
        for i in range(n):
            start_actor(model, i)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in done:
                what = pending.pop(ref)
                model, i = what[1], what[2]
                pool = pools[model]
                if what[0] == "ready":
                    try:
                        info = ray.get(ref)
                    except RayActorError as e:
                        raise SweepError(f"worker {i} of model {model!r} could not start: {_cause(e)}") from None
                    except RayTaskError as e:
                        raise SweepError(f"worker {i} of model {model!r} failed to load it: {_cause(e)}") from None
                    workers.append({"model": model, "worker": i, **info})
                    pids[(model, i)] = (info["host"], info["pid"])
                    pool.live.add(i)
                    feed(model, i)
                    continue
                cell = what[3]
                pool.busy[i] -= 1
                try:
                    record = ray.get(ref)
                except RayActorError as e:  # Ray's own restarts and retries are used up
                    attempts[cell] += 1
                    if attempts[cell] > cfg.cluster.max_task_retries + 1:
                        raise SweepError(f"cell {cell.label} lost its worker {attempts[cell]} times: {_cause(e)}") from None
                    log.warning("worker %d of %s died (%s); re-queueing %s", i, model, _cause(e), cell.label)
                    pool.queue.appendleft(cell)
                    if i in pool.live:
                        pool.live.discard(i)
                        start_actor(model, i)
                    continue
                except RayTaskError as e:
                    raise SweepError(f"cell {cell.label} failed: {_cause(e)}") from None
                records.append(record)
                pool.finished += 1
                bar.update(1)
                if pool.finished == pool.total:
                    release(model)
                    _log_model_done(model, [r for r in records if r["model"] == model])
                elif i in pool.live:
                    feed(model, i)
        return records, (time.perf_counter() - t_first) if t_first else 0.0
    except BaseException:
        _stop(pools, pids, ray)
        raise


def _stop(pools: dict, pids: dict, ray) -> None:
    """Kill every worker and wait (bounded) until the local ones have exited, so none is mid-write."""
    for pool in pools.values():
        for actor in pool.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already dead
                pass
    deadline = time.monotonic() + 15
    here = socket.gethostname()
    alive = {pid for host, pid in pids.values() if host == here}  # remote workers are ended by Ray itself
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if _pid_alive(p)}
        time.sleep(0.1)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cause(e: Exception) -> str:
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(cause).__name__


def _log_model_done(model: str, records: list[dict]) -> None:
    rows = collections.Counter()
    for r in records:
        rows.update(r["rows"])
    shown = ", ".join(f"{n:,} {t} rows" for t, n in sorted(rows.items()))
    log.info("model %s done: %d cells, %s, %.1f s worker compute", model, len(records), shown,
             sum(r["compute_s"] for r in records))


# ---------------------------------------------------------------- the launch

def run_sweep(cfg: SweepConfig) -> SweepReport:
    """Run (or resume) a sweep; returns its report. Steps 1-5 of the module docstring."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    t0 = time.perf_counter()
    validate(cfg)  # step 1: every name and option checked before Ray starts
    root = ResultsRoot(cfg.output.root)
    models = model_entries(cfg)
    cells = expand(cfg, models)
    stale = root.clean_temp()
    if stale:
        log.info("deleted %d temporary files left by an interrupted launch", stale)
    done = root.done()
    todo = [c for c in cells if c.marker not in done]
    manifest = Manifest(root, cfg, models, len(cells))
    log.info("sweep %s: %d cells (%d models × %d tasks × %d methods + prompts, by shard); %d done before, %d to run",
             cfg.name, len(cells), len(models), len(cfg.tasks), len(cfg.methods), len(cells) - len(todo), len(todo))
    workers: list[dict] = []
    records: list[dict] = []
    dispatch_s = 0.0
    if todo:
        import ray

        started = _start_ray(cfg)
        try:
            # log lines (a model done, a worker replaced) print above the bar instead of breaking it
            with logging_redirect_tqdm(), tqdm(total=len(todo), unit="cell", desc=f"sweep {cfg.name}",
                                               disable=not cfg.output.progress, dynamic_ncols=True) as bar:
                records, dispatch_s = _dispatch(cfg, root, models, todo, workers, bar)
        except BaseException as e:
            removed = root.clean_temp()
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            manifest.finish(status, cells_run=len(root.done() - done), temp_files_removed=removed,
                            error=None if status == "interrupted" else str(e))
            raise
        finally:
            if started:
                ray.shutdown()
    ran_now = {r["cell"] for r in records}
    all_records = [{**root.read_json(c.marker), "resumed": c.label not in ran_now} for c in cells]
    report = SweepReport(cfg, root, all_records, ran=len(records), skipped=len(cells) - len(todo),
                         wall_s=0.0, dispatch_s=dispatch_s, workers=workers)
    from sweeps.summary import summarise

    summarise(report)  # step 5
    report.wall_s = time.perf_counter() - t0
    manifest.finish("complete", cells_run=len(records), wall_s=report.wall_s,
                    correlations=len(report.correlations))
    return report

