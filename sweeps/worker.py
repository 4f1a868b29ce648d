"""A sweep worker: loads its model once, then computes and writes cell after cell (one shard each).

    python -c "from sweeps.worker import run_cell; help(run_cell)"

``ShardWorker`` is a plain class; ``sweeps.driver`` wraps it with ``ray.remote(...)`` where it launches
it, sized by the model's spec. ``run_cell`` is a plain function (tests and the benchmark call it
directly). A worker writes its part files itself, straight into the results root, and returns only a
small record (row counts, timings): score tables never travel through the driver, so the driver's
memory and network stay flat however large the sweep, and on many machines the root is a shared file
system or an object store that every worker can reach.
"""

from __future__ import annotations

import logging
import os
import socket
import time

import pyarrow as pa
import torch

from attrpatch import load_model, make_batch
from attrpatch.engine import forward, weights
from attrpatch.methods import get_method, run_method
from attrpatch.metrics import final_logit_diff
from attrpatch.models import LoadedModel
from attrpatch.scores import EDGE_SCHEMA, NODE_SCHEMA, concat, edge_table, node_table, prompt_table
from attrpatch.tasks import PromptBatch
from sweeps.config import SweepConfig, import_plugins
from sweeps.grid import Cell, ModelEntry
from sweeps.writer import ResultsRoot

log = logging.getLogger(__name__)


def prompt_metrics(model: LoadedModel, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean and corrupted baselines of the metric, one engine forward each."""
    w = weights(model)
    with torch.no_grad():
        clean = forward(w, batch.clean_tokens.to(w.device), batch.answer_pos)
        corrupt = forward(w, batch.corrupt_tokens.to(w.device), batch.answer_pos)
    return final_logit_diff(clean, batch), final_logit_diff(corrupt, batch)


def cell_tables(model: LoadedModel, shard: PromptBatch, cell: Cell, cfg: SweepConfig) -> tuple[dict[str, pa.Table], float]:
    """Compute one cell: its tables by name (`prompts`, `nodes`, `edges`, extras) and the compute seconds."""
    t0 = time.perf_counter()
    if cell.method is None:
        clean, corrupt = prompt_metrics(model, shard)
        compute = time.perf_counter() - t0
        return {"prompts": prompt_table(shard, clean, corrupt)}, compute
    info = get_method(cell.method)
    result = run_method(cell.method, model, shard, cfg.method.for_method(cell.method))
    compute = time.perf_counter() - t0
    tables: dict[str, pa.Table] = {}
    # A method's declared tables are written even when empty, so every cell has the same partitions.
    if result.nodes or info.produces in ("nodes", "both"):
        tables["nodes"] = concat([node_table(ns, shard) for ns in result.nodes], NODE_SCHEMA)
    if result.edges or info.produces in ("edges", "both"):
        tables["edges"] = concat([edge_table(es, shard) for es in result.edges], EDGE_SCHEMA)
    for name, table in result.tables.items():
        if name in ("prompts", "nodes", "edges", "plots", "_done", "wandb"):
            raise ValueError(f"method {cell.method!r} returned an extra table named {name!r}, a reserved name")
        tables[name] = table
    return tables, compute


def shard_of(batch: PromptBatch, shard: int, shard_size: int) -> PromptBatch:
    """Shard ``shard`` of the full batch (the same slicing as PromptBatch.shards)."""
    start = shard * shard_size
    return batch.select(range(start, min(start + shard_size, len(batch))))


def run_cell(model: LoadedModel, batch: PromptBatch, cell: Cell, cfg: SweepConfig, root: ResultsRoot) -> dict:
    """Compute a cell and write its part files, then its completion record; returns that record.

    A cell whose record exists is not recomputed (a retried task after its worker died mid-return)."""
    if root.exists(cell.marker):
        return {**root.read_json(cell.marker), "skipped": True}
    shard = shard_of(batch, cell.shard, cfg.task.shard_size)
    tables, compute = cell_tables(model, shard, cell, cfg)
    t0 = time.perf_counter()
    for name, table in tables.items():
        root.write_table(f"{cell.table_dir(name)}/{cell.part}", table)
    record = {
        "cell": cell.label, "model": cell.model, "task": cell.task, "method": cell.method, "shard": cell.shard,
        "prompts": len(shard), "rows": {name: t.num_rows for name, t in tables.items()},
        "compute_s": compute, "write_s": time.perf_counter() - t0, "pid": os.getpid(),
        "host": socket.gethostname(), "node": _node_id(), "finished": time.time(),
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


class ShardWorker:
    """Loads one model once and serves many cells of it. Wrapped with ``ray.remote`` by the driver."""

    def __init__(self, entry: ModelEntry, cfg: SweepConfig, root: ResultsRoot, threads: int = 1):
        import_plugins(cfg.plugins)
        _quiet_libraries()
        torch.set_num_threads(max(1, threads))  # one torch thread per reserved CPU: no oversubscription
        self.entry, self.cfg, self.root = entry, cfg, root
        self.device = pick_device(cfg.model.device)
        t0 = time.perf_counter()
        self.model = load_model(entry.source, device=self.device)
        self.load_s = time.perf_counter() - t0
        self.batches: dict[str, PromptBatch] = {}

    def pid(self) -> int:
        return os.getpid()

    def info(self) -> dict:
        """Where this worker runs and what it was given (device, Ray resources, model load time)."""
        resources = {}
        try:
            import ray

            resources = dict(ray.get_runtime_context().get_assigned_resources())
        except Exception:  # not inside Ray
            pass
        return {"pid": os.getpid(), "host": socket.gethostname(), "node": _node_id(), "device": self.device,
                "resources": resources, "gpu_ids": _assigned_gpus(), "load_s": self.load_s}

    def batch(self, task: str) -> PromptBatch:
        """The task's whole prompt batch, made once per worker (deterministic given the seed)."""
        if task not in self.batches:
            t = self.cfg.task
            self.batches[task] = make_batch(task, self.model.tokenizer, t.n_prompts, t.seed, t.corruption, t.split)
        return self.batches[task]

    def run(self, cell: Cell) -> dict:
        return run_cell(self.model, self.batch(cell.task), cell, self.cfg, self.root)
