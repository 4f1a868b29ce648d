"""A sweep worker: loads its model once, then computes and writes cell after cell (one shard each).

    python -c "from sweeps.worker import run_cell; help(run_cell)"

``ShardWorker`` is a plain class; ``sweeps.driver`` wraps it with ``ray.remote(...)`` where it launches it,
sized by the model's spec. ``run_cell`` is a plain function (tests and benches call it directly). A worker
writes its part files itself, straight into the results root, and returns only a small record (rows,
checksums, timings): score tables never travel through the driver, so the driver's memory and network stay
flat however large the sweep.

A worker also watches its driver (``Watchdog``): when the driver's process is gone (same host) or its lock
heartbeat stops (another host), the worker exits within seconds instead of finishing cells nobody waits for.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import pyarrow as pa
import torch

from attrpatch import load_model, make_batch
from attrpatch.engine import forward, weights
from attrpatch.methods import get_method, run_method
from attrpatch.methods.core import device_share, reporting, retry_on_oom
from attrpatch.models import LoadedModel
from attrpatch.results import EDGE_SCHEMA, NODE_SCHEMA, RESERVED, ResultsRoot
from attrpatch.scores import concat, edge_table, node_table, prompt_table
from attrpatch.tasks import PromptBatch
from sweeps.config import SweepConfig, import_plugins
from sweeps.grid import Cell, ModelEntry
from sweeps.lock import LOCK, STALE_S, pid_alive

log = logging.getLogger(__name__)


def prompt_metrics(model: LoadedModel, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean and corrupted baselines of the metric, one engine forward each."""
    w = weights(model)
    ids = (batch.answer_ids, batch.wrong_ids)
    with torch.no_grad():
        clean = forward(w, batch.clean_tokens.to(w.device), batch.answer_pos, diff=ids)
        corrupt = forward(w, batch.corrupt_tokens.to(w.device), batch.answer_pos, diff=ids)
    return clean, corrupt


def cell_tables(model: LoadedModel, shard: PromptBatch, cell: Cell, cfg: SweepConfig) -> tuple[dict[str, pa.Table], float]:
    """Compute one cell: its tables by name (`prompts`, `nodes`, `edges`, extras) and the compute seconds."""
    t0 = time.perf_counter()
    if cell.method is None:
        clean, corrupt = prompt_metrics(model, shard)
        return {"prompts": prompt_table(shard, clean, corrupt)}, time.perf_counter() - t0
    info = get_method(cell.method)
    result = retry_on_oom(lambda: run_method(cell.method, model, shard, cfg.method.for_method(cell.method)),
                          f"cell {cell.label}")
    compute = time.perf_counter() - t0
    tables: dict[str, pa.Table] = {}
    # A method's declared tables are written even when empty, so every cell has the same partitions.
    if result.nodes or info.produces in ("nodes", "both"):
        tables["nodes"] = concat([node_table(ns, shard) for ns in result.nodes], NODE_SCHEMA)
    if result.edges or info.produces in ("edges", "both"):
        tables["edges"] = concat([edge_table(es, shard) for es in result.edges], EDGE_SCHEMA)
    for name, table in result.tables.items():
        if name in RESERVED:
            raise ValueError(f"method {cell.method!r} returned an extra table named {name!r}, a reserved name")
        tables[name] = table
    return tables, compute


def shard_of(batch: PromptBatch, shard: int, shard_size: int) -> PromptBatch:
    """Shard ``shard`` of the full batch (the same slicing as PromptBatch.shards)."""
    start = shard * shard_size
    return batch.select(range(start, min(start + shard_size, len(batch))))


def run_cell(model: LoadedModel, batch: PromptBatch, cell: Cell, cfg: SweepConfig, root: ResultsRoot,
             fingerprint: str | None = None, options: dict | None = None) -> dict:
    """Compute a cell and write its part files, then its completion record; returns that record.

    The record carries each part's rows, bytes and SHA-256 and the cell's fingerprint (its options and their
    hash), so a relaunch can verify the parts and refuse a changed config. A cell whose record exists with
    the same fingerprint is not recomputed (a retried task after its worker died mid-return)."""
    if root.exists(cell.marker):
        old = root.read_json(cell.marker)
        if old.get("fingerprint") == fingerprint:
            return {**old, "skipped": True}
    shard = shard_of(batch, cell.shard, cfg.task.shard_size)
    tables, compute = cell_tables(model, shard, cell, cfg)
    t0 = time.perf_counter()
    parts = {}
    for name, table in tables.items():
        rel = cell.part_path(name)
        written = root.write_table(rel, table)
        parts[name] = {"path": rel, "rows": written.rows, "bytes": written.bytes, "sha256": written.sha256}
    w = weights(model)
    record = {
        "cell": cell.label, "model": cell.model, "task": cell.task, "method": cell.method, "shard": cell.shard,
        "prompts": len(shard), "rows": {name: p["rows"] for name, p in parts.items()}, "parts": parts,
        "fingerprint": fingerprint, "options": options, "compute_s": compute, "write_s": time.perf_counter() - t0,
        "pid": os.getpid(), "host": socket.gethostname(), "node": _node_id(), "device": str(w.device),
        "dtype": str(w.dtype).removeprefix("torch."), "finished": time.time(),
    }
    root.write_json(cell.marker, record)
    return {**record, "skipped": False}


def pick_device(requested: str) -> str:
    """auto → cuda when this worker was given a GPU and CUDA works; otherwise cpu (logged when forced)."""
    gpu_ids = _assigned_gpus()
    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available() and (gpu_ids or requested == "cuda"):
        return "cuda"
    if requested == "cuda":
        raise RuntimeError("model.device=cuda but CUDA is not available on this worker: use model.device=auto")
    if gpu_ids:
        log.warning("worker was given GPU %s but CUDA is not available: running on cpu", gpu_ids)
    return "cpu"


def _assigned_gpus() -> list:
    try:
        import ray

        return list(ray.get_gpu_ids()) if ray.is_initialized() else []
    except Exception:  # not inside Ray
        return []


def _assigned(resource: str) -> float:
    try:
        import ray

        if not ray.is_initialized():  # ray.get_runtime_context() would start a local Ray
            return 0.0
        return float(ray.get_runtime_context().get_assigned_resources().get(resource, 0))
    except Exception:  # not inside Ray
        return 0.0


def _node_id() -> str | None:
    """The Ray node this process runs on (hosts can hold several nodes); None outside Ray."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # not inside Ray
        return None


def _quiet_libraries() -> None:
    """No per-worker weight-loading bars: they would interleave with the driver's progress bar."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


class Watchdog:
    """Ends this process when the driver is gone: its pid (same host) or its lock heartbeat (any host)."""

    def __init__(self, driver: dict, root: ResultsRoot, poll_s: float = 1.0):
        self.driver, self.root, self.poll_s = driver, root, poll_s
        thread = threading.Thread(target=self._loop, name="attrpatch-watchdog", daemon=True)
        thread.start()

    def driver_gone(self) -> bool:
        if self.driver.get("host") == socket.gethostname():
            return not pid_alive(int(self.driver["pid"]))
        try:
            lock = self.root.read_json(LOCK)
        except (FileNotFoundError, OSError, ValueError):
            return True
        return lock.get("launch") != self.driver.get("launch") or time.time() - lock.get("heartbeat", 0) > STALE_S

    def _loop(self) -> None:
        ticks = 0
        while True:
            time.sleep(self.poll_s)
            ticks += 1
            local = self.driver.get("host") == socket.gethostname()
            if (local or ticks % 10 == 0) and self.driver_gone():
                os._exit(3)  # nobody waits for this worker's cells; finished parts are already safe


class ShardWorker:
    """Loads one model once and serves many cells of it. Wrapped with ``ray.remote`` by the driver."""

    def __init__(self, entry: ModelEntry, cfg: SweepConfig, root: ResultsRoot, threads: int = 1,
                 driver: dict | None = None, progress: str | None = None):
        import_plugins(cfg.plugins)
        _quiet_libraries()
        torch.set_num_threads(max(1, threads))  # one torch thread per reserved CPU: no oversubscription
        if driver is not None:
            self.watchdog = Watchdog(driver, root)
        self.entry, self.cfg, self.root = entry, cfg, root
        self.progress = None
        if progress is not None:  # the driver's progress actor, looked up by name: a handle argument would
            import ray  # keep the constructor's arguments in the object store

            self.progress = ray.get_actor(progress)
        self.device = pick_device(cfg.model.device)
        # several workers share a device: each budgets with its share of the memory (a fractional GPU; on a CPU
        # the memory Ray reserved for it out of the machine's RAM)
        gpus, reserved = _assigned("GPU"), _assigned("memory")
        if self.device == "cuda":
            self.share = min(1.0, gpus) if 0 < gpus < 1 else 1.0
        else:
            import psutil

            self.share = min(1.0, reserved / psutil.virtual_memory().total) if reserved > 0 else 1.0
        t0 = time.perf_counter()
        self.model = load_model(entry.source, device=self.device, dtype=cfg.model.dtype)
        self.load_s = time.perf_counter() - t0
        self.batches: dict[str, PromptBatch] = {}

    def pid(self) -> int:
        return os.getpid()

    def info(self) -> dict:
        """Where this worker runs and what it was given (device, Ray resources, model load time, memory)."""
        resources = {}
        try:
            import ray

            if ray.is_initialized():  # ray.get_runtime_context() would start a local Ray
                resources = dict(ray.get_runtime_context().get_assigned_resources())
        except Exception:  # not inside Ray
            pass
        return {"pid": os.getpid(), "host": socket.gethostname(), "node": _node_id(), "device": self.device,
                "resources": resources, "gpu_ids": _assigned_gpus(), "load_s": self.load_s,
                "weight_bytes": weights(self.model).param_bytes(), "share": self.share}

    def batch(self, task: str) -> PromptBatch:
        """The task's whole prompt batch, made once per worker (deterministic given the seed)."""
        if task not in self.batches:
            t = self.cfg.task
            self.batches[task] = make_batch(task, self.model.tokenizer, t.n_prompts, t.seed, t.corruption, t.split)
        return self.batches[task]

    def run(self, cell: Cell, fingerprint: str | None = None, options: dict | None = None) -> dict:
        last = [0.0]

        def tell(fraction: float) -> None:  # at most every 0.5 s, fire-and-forget
            now = time.monotonic()
            if self.progress is not None and (now - last[0] > 0.5 or fraction >= 1):
                last[0] = now
                self.progress.update.remote(cell.label, fraction)

        with device_share(self.share), reporting(tell):
            return run_cell(self.model, self.batch(cell.task), cell, self.cfg, self.root, fingerprint, options)


class Progress:
    """The fraction done of every running cell, as workers report it (a tiny Ray actor the driver polls)."""

    def __init__(self):
        self.fractions: dict[str, float] = {}

    def update(self, label: str, fraction: float) -> None:
        self.fractions[label] = fraction

    def snapshot(self) -> dict[str, float]:
        return dict(self.fractions)
