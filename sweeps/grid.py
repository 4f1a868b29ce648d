"""Grid expansion: models × tasks × (prompts + methods) × prompt shards → cells, each one part file.

    python -c "from sweeps.config import SweepConfig; from sweeps.grid import expand; print(len(expand(SweepConfig(models=('gpt2-small',)))))"

A cell is the unit of work and of output: one Ray task, one part file per table, named by its shard
(``part-00003.parquet``) so a re-launch recognises what exists. ``method=None`` is the prompts cell of a
shard (texts and the clean / corrupted metric baselines).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

from attrpatch.models import ModelSpec, resolve_spec
from attrpatch.results import part_name, record_path, table_dir
from attrpatch.tasks import TaskConfig, generate
from sweeps.config import SweepConfig

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def partition_name(source: str) -> str:
    """A Hive-partition-safe model name: registered names as they are; paths and names with ``/`` become
    ``<basename>-<hash8>`` (the hash of the full source keeps two ``…/final`` checkpoints apart)."""
    if _SAFE.match(source) and len(source) <= 64:
        return source
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(os.path.normpath(source))).strip("._") or "model"
    digest = hashlib.sha1(os.path.normpath(source).encode()).hexdigest()[:8]
    return f"{base[:40]}-{digest}"


@dataclass(frozen=True)
class ModelEntry:
    """A model of the sweep: its partition name, what to load, and its resource hints."""

    name: str  # partition-safe (the `model=` directory)
    source: str  # registered name or checkpoint directory, as load_model takes it
    spec: ModelSpec


@dataclass(frozen=True, order=True)
class Cell:
    model: str
    task: str
    method: str | None  # None: the prompts table of the shard
    shard: int

    @property
    def part(self) -> str:
        return part_name(self.shard)

    def table_dir(self, table: str) -> str:
        """ROOT-relative directory of one of this cell's tables (`prompts`, `nodes`, `edges`, extras)."""
        return table_dir(table, self.model, self.task, self.method)

    def part_path(self, table: str) -> str:
        return f"{self.table_dir(table)}/{self.part}"

    @property
    def marker(self) -> str:
        """ROOT-relative completion record, written after every table of the cell is in place."""
        return record_path(self.model, self.task, self.method, self.shard)

    @property
    def label(self) -> str:
        return f"{self.model}/{self.task}/{self.method or 'prompts'}/{self.shard}"


def model_entries(cfg: SweepConfig) -> list[ModelEntry]:
    entries = []
    for source in cfg.model_sources:
        source = os.path.abspath(os.path.expanduser(source)) if _looks_like_path(source) else source
        entries.append(ModelEntry(partition_name(source), source, resolve_spec(source)))
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"two models map to the same partition name: {names}")
    return entries


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or os.sep in source or os.path.isdir(source)


def task_config(cfg: SweepConfig, task: str) -> TaskConfig:
    t = cfg.task
    return TaskConfig(task, t.n_prompts, t.seed, t.corruption, t.split)


def n_shards(cfg: SweepConfig, task: str, n_prompts: int | None = None) -> int:
    """Shards of a task: its generated prompt count (a task may make fewer than asked) / shard_size."""
    n = len(generate(task_config(cfg, task))) if n_prompts is None else n_prompts
    return -(-n // cfg.task.shard_size)


def expand(cfg: SweepConfig, models: list[ModelEntry] | None = None,
           prompts: dict[str, int] | None = None) -> list[Cell]:
    """Every cell of the sweep, grouped by model (so a model's workers can be released when it is done);
    ``prompts`` maps each task to its prompt count when already known."""
    models = model_entries(cfg) if models is None else models
    shards = {task: n_shards(cfg, task, (prompts or {}).get(task)) for task in cfg.tasks}
    return [Cell(m.name, task, method, s)
            for m in models for task in cfg.tasks for s in range(shards[task])
            for method in (None, *cfg.methods)]
