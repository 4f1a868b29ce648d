"""Sweep configuration, grid, writer and worker sizing: no Ray, no Hydra process.

    python -m pytest -q tests/test_sweep_config.py
"""

from __future__ import annotations

import pytest

from attrpatch.testing import SHAPES, save_random_gpt2
from sweeps.config import (
    ClusterOptions,
    MethodOptions,
    ModelOptions,
    OutputOptions,
    SweepConfig,
    SweepConfigError,
    TaskOptions,
    WandbOptions,
    validate,
)
from sweeps.driver import SweepError, worker_plan
from sweeps.grid import Cell, expand, model_entries, partition_name
from sweeps.run import check, one_line

# ---------------------------------------------------------------- one pytest.raises per rule


@pytest.mark.parametrize("make, match", [
    (lambda: ModelOptions(device="tpu"), "model.device"),
    (lambda: ModelOptions(workers=0), "model.workers"),
    (lambda: ModelOptions(num_gpus=-1), "model.num_gpus"),
    (lambda: ModelOptions(num_cpus=0.5), "model.num_cpus"),
    (lambda: TaskOptions(n_prompts=0), "task.n_prompts"),
    (lambda: TaskOptions(shard_size=0), "task.shard_size"),
    (lambda: TaskOptions(split="dev"), "task.split"),
    (lambda: ClusterOptions(max_restarts=-1), "cluster.max_restarts"),
    (lambda: ClusterOptions(in_flight=0), "cluster.in_flight"),
    (lambda: ClusterOptions(num_cpus=0), "cluster.num_cpus"),
    (lambda: ClusterOptions(address="auto", num_cpus=2), "existing cluster"),
    (lambda: ClusterOptions(address="nowhere"), "cluster.address"),
    (lambda: WandbOptions(mode="shared"), "wandb.mode"),
    (lambda: OutputOptions(root=""), "output.root"),
    (lambda: SweepConfig(name="a/b"), "name"),
    (lambda: SweepConfig(methods=()), "methods is empty"),
    (lambda: SweepConfig(tasks=("ioi", "ioi")), "more than once"),
])
def test_bad_values_are_rejected(make, match):
    with pytest.raises(SweepConfigError, match=match):
        make()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_random_gpt2(tmp_path_factory.mktemp("sweep-cfg"), **SHAPES["tiny-a"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(methods=("attributoin",)), "unknown method 'attributoin'"),
    (dict(tasks=("ioj",)), "unknown task 'ioj'"),
    (dict(models=("gpt2-tiny",), model=ModelOptions()), "unknown model 'gpt2-tiny'"),
    (dict(models=("/nonexistent/ckpt",), model=ModelOptions()), "does not exist"),
    (dict(task=TaskOptions(corruption="swap")), "not a corruption of task 'ioi'"),
    (dict(method=MethodOptions(overrides={"dlaa": {"ig_steps": 3}})), "unknown method 'dlaa'"),
    (dict(methods=("activation",), method=MethodOptions(overrides={"activation": {"ig_step": 3}})),
     r"takes no option \['ig_step'\]"),
    (dict(methods=("eap_ig",), method=MethodOptions(overrides={"eap_ig": {"ig_steps": 0}})),
     "ig_steps must be at least 1"),
    (dict(methods=("activation",), method=MethodOptions(overrides={"activation": {"granularities": ["resid"]}})),
     "unknown activation-patching granularities"),
    (dict(methods=("faithfulness",), method=MethodOptions(overrides={"faithfulness": {"level": "neuron"}})),
     "level"),
    (dict(method=MethodOptions(kinds=("nonsense",))), r"method.kinds: \['nonsense'\] is scored by none"),
    (dict(method=MethodOptions(directions=("sideways",))), "directions"),
    (dict(plugins=("no_such_module_xyz",)), "cannot import"),
])
def test_registry_checks(kwargs, match, ckpt):
    cfg = SweepConfig(**{"model": ModelOptions(path=ckpt), **kwargs})
    validate(SweepConfig(model=ModelOptions(path=ckpt)))  # the same config without the fault is fine
    with pytest.raises(SweepConfigError, match=match):
        validate(cfg)


def test_per_method_overrides_reach_method_config():
    opts = MethodOptions(directions=["denoise", "noise"], kinds=["head_out", "resid_pre"],
                         overrides={"eap_ig": {"ig_steps": 12}, "dla": {"per_prompt": False}})
    assert opts.directions == ("denoise", "noise")  # lists from OmegaConf become tuples
    assert opts.for_method("eap_ig").options.ig_steps == 12
    assert opts.for_method("eap_ig").kinds is None  # edge methods read no kinds
    assert opts.for_method("attribution").directions == ("denoise", "noise")
    assert opts.for_method("attribution").kinds == ("head_out", "resid_pre")
    assert opts.for_method("dla").kinds == ("head_out",) and not opts.for_method("dla").per_prompt


# ---------------------------------------------------------------- Hydra composition (no process)


def test_cli_overrides_compose_to_the_frozen_config(ckpt):
    cfg = check([f"model.path={ckpt}", "methods=[activation,edge_attribution]", "task=pronoun",
                 "task.n_prompts=10", "+method.overrides.activation.max_rows=64", "wandb=disabled"])
    assert cfg.model_sources == (ckpt,)
    assert cfg.tasks == ("pronoun",) and cfg.task.n_prompts == 10
    assert cfg.method.for_method("activation").max_rows == 64
    assert cfg.wandb.mode == "disabled"
    assert cfg.output.root == "results/default"  # ${name} resolved


@pytest.mark.parametrize("overrides, match", [
    (["modles=[ioi-tiny]"], "Could not override 'modles': Key 'modles' not in 'SweepConfig' (did you mean models?)"),
    (["task.n_prompt=3"], "did you mean task.n_prompts"),
    (["task.n_prompts=many"], "task.n_prompts"),
    (["methods=[attributoin]"], "unknown method 'attributoin'"),
    (["task=nonexistent"], "task/nonexistent"),
])
def test_config_errors_are_one_line(overrides, match, ckpt):
    with pytest.raises(Exception) as info:
        check([f"model.path={ckpt}", *overrides])
    line = one_line(info.value)
    assert match in line
    assert "\n" not in line and "Traceback" not in line


# ---------------------------------------------------------------- grid and names


def test_partition_names_are_safe_and_distinct(tmp_path):
    assert partition_name("gpt2-small") == "gpt2-small"
    a, b = partition_name("/x/run1/final"), partition_name("/x/run2/final")
    assert a != b and a.startswith("final-") and "/" not in a and "=" not in a
    assert "/" not in partition_name("openai-community/gpt2")
    ckpt = save_random_gpt2(tmp_path / "my ckpt=1", **SHAPES["tiny-a"])
    (entry,) = model_entries(SweepConfig(models=(ckpt,)))
    assert entry.source == ckpt and "=" not in entry.name and " " not in entry.name


def test_grid_covers_every_cell_once(ckpt):
    cfg = SweepConfig(models=(ckpt, "gpt2-small"), tasks=("ioi", "pronoun"), methods=("attribution", "activation"),
                      task=TaskOptions(n_prompts=10, shard_size=4))
    cells = expand(cfg)
    assert len(cells) == len(set(cells)) == 2 * 2 * 3 * 3  # models × tasks × shards × (prompts + 2 methods)
    assert {c.shard for c in cells} == {0, 1, 2}
    c = Cell("m", "ioi", "attribution", 3)
    assert c.table_dir("nodes") + "/" + c.part == "nodes/model=m/task=ioi/method=attribution/part-00003.parquet"
    assert Cell("m", "ioi", None, 3).table_dir("prompts") == "prompts/model=m/task=ioi"


# ---------------------------------------------------------------- worker sizing


def _entry(tmp_path, name="ioi-tiny"):
    from attrpatch.models import REGISTRY
    from sweeps.grid import ModelEntry

    return ModelEntry(name, name, REGISTRY[name])


def test_worker_plan_uses_fractional_gpus_only_when_the_cluster_has_gpus(tmp_path):
    entry = _entry(tmp_path, "gpt2-small")  # spec: 0.25 GPU, 1 CPU, 2 GB
    opts, n = worker_plan(entry, SweepConfig(), {"CPU": 8, "GPU": 1, "memory": 64 * 2**30}, n_cells=100)
    assert opts["num_gpus"] == 0.25 and opts["num_cpus"] == 1 and opts["memory"] == 2 * 2**30
    assert n == 4  # four quarter-GPU workers fill one GPU
    opts, n = worker_plan(entry, SweepConfig(), {"CPU": 2, "memory": 64 * 2**30}, n_cells=100)
    assert opts["num_gpus"] == 0 and n == 2  # no GPU: CPU-bound, device forced to cpu in the worker
    _, n = worker_plan(entry, SweepConfig(), {"CPU": 2, "memory": 64 * 2**30}, n_cells=1)
    assert n == 1  # never more workers than cells
    cfg = SweepConfig(model=ModelOptions(workers=3, num_gpus=0.5))
    opts, n = worker_plan(entry, cfg, {"CPU": 8, "GPU": 2, "memory": 64 * 2**30}, n_cells=100)
    assert n == 3 and opts["num_gpus"] == 0.5


def test_worker_plan_refuses_what_the_cluster_cannot_hold(tmp_path):
    with pytest.raises(SweepError, match="needs 20.0 GiB memory per worker"):
        worker_plan(_entry(tmp_path, "gpt2-xl"), SweepConfig(), {"CPU": 8, "GPU": 1, "memory": 8 * 2**30}, 10)
