"""The plan: rows predicted exactly for every method and granularity; the guard rails refuse with numbers.

    python -m pytest -q tests/test_sweep_plan.py
"""

from __future__ import annotations

import json

import pytest

from attrpatch import make_batch
from attrpatch.methods import get_method, method_config, run_method
from attrpatch.models import model_shape, resolve_spec
from attrpatch.results import EDGE_SCHEMA, NODE_SCHEMA
from attrpatch.scores import concat, edge_table, node_table
from sweeps.config import MethodOptions, ModelOptions, SweepConfig, TaskOptions, WandbOptions
from sweeps.driver import run_sweep
from sweeps.plan import PlanError, shard_work

CONFIGS = [
    ("attribution", {}), ("attribution", {"per_position": False}), ("attribution", {"per_prompt": False}),
    ("attribution", {"directions": ("denoise", "noise"), "kinds": ("head_pattern", "embed")}),
    ("attention_attribution", {}), ("attention_attribution", {"per_prompt": False}),
    ("dla", {}), ("dla", {"per_prompt": False, "kinds": ("head_out",)}),
    ("activation", {}), ("activation", {"per_position": False}), ("activation", {"per_prompt": False}),
    ("activation", {"granularities": ("block_every", "attn_head_pattern_dest_src_pos")}),
    ("edge_attribution", {}), ("edge_attribution", {"per_position": False}),
    ("edge_attribution", {"per_prompt": False}), ("eap_ig", {"ig_steps": 2, "per_position": False}),
    ("edge_activation", {"edge_subset": 0.1, "per_position": False}),
    ("edge_activation", {"edge_subset": 0.05, "directions": ("denoise", "noise")}),
    ("faithfulness", {"k_percent": (1, 10, 100)}), ("faithfulness", {"level": "node", "k_percent": (50, 100)}),
]


@pytest.mark.parametrize("method, fields", CONFIGS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CONFIGS)])
def test_rows_are_predicted_exactly(tiny, tiny_dir, tokenizer, method, fields):
    batch = make_batch("ioi", tokenizer, n_prompts=5, seed=9)  # mixed lengths: padding rows are dropped
    cfg = method_config(method, **fields)
    result = run_method(method, tiny, batch, cfg)
    actual = {}
    if result.nodes or get_method(method).produces in ("nodes", "both"):
        actual["nodes"] = concat([node_table(n, batch) for n in result.nodes], NODE_SCHEMA).num_rows
    if result.edges or get_method(method).produces in ("edges", "both"):
        actual["edges"] = concat([edge_table(e, batch) for e in result.edges], EDGE_SCHEMA).num_rows
    actual.update({name: t.num_rows for name, t in result.tables.items()})
    work = shard_work(batch, 0, len(batch), model_shape(resolve_spec(tiny_dir)), 4)
    cost = get_method(method).cost(work, cfg)
    assert cost.rows == actual
    assert cost.flops > 0 and cost.peak_bytes >= cost.fixed_bytes > 0


def _plan_only(**kw) -> SweepConfig:
    return SweepConfig(name="p", plan=True, wandb=WandbOptions(mode="disabled"),
                       task=TaskOptions(n_prompts=256, shard_size=32), **kw)


def test_plan_refuses_exact_edge_patching_of_every_gpt2_xl_edge(tmp_path):
    cfg = _plan_only(models=("gpt2-xl",), methods=("edge_activation",),
                     output=dataclass_output(tmp_path / "xl"))
    with pytest.raises(PlanError) as info:
        run_sweep(cfg)
    line = str(info.value)
    assert "edge_activation on gpt2-xl/ioi" in line and "rows" in line and "edge_subset" in line, line
    assert "\n" not in line and not (tmp_path / "xl").exists()


def test_plan_refuses_per_position_eap_on_gpt2_xl(tmp_path):
    cfg = _plan_only(models=("gpt2-xl",), methods=("edge_attribution",), output=dataclass_output(tmp_path / "x"))
    with pytest.raises(PlanError, match=r"edge_attribution on gpt2-xl/ioi: [\d,]+ rows.*per_position=false"):
        run_sweep(cfg)


def test_plan_is_written_and_computes_nothing(tmp_path):
    root = tmp_path / "plan"
    cfg = _plan_only(models=("gpt2-small",), methods=("attribution", "edge_attribution"),
                     method=MethodOptions(overrides={"edge_attribution": {"per_position": False}}),
                     output=dataclass_output(root))
    report = run_sweep(cfg)
    assert report.ran == 0 and report.plan is not None
    plan = json.loads((root / "plan.json").read_text())
    assert {"model", "task", "method", "shard", "rows", "seconds", "peak_bytes"} <= set(plan["cells"][0])
    assert len(plan["cells"]) == 8 * 3  # 8 shards × (prompts + 2 methods)
    assert plan["totals"]["rows"]["edges"] == 32491 * 256  # every gpt2-small edge, per prompt
    assert plan["totals"]["seconds"] > 0 and plan["totals"]["peak_bytes"] > 124e6 * 4
    assert sorted(p.name for p in root.iterdir()) == ["plan.json"]  # nothing else written


def test_the_worker_memory_comes_from_the_plan(tmp_path):
    from sweeps.driver import worker_memory
    from sweeps.grid import model_entries
    from sweeps.plan import make_plan, task_batches

    cfg = _plan_only(models=("gpt2-small",), methods=("edge_attribution",))
    entries = model_entries(cfg)
    batches = task_batches(cfg)
    from sweeps.grid import expand

    cells = expand(cfg, entries, {t: len(b) for t, b in batches.items()})
    plan = make_plan(cfg, entries, cells, batches, rates={e.name: 1e10 for e in entries})
    peak = max(c.peak_bytes for c in plan.cells)
    assert worker_memory(entries[0], cfg, plan) == pytest.approx(1.2 * peak)
    # a peak beyond the cluster's memory: chunks shrink at run time, so the worker reserves what there is
    assert worker_memory(entries[0], cfg, plan, capacity=peak) == peak
    assert worker_memory(entries[0], cfg, plan, capacity=10 * peak) == pytest.approx(1.2 * peak)
    fixed = SweepConfig(models=("gpt2-small",), model=ModelOptions(memory_gb=3))
    assert worker_memory(entries[0], fixed, plan) == 3 * 2**30


def dataclass_output(root):
    from sweeps.config import OutputOptions

    return OutputOptions(root=str(root), progress=False)
