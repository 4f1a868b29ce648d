"""The sweep's typed configuration: frozen dataclasses that are also Hydra's structured schema.

    python -m sweeps.run --cfg job          # print the resolved config without running anything

``conf/config.yaml`` extends ``SweepConfig`` (registered in Hydra's ConfigStore as ``sweep_schema``), so
a misspelt key or a value of the wrong type fails while Hydra composes the config. ``from_dictconfig`` is
the ONE conversion from a ``DictConfig``: it builds these frozen dataclasses, whose ``__post_init__``
rejects bad values, and ``validate`` checks names against the registries (models, tasks, methods) — all
before Ray starts. Nothing below the entry point sees a ``DictConfig`` or calls ``.get(key, default)``.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any

from attrpatch.errors import ConfigError


class SweepConfigError(ConfigError):
    """A sweep option that cannot be used; the message names the option and the fix."""


def _tuple(value) -> tuple:
    return tuple(value) if value is not None else value


def _freeze_lists(obj, names: tuple[str, ...]) -> None:
    """OmegaConf hands lists to frozen dataclasses; store them as tuples (hashable, immutable)."""
    for name in names:
        object.__setattr__(obj, name, _tuple(getattr(obj, name)))


@dataclass(frozen=True)
class ModelOptions:
    """Options applied to every model of the sweep (resource hints default to the model's ModelSpec)."""

    device: str = "auto"  # auto: cuda when the worker was given a GPU and CUDA works, else cpu
    dtype: str = "float32"  # float32 | bfloat16 | float16: weights and activations; scores reduce in float32
    path: str | None = None  # a local GPT-2 checkpoint directory to sweep instead of `models`
    workers: int | None = None  # actors per model; None: as many as the cluster fits (at most one per cell)
    num_gpus: float | None = None  # GPUs per actor; None: the spec's hint (fractions pack small models)
    num_cpus: float | None = None  # CPUs per actor (also its torch threads); None: the spec's hint
    memory_gb: float | None = None  # memory reserved per actor; None: the spec's hint

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise SweepConfigError(f"model.device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise SweepConfigError(f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.workers is not None and self.workers < 1:
            raise SweepConfigError(f"model.workers must be at least 1 (or null for automatic), got {self.workers}")
        for name in ("num_gpus", "num_cpus", "memory_gb"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise SweepConfigError(f"model.{name} must be non-negative (or null for the model's hint), got {value}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise SweepConfigError(f"model.num_cpus must be at least 1 (torch needs a thread), got {self.num_cpus}")


@dataclass(frozen=True)
class TaskOptions:
    """Options applied to every task of the sweep (see attrpatch.tasks.TaskConfig)."""

    n_prompts: int = 256  # a few hundred IOI prompts: the scale of the IOI / AtP replications
    seed: int = 0  # prompt generation is deterministic given the seed
    corruption: str | None = None  # None: the task's default corruption (README "Tasks" lists them)
    split: str = "all"  # ioi only: train / test hold out name pairs
    shard_size: int = 32  # prompts per shard: one Ray task, one part file; 32 fits a CPU shard in memory

    def __post_init__(self) -> None:
        if self.n_prompts < 1:
            raise SweepConfigError(f"task.n_prompts must be at least 1, got {self.n_prompts}")
        if self.shard_size < 1:
            raise SweepConfigError(f"task.shard_size must be at least 1, got {self.shard_size}")
        if self.split not in ("all", "train", "test"):
            raise SweepConfigError(f"task.split must be all, train or test, got {self.split!r}")


@dataclass(frozen=True)
class MethodOptions:
    """``attrpatch.methods.MethodConfig`` fields shared by every method, plus per-method overrides (any shared
    field, or an option of that method's own, e.g. ``overrides.eap_ig.ig_steps``)."""

    directions: tuple[str, ...] = ("denoise",)  # denoise = TL `patching`'s direction; add noise for S1
    kinds: tuple[str, ...] | None = None  # node kinds to score; null: every kind a method supports
    per_prompt: bool = True  # one row per prompt (the correlation plots pair prompts); false: shard means
    per_position: bool = True  # keep the pos axis; false: summed over positions
    max_rows: int = 256  # rows per pass at most (with the device's memory budget); does not change scores
    seed: int = 0  # random choices inside a method (edge subset sampling)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # method name → fields (methods not in
    # the sweep are ignored, so presets can carry them)

    def __post_init__(self) -> None:
        _freeze_lists(self, ("directions", "kinds"))

    def for_method(self, name: str):
        """The checked MethodConfig of one method: shared fields, then that method's overrides. The shared
        ``kinds`` apply to each method as far as it scores them (a method that scores none of them is an error;
        a method that reads no kinds ignores them); an override's ``kinds`` must all be the method's."""
        from attrpatch.methods import SHARED_FIELDS, MethodError, get_method, method_config

        fields = {f: getattr(self, f) for f in SHARED_FIELDS}
        info = get_method(name)
        if self.kinds is not None:
            mine = tuple(k for k in self.kinds if k in (info.kinds or ()))
            if info.kinds is not None and not mine:
                raise MethodError(f"method.kinds={list(self.kinds)} has no kind that {name!r} scores "
                                  f"({list(info.kinds)}): set method.overrides.{name}.kinds")
            fields["kinds"] = mine if info.kinds is not None else None
        fields.update({k: _tuple(v) if isinstance(v, list) else v for k, v in self.overrides.get(name, {}).items()})
        return method_config(name, **fields)


@dataclass(frozen=True)
class ClusterOptions:
    """Where Ray runs. No address: a local Ray on this machine; `auto` or `ray://host:port`: join a cluster."""

    address: str | None = None  # null: start a local Ray; auto / ray://…: join an existing cluster
    num_cpus: int | None = None  # local Ray only: CPUs to offer; null: every core
    num_gpus: int | None = None  # local Ray only: GPUs to declare; null: detected ones
    max_restarts: int = 3  # a killed worker is restarted this often (it reloads its model)
    max_task_retries: int = 3  # a shard whose worker died is retried this often on the restarted worker
    in_flight: int = 2  # shards queued per worker: the next one starts without a driver round trip
    listen: str = "loopback"  # local Ray only: loopback (127.0.0.1) or node (this machine's network address)

    def __post_init__(self) -> None:
        for name in ("max_restarts", "max_task_retries"):
            if getattr(self, name) < 0:
                raise SweepConfigError(f"cluster.{name} must be non-negative, got {getattr(self, name)}")
        if self.in_flight < 1:
            raise SweepConfigError(f"cluster.in_flight must be at least 1, got {self.in_flight}")
        if self.listen not in ("loopback", "node"):
            raise SweepConfigError(f"cluster.listen must be loopback or node, got {self.listen!r}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise SweepConfigError(f"cluster.num_cpus must be at least 1 (or null for every core), got {self.num_cpus}")
        if self.address is not None and (self.num_cpus is not None or self.num_gpus is not None):
            raise SweepConfigError(
                "cluster.num_cpus / cluster.num_gpus describe a local Ray; an existing cluster "
                f"({self.address}) brings its own resources: drop them or drop cluster.address"
            )
        if self.address is not None and not (self.address == "auto" or self.address.startswith("ray://")
                                             or ":" in self.address):
            raise SweepConfigError(
                f"cluster.address must be auto, ray://HOST:PORT or HOST:PORT, got {self.address!r}"
            )


@dataclass(frozen=True)
class WandbOptions:
    """Weights & Biases: one run per (model, task), grouped by sweep."""

    mode: str = "offline"  # offline: no account or network needed (`wandb sync` later); online; disabled
    project: str = "attrpatch"  # W&B project of the runs
    entity: str | None = None  # W&B team or user; null: the key's default
    group: str | None = None  # run group; null: the sweep name
    tags: tuple[str, ...] = ()  # extra run tags

    def __post_init__(self) -> None:
        _freeze_lists(self, ("tags",))
        if self.mode not in ("offline", "online", "disabled"):
            raise SweepConfigError(f"wandb.mode must be offline, online or disabled, got {self.mode!r}")


@dataclass(frozen=True)
class OutputOptions:
    """Where results go: a local directory or a pyarrow.fs URI (s3://bucket/prefix, gs://…)."""

    root: str = "results/${name}"  # per-sweep root: re-launching the same name resumes it
    plots: bool = True  # correlation PNGs under ROOT/plots (and to W&B)
    progress: bool = True  # a progress bar over shards (stderr)

    def __post_init__(self) -> None:
        if not self.root:
            raise SweepConfigError("output.root is empty: give a directory or a URI such as s3://bucket/prefix")


@dataclass(frozen=True)
class LimitsOptions:
    """Guard rails checked before any work (from the plan): a sweep beyond them refuses with the estimate."""

    max_rows: int = 1_000_000_000  # score rows the whole sweep may write (~10 GB of Parquet at ~10 B a row)
    max_prompts: int = 1_000_000  # prompts per task (each worker holds a task's prompts in memory)

    def __post_init__(self) -> None:
        for name in ("max_rows", "max_prompts"):
            if getattr(self, name) < 1:
                raise SweepConfigError(f"limits.{name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class SweepConfig:
    """One launch: models × tasks × methods × prompt shards."""

    name: str = "default"  # the sweep's name: W&B group and (by default) the results directory
    models: tuple[str, ...] = ("ioi-tiny",)  # registered names (README "Models") or checkpoint directories
    tasks: tuple[str, ...] = ("ioi",)  # task names (README "Tasks")
    # all three families, and the exact ground truth of each (activation for nodes, edge_activation for EAP)
    methods: tuple[str, ...] = ("attribution", "activation", "edge_attribution", "edge_activation")
    plugins: tuple[str, ...] = ()  # importable modules that register extra methods (driver and workers)
    resume: str = "auto"  # auto: resume a root whose cells match, refuse if options changed; overwrite: discard them
    plan: bool = False  # print and write the cost plan (ROOT/plan.json), compute nothing
    model: ModelOptions = field(default_factory=ModelOptions)
    task: TaskOptions = field(default_factory=TaskOptions)
    method: MethodOptions = field(default_factory=MethodOptions)
    cluster: ClusterOptions = field(default_factory=ClusterOptions)
    wandb: WandbOptions = field(default_factory=WandbOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    limits: LimitsOptions = field(default_factory=LimitsOptions)

    def __post_init__(self) -> None:
        _freeze_lists(self, ("models", "tasks", "methods", "plugins"))
        if self.resume not in ("auto", "overwrite"):
            raise SweepConfigError(f"resume must be auto or overwrite, got {self.resume!r}")
        if not self.name or any(c in self.name for c in "/\\=") or self.name.startswith("."):
            raise SweepConfigError(f"name must be a plain word (no / \\ = or leading dot), got {self.name!r}")
        for key in ("models", "tasks", "methods"):
            values = getattr(self, key)
            if not values and not (key == "models" and self.model.path):
                raise SweepConfigError(f"{key} is empty: list at least one, e.g. {key}=[{_EXAMPLE[key]}]")
            dupes = sorted({v for v in values if values.count(v) > 1})
            if dupes:
                raise SweepConfigError(f"{key} lists {dupes} more than once: each may appear once")

    @property
    def model_sources(self) -> tuple[str, ...]:
        """What to load: `model.path` when given, else the `models` list."""
        return (self.model.path,) if self.model.path else self.models


_EXAMPLE = {"models": "ioi-tiny", "tasks": "ioi", "methods": "attribution,activation"}

_SECTIONS = {"model": ModelOptions, "task": TaskOptions, "method": MethodOptions, "cluster": ClusterOptions,
             "wandb": WandbOptions, "output": OutputOptions, "limits": LimitsOptions}


def schema_node():
    """SweepConfig as a writable OmegaConf node, for Hydra's ConfigStore (frozen dataclasses make
    read-only nodes, which Hydra could not merge overrides into)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    node = OmegaConf.structured(SweepConfig)

    def unfreeze(n) -> None:
        OmegaConf.set_readonly(n, None)
        items = n.keys() if isinstance(n, DictConfig) else range(len(n))
        for k in items:
            child = n._get_node(k)
            if isinstance(child, DictConfig | ListConfig):
                unfreeze(child)
            else:
                child._set_flag("readonly", None)

    unfreeze(node)
    # a free-form map: `method.overrides.eap_ig.ig_steps=10` needs no leading `+`
    OmegaConf.set_struct(node.method.overrides, False)
    return node


def register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="sweep_schema", node=schema_node())


def from_container(data: dict) -> SweepConfig:
    """Build the frozen config from a plain resolved dict (the output of OmegaConf.to_container)."""
    top = {k: v for k, v in data.items() if k not in _SECTIONS}
    sections = {k: cls(**data[k]) for k, cls in _SECTIONS.items() if k in data}
    return SweepConfig(**top, **sections)


def from_dictconfig(cfg) -> SweepConfig:
    """THE conversion: DictConfig (Hydra's node, `hydra` key dropped) → validated frozen SweepConfig."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    data.pop("hydra", None)
    try:
        return from_container(data)
    except TypeError as e:  # an unknown field can only come from a YAML file bypassing the schema
        raise SweepConfigError(f"bad config: {e}") from None


def validate(cfg: SweepConfig) -> None:
    """Check names against the registries and build every per-method config, before any work starts."""
    from attrpatch.methods import MethodError, get_method
    from attrpatch.models import ModelLoadError, resolve_spec
    from attrpatch.tasks import CORRUPTIONS, TASKS, TaskConfig, _load_builtin_tasks

    import_plugins(cfg.plugins)
    for source in cfg.model_sources:
        try:
            spec = resolve_spec(os.path.expanduser(source) if source.startswith("~") else source)
        except ModelLoadError as e:
            raise SweepConfigError(f"models: {e}") from None
        if spec.embedded and not os.path.exists(os.path.join(spec.source, "config.json")):
            raise SweepConfigError(
                f"models: the embedded checkpoint {spec.name!r} is missing from {spec.source}: run "
                "`python -m attrpatch.train_ioi_tiny`, or sweep a local checkpoint with model.path=DIR"
            )
    _load_builtin_tasks()
    for name in cfg.tasks:
        if name not in TASKS:
            raise SweepConfigError(f"tasks: unknown task {name!r}: use some of {sorted(TASKS)}")
        if cfg.task.corruption is not None and cfg.task.corruption not in CORRUPTIONS[name]:
            raise SweepConfigError(
                f"task.corruption={cfg.task.corruption!r} is not a corruption of task {name!r}: "
                f"use one of {list(CORRUPTIONS[name])} or null for its default"
            )
        TaskConfig(name, cfg.task.n_prompts, cfg.task.seed, cfg.task.corruption, cfg.task.split)
    for name in cfg.method.overrides:  # presets may carry overrides for methods a given sweep leaves out
        try:
            get_method(name)
        except MethodError as e:
            raise SweepConfigError(f"method.overrides: {e}") from None
    for name in cfg.methods:
        try:
            get_method(name)
        except MethodError as e:
            raise SweepConfigError(f"methods: {e}") from None
    if cfg.method.kinds is not None:
        scored = {k for m in cfg.methods for k in (get_method(m).kinds or ())}
        unknown = [k for k in cfg.method.kinds if k not in scored]
        if unknown:
            raise SweepConfigError(f"method.kinds: {unknown} is scored by none of the methods {list(cfg.methods)} "
                                   f"(they score {sorted(scored)})")
    for name in cfg.methods:
        try:
            get_method(name)
            cfg.method.for_method(name)
        except MethodError as e:
            raise SweepConfigError(f"method options for {name!r}: {e}") from None


def import_plugins(modules: tuple[str, ...]) -> None:
    """Import the modules that register extra methods (in the driver and in every worker)."""
    for mod in modules:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise SweepConfigError(
                f"plugins: cannot import {mod!r} ({e}): give a module importable on every node (on PYTHONPATH)"
            ) from None
