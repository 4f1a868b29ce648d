"""A sweep's cost before any compute: rows, FLOPs, memory and time per cell, and the guard rails.

    python -m sweeps.run model=gpt2-xl methods=[edge_attribution] plan=true    # prints the plan, writes ROOT/plan.json

1. Prompts: every task's prompts are generated and tokenized here (cheap), so each shard's prompt lengths
   and first differing positions are known exactly.
2. Per cell, the method's cost model (``attrpatch.methods.register_cost``) gives the rows of every table
   (exact: the same rules ``scores.node_table`` / ``edge_table`` apply), patched forward rows, FLOPs and the
   memory beyond the weights: ``fixed`` (caches and dense scores, whatever the chunking) and ``peak`` (at the
   default chunk size; chunks shrink to the device's budget at run time).
3. Time: FLOPs ÷ this machine's measured throughput (``calibrate``: a few seconds of timed engine forwards
   and backwards of a random two-layer model with the swept model's widths — small matrices run far below a
   CPU's peak, so a rate measured on one width misjudges another by up to 3× —, cached per host, device,
   thread count and widths in ``~/.cache/attrpatch/calibration.json``; the best of three timing windows, so
   a calibration beside another job is not much slower than one on an idle machine), per method family
   (``EFFICIENCY``: contractions and restarted forwards run at a different rate than plain forwards). The
   rate is the driver's CPU at the workers' thread count: workers on GPUs or faster machines finish sooner
   than the plan says (its time is then an upper bound; rows and memory do not depend on the device).
4. Guard rails (``check``): a cell that needs more memory than its worker has, or a sweep that would write
   more rows than ``limits.max_rows``, refuses with the numbers, the override, and the cheaper choices.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attrpatch.errors import ConfigError
from attrpatch.methods import get_method
from attrpatch.methods.core import Work
from attrpatch.models import ModelShape, load_tokenizer, model_shape
from attrpatch.tasks import PromptBatch, make_batch
from sweeps.config import SweepConfig
from sweeps.grid import Cell, ModelEntry, task_config

GiB = 2**30
# Bytes a prompt costs a worker that holds its task: texts, token ids, and Python objects (measured ~1.4 KB
# for IOI prompts; rounded up).
PROMPT_BYTES = 2048
# Effective rate of each method family relative to the calibrated forward+backward rate: measured with
# ``bench/bench_scale.py`` on this project's 2-core CPU (gpt2-small and gpt2-medium shapes, 4 prompts, 2 threads;
# the geometric mean of the two sizes' measured/predicted). Restarted suffix forwards, the split q/k/v inputs of
# the EAP contraction and of the faithfulness circuits, and small batches run well below the rate of a plain
# forward and backward. Methods not measured there take the value of their closest relative.
EFFICIENCY = {"attribution": 0.47, "atp_star": 0.47, "relp": 0.47, "dla": 0.47, "attention_attribution": 0.47,
              "logit_lens": 0.47, "edge_attribution": 0.50, "edge_relp": 0.50, "eap_ig": 0.45, "activation": 0.27,
              "edge_activation": 0.41, "faithfulness": 0.136, None: 0.37}  # None: a task's prompts cell
_CACHE = Path(os.environ.get("ATTRPATCH_CACHE", Path.home() / ".cache" / "attrpatch")) / "calibration.json"


class PlanError(ConfigError):
    """A sweep the plan refuses (too much memory or too many rows); the message gives the numbers and the fix."""


@dataclass
class CellPlan:
    model: str
    task: str
    method: str | None
    shard: int
    rows: dict[str, int]
    forward_rows: float
    flops: float
    seconds: float
    peak_bytes: int  # weights + the method's peak
    fixed_bytes: int  # weights + what the method needs whatever the chunking

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Plan:
    cells: list[CellPlan]
    rates: dict[str, float]  # model → calibrated FLOP/s of one of its workers
    workers: dict[str, int] = field(default_factory=dict)  # model → workers the cluster fits

    def totals(self) -> dict:
        rows: dict[str, int] = {}
        for c in self.cells:
            for t, n in c.rows.items():
                rows[t] = rows.get(t, 0) + n
        seconds = sum(c.seconds for c in self.cells)
        by_model: dict[str, float] = {}
        for c in self.cells:
            by_model[c.model] = by_model.get(c.model, 0) + c.seconds
        wall = sum(s / max(1, self.workers.get(m, 1)) for m, s in by_model.items())
        return {"cells": len(self.cells), "rows": rows, "bytes": {t: n * ROW_BYTES.get(t, 40) for t, n in rows.items()},
                "forward_rows": sum(c.forward_rows for c in self.cells), "flops": sum(c.flops for c in self.cells),
                "seconds": seconds, "wall_seconds": wall,
                "peak_bytes": max((c.peak_bytes for c in self.cells), default=0)}

    def as_dict(self) -> dict:
        return {"cells": [c.as_dict() for c in self.cells], "totals": self.totals(), "rates": self.rates,
                "workers": self.workers}


# Parquet bytes a row takes on disk (zstd), measured on this project's sweeps; for the size estimate only.
ROW_BYTES = {"nodes": 6, "edges": 8, "prompts": 120, "faithfulness": 80}


# ------------------------------------------------------------------------------------------ step 1

def task_batches(cfg: SweepConfig) -> dict[str, PromptBatch]:
    """Every task's prompts, tokenized (refuses first when a task would not fit a worker's memory)."""
    if cfg.task.n_prompts > cfg.limits.max_prompts:
        raise PlanError(f"task.n_prompts={cfg.task.n_prompts:,} is more than limits.max_prompts="
                        f"{cfg.limits.max_prompts:,} (each worker holds a task's prompts: ~"
                        f"{cfg.task.n_prompts * PROMPT_BYTES / GiB:,.1f} GiB): ask for fewer prompts, or raise "
                        "limits.max_prompts if the workers have the memory")
    tok = load_tokenizer()
    out = {}
    for task in cfg.tasks:
        t = task_config(cfg, task)
        out[task] = make_batch(task, tok, t.n_prompts, t.seed, t.corruption, t.split)
    return out


def shard_work(batch: PromptBatch, shard: int, shard_size: int, shape: ModelShape, dtype_bytes: int) -> Work:
    lo, hi = shard * shard_size, min((shard + 1) * shard_size, len(batch))
    lengths = tuple(int(x) for x in batch.lengths[lo:hi])
    differ = (batch.clean_tokens[lo:hi] != batch.corrupt_tokens[lo:hi])
    first = tuple(int(d.nonzero()[0]) if d.any() else length for d, length in zip(differ, lengths, strict=True))
    return Work(shape, lengths, first, dtype_bytes)


# ------------------------------------------------------------------------------------------ step 3

def _time_engine(shape: ModelShape, device: str, seconds: float = 1.0) -> float:
    """FLOP/s of engine forwards + backwards of a random model of ``shape`` on ``device`` (this thread count):
    the best of three windows of ``seconds``."""
    from attrpatch.engine import Recorder, forward, random_weights
    from attrpatch.methods.core import forward_flops

    w = random_weights(shape, device=device)
    n, P = 8, 24
    tokens = torch.randint(0, shape.vocab, (n, P), generator=torch.Generator().manual_seed(0)).to(device)
    pos = torch.full((n,), P - 1)
    ids = (torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long))
    flops = 3 * forward_flops(shape, n, P, logits=False)
    best = 0.0
    for _ in range(3):
        done, t0 = 0, time.perf_counter()
        while True:
            rec = Recorder(("embed",), leaves=True)
            with torch.enable_grad():
                diff = forward(w, tokens, pos, rec, diff=ids)
                torch.autograd.grad(diff.sum(), [rec.acts[("embed", 0)]])
            if device == "cuda":
                torch.cuda.synchronize()
            done += 1
            if time.perf_counter() - t0 > seconds and done >= 2:
                break
        best = max(best, done * flops / (time.perf_counter() - t0))
    return best


def calibration_shape(shape: ModelShape) -> ModelShape:
    """The model timed for ``shape``: its widths, two layers, a small vocabulary (the unembedding is not timed)."""
    return ModelShape(n_layers=2, n_heads=shape.n_heads, d_model=shape.d_model, d_mlp=shape.d_mlp, vocab=8192,
                      n_ctx=64)


def calibrate(shape: ModelShape, device: str = "cpu", threads: int = 1) -> float:
    """This machine's engine throughput (FLOP/s) for one worker of ``threads`` threads on ``device`` at the widths
    of ``shape``, measured once and cached (host, device, threads, torch version, widths)."""
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    key = (f"{socket.gethostname()}|{device}|{name}|{threads}|{torch.__version__}|"
           f"{shape.d_model}x{shape.n_heads}x{shape.d_mlp}")
    try:
        cache = json.loads(_CACHE.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            _time_engine(calibration_shape(shape), device, seconds=0.2)  # warm-up
            cache[key] = _time_engine(calibration_shape(shape), device)
        finally:
            torch.set_num_threads(before)
        try:
            _CACHE.parent.mkdir(parents=True, exist_ok=True)
            _CACHE.write_text(json.dumps(cache, indent=1))
        except OSError:
            pass
    return cache[key]


# ------------------------------------------------------------------------------------------ step 2

def make_plan(cfg: SweepConfig, entries: list[ModelEntry], cells: list[Cell], batches: dict[str, PromptBatch],
              rates: dict[str, float], workers: dict[str, int] | None = None) -> Plan:
    """Steps 2–3 for every cell of the grid; ``rates``: each model's calibrated FLOP/s per worker."""
    dtype_bytes = 4 if cfg.model.dtype == "float32" else 2
    shapes = {e.name: model_shape(e.spec) for e in entries}
    out = []
    for c in cells:
        shape, rate = shapes[c.model], rates[c.model]
        weight_bytes = shape.n_params * dtype_bytes
        w = shard_work(batches[c.task], c.shard, cfg.task.shard_size, shape, dtype_bytes)
        if c.method is None:
            from attrpatch.methods.core import forward_flops

            flops = 2 * forward_flops(shape, w.n, w.P)
            out.append(CellPlan(c.model, c.task, None, c.shard, {"prompts": w.n}, 2 * w.n, flops,
                                flops / (rate * EFFICIENCY[None]),
                                weight_bytes, weight_bytes))
            continue
        info = get_method(c.method)
        if info.cost is None:  # a plugin method without a cost model: rows and time unknown
            out.append(CellPlan(c.model, c.task, c.method, c.shard, {}, 0, 0, 0.0, weight_bytes, weight_bytes))
            continue
        cost = info.cost(w, cfg.method.for_method(c.method))
        seconds = cost.flops / (rate * EFFICIENCY.get(c.method, 1.0))
        out.append(CellPlan(c.model, c.task, c.method, c.shard, cost.rows, cost.forward_rows, cost.flops, seconds,
                            weight_bytes + cost.peak_bytes, weight_bytes + cost.fixed_bytes))
    return Plan(out, dict(rates), workers or {})


# ------------------------------------------------------------------------------------------ step 4

def _cheaper(method: str | None, shard_size: int) -> str:
    subset = f"method.overrides.{method}.edge_subset=0.01, " if method == "edge_activation" else ""
    return (f"cheaper: {subset}method.overrides.{method}.per_position=false or per_prompt=false, fewer prompts, "
            f"or smaller shards (task.shard_size, now {shard_size})")


def check(plan: Plan, cfg: SweepConfig, worker_bytes: dict[str, int]) -> None:
    """Refuse (``PlanError``) a sweep beyond the limits, naming the (model, task, method), its rows and cost,
    the override, and the cheaper choices."""
    groups: dict[tuple, list] = {}
    for c in plan.cells:
        g = groups.setdefault((c.model, c.task, c.method), [0, 0.0, 0])
        g[0] += sum(c.rows.values())
        g[1] += c.seconds
        g[2] = max(g[2], c.fixed_bytes)
    n_rows = sum(g[0] for g in groups.values())
    if n_rows > cfg.limits.max_rows:
        (model, task, method), (rows, seconds, _) = max(groups.items(), key=lambda kv: kv[1][0])
        raise PlanError(
            f"the sweep would write {n_rows:,} rows (~{_gb(n_rows * ROW_BYTES['edges'])} of Parquet), more than "
            f"limits.max_rows={cfg.limits.max_rows:,}; the largest: {method} on {model}/{task}: {rows:,} rows, "
            f"~{_hours(seconds)} of compute ({_cheaper(method, cfg.task.shard_size)}; or raise limits.max_rows)")
    for (model, task, method), (rows, seconds, fixed) in groups.items():
        have = worker_bytes.get(model)
        if have and fixed > have:
            raise PlanError(
                f"{method} on {model}/{task} needs ~{fixed / GiB:,.1f} GiB per worker (weights, caches and dense "
                f"scores of a {cfg.task.shard_size}-prompt shard) but a worker has {have / GiB:,.1f} GiB; it would "
                f"write {rows:,} rows in ~{_hours(seconds)} of compute ({_cheaper(method, cfg.task.shard_size)}; or "
                "raise model.memory_gb if the machines have it)")


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:,.1f} GB"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds >= 3600 else f"{seconds / 60:,.1f} min" if seconds >= 60 \
        else f"{seconds:,.1f} s"


def summary_line(plan: Plan) -> str:
    t = plan.totals()
    rows = ", ".join(f"{n:,} {k}" for k, n in sorted(t["rows"].items()))
    return (f"plan: {t['cells']} cells, {rows} rows (~{_gb(sum(t['bytes'].values()))} of Parquet), "
            f"{t['flops'] / 1e12:,.1f} TFLOP, ~{_hours(t['seconds'])} of worker compute "
            f"(~{_hours(t['wall_seconds'])} wall), peak {t['peak_bytes'] / GiB:,.1f} GiB per worker")


def render(plan: Plan, console) -> None:
    """The plan as a table: per model × task × method, totals over its shards."""
    from rich.table import Table

    t = Table(title="plan: predicted cost per model × task × method (all shards)")
    for col in ("model", "task", "method", "cells", "rows", "GB", "patched fwd rows", "TFLOP", "time", "peak GiB"):
        t.add_column(col, justify="left" if col in ("model", "task", "method") else "right", no_wrap=True)
    groups: dict[tuple, list[CellPlan]] = {}
    for c in plan.cells:
        groups.setdefault((c.model, c.task, c.method or "prompts"), []).append(c)
    for (model, task, method), cs in groups.items():
        rows = sum(sum(c.rows.values()) for c in cs)
        size = sum(n * ROW_BYTES.get(k, 40) for c in cs for k, n in c.rows.items())
        t.add_row(model, task, method, str(len(cs)), f"{rows:,}", f"{size / 1e9:.2f}",
                  f"{sum(c.forward_rows for c in cs):,.0f}", f"{sum(c.flops for c in cs) / 1e12:.2f}",
                  _hours(sum(c.seconds for c in cs)), f"{max(c.peak_bytes for c in cs) / GiB:.1f}")
    console.print(t)
    rates = ", ".join(f"{m}: {r / 1e9:.1f} GFLOP/s" for m, r in plan.rates.items())
    console.print(f"{summary_line(plan)}; calibrated throughput per worker: {rates}")

