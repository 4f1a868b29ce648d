"""The sweep driver: check everything, plan, lock the root, reconcile it, run the cells on Ray, summarise.

    python -c "from sweeps.config import SweepConfig; from sweeps.driver import run_sweep; run_sweep(SweepConfig(name='demo'))"

1. Preflight (``sweeps.preflight``): names, options, checkpoints, device, a writable root, W&B, prompt
   counts; the grid and every cell's fingerprint. Then the plan (``sweeps.plan``): rows, time and memory per
   cell, checked against the limits and the workers' memory. ``plan=true`` stops here. Nothing is written
   before this step passes.
2. Lock the root (``sweeps.lock``): one launch at a time; a stale lock is taken over.
3. Reconcile the root with the grid: a cell whose record has another fingerprint (the options changed)
   refuses the launch (``resume=auto``) or is discarded (``resume=overwrite``); a cell whose part files are
   missing, truncated or disagree with their record is recomputed (and the log says so); temporary files of
   a killed writer are deleted. The manifest says ``running`` with this driver's pid, host and heartbeat.
4. Start (or join) Ray — a local Ray listens on 127.0.0.1 only unless ``cluster.listen=node`` — and run the
   cells: ``ShardWorker`` actors per model, sized from the plan, the largest model's first; each loads its
   model once and serves cells from a queue (``cluster.in_flight`` queued per worker); a worker idle with
   its model's queue empty is released at once, so another model's pending workers take its place. Workers
   report progress inside a cell; a killed worker is restarted (``max_restarts``) and its cells re-run.
5. Summary (``sweeps.summary``: ``analysis.compare``'s join, statistics, figures and W&B), then the manifest
   records ``complete``. Every other exit records ``failed`` or ``interrupted`` (Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import logging
import math
import os
import platform
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field

from attrpatch.errors import ConfigError, ResultsError, RunError
from attrpatch.models import model_shape
from attrpatch.results import ResultsRoot, parse_record_path
from sweeps.config import SweepConfig
from sweeps.fingerprint import changed_keys, versions
from sweeps.grid import Cell, ModelEntry
from sweeps.lock import RootLock
from sweeps.plan import Plan, calibrate, check, make_plan, render, summary_line
from sweeps.preflight import Prepared, preflight
from sweeps.worker import Progress, ShardWorker

log = logging.getLogger(__name__)

PACKAGES = ("attrpatch", "torch", "transformers", "transformer-lens", "ray", "hydra-core", "omegaconf",
            "wandb", "pyarrow", "duckdb", "numpy", "scipy", "matplotlib")
GiB = 2**30
OBJECT_STORE_BYTES = 512 * 2**20  # cells return small records; scores travel by file, not through Ray


class SweepError(RunError):
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
    plan: Plan | None = None
    recomputed: list[str] = field(default_factory=list)  # cells whose parts failed verification
    summary_s: float = 0.0  # the end-of-sweep step: join, statistics, plots, W&B

    @property
    def compute_s(self) -> float:
        """Σ worker compute time of the cells run in this launch."""
        return sum(r["compute_s"] for r in self.records if not r.get("resumed"))


# ---------------------------------------------------------------- step 1: sizing workers

def worker_memory(entry: ModelEntry, cfg: SweepConfig, plan: Plan | None, capacity: float | None = None) -> float:
    """Bytes one worker of a model reserves: ``model.memory_gb``, else its plan's peak + 20 % (else the spec).
    The peak assumes the default chunk size; chunks shrink to the memory a worker is given at run time, so
    where the peak exceeds ``capacity`` (the cluster's memory) the worker reserves the capacity instead — the
    plan's guard rail has already checked that what no chunking can shrink (weights, caches, dense scores)
    fits in it."""
    if cfg.model.memory_gb is not None:
        return cfg.model.memory_gb * GiB
    peaks = [c.peak_bytes for c in plan.cells if c.model == entry.name] if plan is not None else []
    if peaks and max(peaks) > 0:
        want = max(peaks) * 1.2
        return min(want, capacity) if capacity else want
    return entry.spec.memory_gb * GiB


def worker_plan(entry: ModelEntry, cfg: SweepConfig, resources: dict, n_cells: int,
                memory_bytes: float | None = None) -> tuple[dict, int]:
    """Ray actor options for one model's workers and how many to start (pure: tested without Ray).

    GPUs are requested only when the cluster has some; a request larger than the whole cluster would wait
    forever, so it is an error before any work starts."""
    spec, opts = entry.spec, cfg.model
    cpus = opts.num_cpus if opts.num_cpus is not None else spec.num_cpus
    gpus = (opts.num_gpus if opts.num_gpus is not None else spec.num_gpus) if resources.get("GPU", 0) > 0 else 0
    memory = memory_bytes if memory_bytes is not None else (
        opts.memory_gb if opts.memory_gb is not None else spec.memory_gb) * GiB
    have = {"CPU": resources.get("CPU", 0), "GPU": resources.get("GPU", 0), "memory": resources.get("memory", 0)}
    need = {"CPU": cpus, "GPU": gpus, "memory": memory}
    for key, option in (("CPU", "num_cpus"), ("GPU", "num_gpus"), ("memory", "memory_gb")):
        if need[key] > have[key] + 1e-9:
            shown = (f"{need[key] / GiB:.1f} GiB", f"{have[key] / GiB:.1f} GiB") if key == "memory" else (need[key], have[key])
            raise SweepError(
                f"model {entry.name!r} needs {shown[0]} {key} per worker but the cluster has {shown[1]}: "
                f"lower model.{option} or add resources to the cluster"
            )
    fits = [math.floor(have[k] / need[k] + 1e-9) for k in need if need[k] > 0]
    n = cfg.model.workers or max(1, min(fits) if fits else 1)
    options = {"num_cpus": cpus, "num_gpus": gpus, "memory": int(memory),
               "max_restarts": cfg.cluster.max_restarts, "max_task_retries": cfg.cluster.max_task_retries}
    return options, max(1, min(n, n_cells))


def local_resources(cfg: SweepConfig) -> dict:
    """What a local Ray will offer (for the plan's guard rails before Ray starts)."""
    import psutil

    gpus = cfg.cluster.num_gpus
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    return {"CPU": cfg.cluster.num_cpus or os.cpu_count(), "GPU": gpus,
            "memory": psutil.virtual_memory().total - OBJECT_STORE_BYTES}


# ---------------------------------------------------------------- the manifest

def _versions() -> dict:
    return {"python": platform.python_version(), "platform": platform.platform(), **versions(PACKAGES)}


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
    """ROOT/manifest.json: this launch's resolved config, models, fingerprints, versions, git sha, times and
    status with the driver's pid, host and heartbeat; earlier launches are kept under ``launches``."""

    def __init__(self, prep: Prepared, lock: RootLock):
        root, cfg = prep.root, prep.cfg
        previous = root.read_json("manifest.json") if root.exists("manifest.json") else {}
        if previous.get("status") == "running":
            log.warning("the previous launch of %s (pid %s on %s) ended without finishing (its manifest said "
                        "running); continuing", cfg.name, previous.get("pid"), previous.get("host"))
            previous["status"] = "died"
        launches = previous.pop("launches", [])
        if previous:
            launches.append({k: previous[k] for k in ("start", "end", "status", "git_sha", "cells_run", "launch")
                             if k in previous})
        fps = prep.fingerprints
        models = {}
        for e in prep.entries:
            shape = model_shape(e.spec)
            models[e.name] = {"source": e.source, "n_params": shape.n_params, "n_params_m": round(shape.n_params / 1e6, 2),
                              "d_model": shape.d_model, "n_layers": shape.n_layers, "n_heads": shape.n_heads,
                              "weights_sha256": fps.models[e.name]["weights_sha256"], "dtype": cfg.model.dtype}
        keys = {(c.model, c.task, c.method) for c in prep.cells}
        self.root = root
        self.data = {
            "sweep": cfg.name, "root": root.uri, "config": dataclasses.asdict(cfg), "models": models,
            "cells": len(prep.cells), "versions": _versions(), **_git(),
            "fingerprints": {f"{m}/{t}/{x or 'prompts'}": fps.of(m, t, x) for m, t, x in sorted(keys, key=str)},
            "options": {"models": fps.models, "tasks": fps.tasks, "methods": fps.methods, "versions": fps.versions},
            "launch": lock.launch, "pid": os.getpid(), "host": socket.gethostname(), "heartbeat": time.time(),
            "start": _now(), "end": None, "status": "running", "cells_run": 0, "launches": launches,
        }
        self.save()

    def save(self) -> None:
        self.root.write_json("manifest.json", self.data)

    def beat(self) -> None:
        self.data["heartbeat"] = time.time()
        self.save()

    def finish(self, status: str, **extra) -> None:
        self.data.update(end=_now(), status=status, heartbeat=time.time(), **extra)
        self.save()


# ---------------------------------------------------------------- step 3: reconcile the root with the grid

def reconcile(prep: Prepared) -> tuple[list[Cell], list[str]]:
    """Step 3: the cells to run, and those among them recomputed because their parts failed verification."""
    import pyarrow.fs as pafs

    root, cfg, fps = prep.root, prep.cfg, prep.fingerprints
    grid = {(c.model, c.task, c.method, c.shard): c for c in prep.cells}
    keys = {k[:3] for k in grid}
    listing: dict[str, int] = {}  # ROOT-relative path → size, from one listing
    prefix = root.base.rstrip("/") + "/"
    for info in root.fs.get_file_info(pafs.FileSelector(root.path(), recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            listing[info.path[len(prefix):]] = info.size
    changed: dict[str, list[str]] = {}
    stale: list[tuple[str, dict]] = []
    valid: set[tuple] = set()
    recomputed: list[str] = []
    for rel in sorted(p for p in listing if p.startswith("_done/") and p.endswith(".json")):
        model, task, method, shard = parse_record_path(rel)
        if (model, task, method) not in keys:
            continue  # another launch's model, task or method: left as it is
        try:
            rec = root.read_json(rel)
        except (OSError, ValueError):
            rec = {}
        if rec.get("fingerprint") != fps.of(model, task, method) or (model, task, method, shard) not in grid:
            label = f"{model}/{task}/{method or 'prompts'}/{shard}"
            changed[label] = changed_keys(rec.get("options"), fps.options(model, task, method)) or [
                "the prompts (this shard is beyond the new task's prompts)"]
            stale.append((rel, rec))
            continue
        problem = _verify_parts(root, rec, listing)
        if problem:
            log.warning("recomputing cell %s: %s", rec.get("cell"), problem)
            root.delete(rel)
            recomputed.append(rec.get("cell"))
            continue
        valid.add((model, task, method, shard))
    if changed:
        seen = list(dict.fromkeys(k for ks in changed.values() for k in ks))
        shown = "; ".join(seen[:4]) + (f"; … ({len(seen) - 4} more)" if len(seen) > 4 else "")
        if cfg.resume != "overwrite":
            raise ConfigError(
                f"results root {root.display()} holds {len(changed)} cells of sweep {cfg.name!r} computed with other "
                f"options ({shown}): use a new name (name=…) to keep them, or resume=overwrite to discard them")
        for rel, rec in stale:
            for path in [p["path"] for p in (rec.get("parts") or {}).values()] + _tables_of(listing, *parse_record_path(rel)):
                root.delete(path)
            root.delete(rel)
        log.warning("resume=overwrite: discarded %d cells computed with other options (%s)", len(changed), shown)
    return [c for k, c in grid.items() if k not in valid], recomputed


def _tables_of(listing: dict, model: str, task: str, method: str | None, shard: int) -> list[str]:
    """Every part of a cell present in the listing (whatever its table)."""
    tail = f"/model={model}/task={task}" + ("" if method is None else f"/method={method}") + f"/part-{shard:05d}.parquet"
    return [p for p in listing if p.endswith(tail) and not p.startswith("_done/")]


def _verify_parts(root: ResultsRoot, rec: dict, sizes: dict) -> str | None:
    """Why a recorded cell's parts cannot be trusted (None when they can): missing, a size other than the
    record's, and on a local root a checksum or row count other than the record's (reading a local part is
    cheap; on an object store the listing's sizes are checked and ``sweeps.verify`` reads everything)."""
    parts = rec.get("parts")
    if not parts:
        return "its record carries no checksums (written by an older attrpatch)"
    for part in parts.values():
        size = sizes.get(part["path"])
        if size is None:
            return f"part {part['path']} is missing"
        if size != part["bytes"]:
            return f"part {part['path']} has {size:,} bytes, the record says {part['bytes']:,} (truncated or replaced)"
        if root.local:
            problem = root.verify_part(part["path"], part["rows"], part["sha256"])
            if problem:
                return f"part {part['path']}: {problem}"
    return None


# ---------------------------------------------------------------- step 4: Ray

class _Pool:
    """One model's workers, its queue of cells, and what each worker has in flight."""

    def __init__(self, entry: ModelEntry, cells: list[Cell]):
        self.entry = entry
        self.queue = collections.deque(cells)
        self.total = len(cells)
        self.finished = 0
        self.actors: dict[int, object] = {}
        self.live: set[int] = set()
        self.busy: collections.Counter = collections.Counter()


@contextlib.contextmanager
def _listen(loopback: bool):
    """A local Ray binds every server to its node address; on loopback that is 127.0.0.1 only. Ray derives the
    address from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` (off: the loopback address), read by its processes and,
    in this process, through ``ray_constants`` (patched for the duration of ``ray.init``)."""
    if not loopback:
        yield
        return
    from ray._private import ray_constants

    old_env, old = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"), ray_constants.ENABLE_RAY_CLUSTER
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old
        if old_env is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = old_env


def _start_ray(cfg: SweepConfig) -> bool:
    """Start a local Ray or join a cluster; True when this call started it (and must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    c = cfg.cluster
    # worker logs stay in Ray's session directory: a worker's failure reaches the terminal as one line
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    handler = signal.getsignal(signal.SIGTERM)
    if c.address is None:
        with _listen(c.listen == "loopback"):
            ray.init(num_cpus=c.num_cpus or os.cpu_count(), num_gpus=c.num_gpus,
                     object_store_memory=OBJECT_STORE_BYTES, **kwargs)
    else:
        ray.init(address=c.address, **kwargs)
    if handler not in (None, signal.SIG_DFL) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)  # Ray's core worker installs its own (it aborts): ours again
    return True


def _dispatch(prep: Prepared, todo: list[Cell], plan: Plan, workers: list[dict], bar, lock: RootLock
              ) -> tuple[list[dict], float]:
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    cfg, root, fps = prep.cfg, prep.root, prep.fingerprints
    Remote = ray.remote(ShardWorker)
    progress_name = f"attrpatch/{cfg.name}/{lock.launch}/progress"
    progress = ray.remote(Progress).options(num_cpus=0, name=progress_name).remote()
    resources = ray.cluster_resources()
    seconds = {(c.model, c.task, c.method, c.shard): c.seconds for c in plan.cells}
    pools: dict[str, _Pool] = {}
    plans = {}
    # the largest model first: its long cells start now instead of last
    order = sorted(prep.entries, key=lambda e: -sum(v for k, v in seconds.items() if k[0] == e.name))
    for entry in order:
        cells = [c for c in todo if c.model == entry.name]
        if cells:
            pools[entry.name] = _Pool(entry, cells)
            plans[entry.name] = worker_plan(entry, cfg, resources, len(cells),
                                             worker_memory(entry, cfg, plan, resources.get("memory")))
    driver = {"pid": os.getpid(), "host": socket.gethostname(), "launch": lock.launch}
    pending: dict = {}  # ObjectRef → ("ready", model, i) or ("cell", model, i, cell)
    attempts: collections.Counter = collections.Counter()
    records: list[dict] = []
    pids: dict[tuple[str, int], tuple[str, int]] = {}
    generation: collections.Counter = collections.Counter()  # a replaced worker gets a fresh actor name
    in_flight: dict[str, float] = {}  # cell label → predicted seconds, while it runs
    weight = {c.label: max(seconds.get((c.model, c.task, c.method, c.shard), 0.0), 1e-3) for c in todo}
    total = sum(weight.values())
    done_weight = 0.0
    t_first = None

    def start_actor(model: str, i: int) -> None:
        options, _ = plans[model]
        pool = pools[model]
        generation[(model, i)] += 1
        name = f"attrpatch/{cfg.name}/{lock.launch}/{model}/{i}.{generation[(model, i)]}"
        actor = Remote.options(name=name, **options).remote(
            pool.entry, cfg, root, max(1, int(options["num_cpus"])), driver, progress_name)
        pool.actors[i] = actor
        pending[actor.info.remote()] = ("ready", model, i)

    def feed(model: str, i: int) -> None:
        nonlocal t_first
        pool = pools[model]
        while pool.queue and pool.busy[i] < cfg.cluster.in_flight:
            cell = pool.queue.popleft()
            ref = pool.actors[i].run.remote(cell, fps.of(cell.model, cell.task, cell.method),
                                            fps.options(cell.model, cell.task, cell.method))
            pending[ref] = ("cell", model, i, cell)
            in_flight[cell.label] = weight[cell.label]
            pool.busy[i] += 1
            t_first = t_first or time.perf_counter()

    def retire(model: str, i: int) -> None:
        """Free one worker (its model has nothing left for it) so another model's workers can start."""
        pool = pools[model]
        actor = pool.actors.pop(i, None)
        pool.live.discard(i)
        for ref in [r for r, what in pending.items() if what[0] == "ready" and what[1:3] == (model, i)]:
            del pending[ref]
        if actor is not None:
            ray.kill(actor, no_restart=True)

    for model, (_, n) in plans.items():
        for i in range(n):
            start_actor(model, i)
    try:
        last_poll = 0.0
        fractions: dict[str, float] = {}

        def show() -> None:  # finished cells plus the reported fraction of the running ones
            running = sum(w * fractions.get(label, 0.0) for label, w in in_flight.items())
            bar.n = max(bar.n, min(total, done_weight + running))
            bar.set_postfix_str(f"{len(records)}/{len(todo)} cells", refresh=True)

        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            if time.monotonic() - last_poll > 0.5:  # in-cell progress moves the bar between cells
                last_poll = time.monotonic()
                with contextlib.suppress(Exception):
                    fractions = ray.get(progress.snapshot.remote(), timeout=5)
                show()
            for ref in done:
                what = pending.pop(ref)
                model, i = what[1], what[2]
                pool = pools[model]
                if what[0] == "ready":
                    try:
                        info = ray.get(ref)
                    except (RayActorError, RayTaskError) as e:
                        _log_traceback(e)
                        raise SweepError(f"worker {i} of model {model!r} could not start: {_cause(e)}") from None
                    workers.append({"model": model, "worker": i, **info})
                    pids[(model, i)] = (info["host"], info["pid"])
                    pool.live.add(i)
                    if pool.queue:
                        feed(model, i)
                    else:
                        retire(model, i)
                    continue
                cell = what[3]
                pool.busy[i] -= 1
                in_flight.pop(cell.label, None)
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
                    _log_traceback(e)
                    raise SweepError(f"cell {cell.label} failed: {_cause(e)} (traceback in the log file)") from None
                records.append(record)
                pool.finished += 1
                done_weight += weight[cell.label]
                show()
                if pool.finished == pool.total:
                    for j in list(pool.actors):
                        retire(model, j)
                    _log_model_done(model, [r for r in records if r["model"] == model])
                elif i in pool.live:
                    if pool.queue:
                        feed(model, i)
                    elif pool.busy[i] == 0:
                        retire(model, i)
        return records, (time.perf_counter() - t_first) if t_first else 0.0
    except BaseException:
        _stop(pools, pids, ray)
        raise
    finally:  # on a cluster that outlives this launch the progress actor would otherwise stay
        with contextlib.suppress(Exception):
            ray.kill(progress, no_restart=True)


def _stop(pools: dict, pids: dict, ray) -> None:
    """Kill every worker and wait (bounded) until the local ones have exited, so none is mid-write."""
    from sweeps.lock import pid_alive

    for pool in pools.values():
        for actor in pool.actors.values():
            with contextlib.suppress(Exception):  # already dead
                ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 15
    here = socket.gethostname()
    alive = {pid for host, pid in pids.values() if host == here}  # remote workers are ended by Ray itself
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if pid_alive(p)}
        time.sleep(0.1)


def _cause(e: Exception) -> str:
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(cause).__name__


def _log_traceback(e: Exception) -> None:
    """The worker's traceback goes to the log file only (DEBUG); the terminal gets one line."""
    log.debug("worker traceback:\n%s", str(e))


def _log_model_done(model: str, records: list[dict]) -> None:
    rows = collections.Counter()
    for r in records:
        rows.update(r["rows"])
    shown = ", ".join(f"{n:,} {t} rows" for t, n in sorted(rows.items()))
    log.info("model %s done: %d cells, %s, %.1f s worker compute", model, len(records), shown,
             sum(r["compute_s"] for r in records))


# ---------------------------------------------------------------- the launch

def prepare_plan(prep: Prepared) -> tuple[Plan, dict]:
    """Step 1's plan: calibrated time, worker counts and the guard rails (local resources before Ray)."""
    cfg = prep.cfg
    threads = int(cfg.model.num_cpus or 1)
    rates = {e.name: calibrate(model_shape(e.spec), "cpu", threads) for e in prep.entries}
    plan = make_plan(cfg, prep.entries, prep.cells, prep.batches, rates)
    resources = local_resources(cfg) if cfg.cluster.address is None else None
    capacity = {}
    for e in prep.entries:
        if cfg.model.memory_gb is not None:
            capacity[e.name] = int(cfg.model.memory_gb * GiB)
        elif resources is not None:
            capacity[e.name] = int(resources["memory"])
    check(plan, cfg, capacity)
    if resources is not None:
        for e in prep.entries:
            n_cells = sum(1 for c in prep.cells if c.model == e.name)
            try:
                _, plan.workers[e.name] = worker_plan(e, cfg, resources, n_cells,
                                                     worker_memory(e, cfg, plan, resources["memory"]))
            except SweepError as err:
                raise ConfigError(str(err)) from None
    return plan, resources or {}


def write_plan(prep: Prepared, plan: Plan) -> str:
    prep.root.write_json("plan.json", plan.as_dict())
    return prep.root.display("plan.json")


def run_sweep(cfg: SweepConfig, console=None) -> SweepReport:
    """Run (or resume) a sweep; returns its report. Steps 1-5 of the module docstring."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    t0 = time.perf_counter()
    prep = preflight(cfg)  # step 1: nothing is written before this passes
    plan, _ = prepare_plan(prep)
    if cfg.plan:
        if console is not None:
            render(plan, console)
        path = write_plan(prep, plan)
        log.info("plan written to %s (plan=true: nothing computed)", path)
        return SweepReport(cfg, prep.root, [], 0, 0, time.perf_counter() - t0, 0.0, plan=plan)
    log.info(summary_line(plan))
    lock = RootLock(prep.root).acquire()  # step 2
    manifest = None
    done_before = 0
    records: list[dict] = []
    workers: list[dict] = []
    try:
        stale = prep.root.clean_temp()
        if stale:
            log.info("deleted %d temporary files left by an interrupted launch", stale)
        todo, recomputed = reconcile(prep)  # step 3 (may refuse: nothing written but the lock, released below)
        done_before = len(prep.cells) - len(todo)
        manifest = Manifest(prep, lock)
        lock.start_heartbeat(manifest.beat)
        write_plan(prep, plan)
        log.info("sweep %s: %d cells (%d models × %d tasks × %d methods + prompts, by shard); %d done before, "
                 "%d to run", cfg.name, len(prep.cells), len(prep.entries), len(cfg.tasks), len(cfg.methods),
                 len(prep.cells) - len(todo), len(todo))
        dispatch_s = 0.0
        if todo:
            import ray

            started = _start_ray(cfg)  # step 4
            try:
                total = sum(max(c.seconds, 1e-3) for c in plan.cells
                            if (c.model, c.task, c.method, c.shard) in {(t.model, t.task, t.method, t.shard) for t in todo})
                fmt = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]"
                with logging_redirect_tqdm(), tqdm(total=total, desc=f"sweep {cfg.name}", bar_format=fmt,
                                                   disable=not cfg.output.progress, dynamic_ncols=True) as bar:
                    bar.set_postfix_str(f"0/{len(todo)} cells")  # shown as ", 0/N cells" after the times
                    records, dispatch_s = _dispatch(prep, todo, plan, workers, bar, lock)
            finally:
                if started:
                    ray.shutdown()
        ran_now = {r["cell"] for r in records}
        all_records = [{**prep.root.read_json(c.marker), "resumed": c.label not in ran_now} for c in prep.cells]
        report = SweepReport(cfg, prep.root, all_records, ran=len(records), skipped=len(prep.cells) - len(todo),
                             wall_s=0.0, dispatch_s=dispatch_s, workers=workers, plan=plan, recomputed=recomputed)
        from sweeps.summary import summarise

        t_sum = time.perf_counter()
        summarise(report)  # step 5
        report.summary_s = time.perf_counter() - t_sum
        report.wall_s = time.perf_counter() - t0
        manifest.finish("complete", cells_run=len(records), wall_s=report.wall_s, summary_s=report.summary_s,
                        correlations=len(report.correlations))
        return report
    except BaseException as e:
        if manifest is not None:
            removed = prep.root.clean_temp()
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            done_now = len({p for p in prep.root.records()} & {c.marker for c in prep.cells})
            manifest.finish(status, cells_run=done_now - done_before, cells_done=done_now, temp_files_removed=removed,
                            error=None if status == "interrupted" else str(e).splitlines()[0][:500] if str(e) else
                            type(e).__name__)
        raise
    finally:
        lock.release()


__all__ = ["ResultsError", "SweepError", "SweepReport", "run_sweep", "worker_plan"]
