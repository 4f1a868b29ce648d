"""The methods' shared core: directions, the device-aware memory budget, out-of-memory retries, views, progress.

The out-of-memory path is exercised on the CPU by injecting ``torch.OutOfMemoryError`` whenever a pass is larger
than a limit: the method must halve its chunks until they fit, log that once, and give the same scores.
"""

from __future__ import annotations

import logging

import pytest
import torch

import attrpatch.methods.activation as activation_mod
import attrpatch.methods.core as core
from attrpatch import make_batch
from attrpatch.engine import weights
from attrpatch.methods import MethodError, method_config, run_method
from attrpatch.methods.core import (
    budget_scale,
    device_share,
    edge_scores,
    memory_budget,
    reporting,
    retry_on_oom,
    rows_per_pass,
    run_and_patch,
    views,
)


@pytest.fixture(scope="module")
def batch(tokenizer):
    return make_batch("ioi", tokenizer, n_prompts=6, seed=7)


def test_directions_map_to_run_and_patch(batch):
    run, patch = run_and_patch(batch, "denoise")
    assert run is batch.corrupt_tokens and patch is batch.clean_tokens
    run, patch = run_and_patch(batch, "noise")
    assert run is batch.clean_tokens and patch is batch.corrupt_tokens
    with pytest.raises(MethodError, match="unknown direction 'sideways'"):
        run_and_patch(batch, "sideways")


def test_budget_follows_the_device_share_and_scale(monkeypatch):
    monkeypatch.setattr(core, "free_memory", lambda device: 1000 * 2**20)
    cpu = torch.device("cpu")
    full = memory_budget(cpu)
    assert full == int(1000 * 2**20 * (1 - core.SAFETY_MARGIN))
    with device_share(0.25):
        assert memory_budget(cpu) == pytest.approx(full / 4, rel=1e-6)
        with budget_scale(0.5):
            assert memory_budget(cpu) == pytest.approx(full / 8, rel=1e-6)
    assert memory_budget(cpu) == full  # restored on exit
    assert rows_per_pass(full // 10, 256, cpu) == 10
    assert rows_per_pass(1, 7, cpu) == 7 and rows_per_pass(10 * full, 7, cpu) == 1
    with budget_scale(0.5):
        assert rows_per_pass(1, 8, cpu) == 4  # max_rows halves with the budget
    with pytest.raises(ValueError):
        with device_share(0):
            pass


def test_free_memory_reads_the_machine():
    assert core.free_memory(torch.device("cpu")) > 2**20


def _inject_oom(monkeypatch, module, name: str, rows_of, limit: int) -> list[int]:
    """Make ``module.name`` raise an out-of-memory error for passes of more than ``limit`` rows."""
    real = getattr(module, name)
    seen: list[int] = []

    def guarded(*args, **kwargs):
        rows = rows_of(*args, **kwargs)
        seen.append(rows)
        if rows > limit:
            raise torch.OutOfMemoryError(f"injected: {rows} rows > {limit}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, guarded)
    return seen


def test_out_of_memory_halves_the_chunks_and_gives_the_same_scores(tiny, batch, monkeypatch, caplog):
    w = weights(tiny)
    want = edge_scores(w, batch, directions=("noise",))["noise"]
    seen = _inject_oom(monkeypatch, core, "contract_edges", lambda graph, delta, *a: delta.shape[0], limit=1)
    with caplog.at_level(logging.WARNING):
        got = retry_on_oom(lambda: edge_scores(w, batch, directions=("noise",))["noise"], "cell test/eap")
    torch.testing.assert_close(got, want)
    assert max(seen) > 1 and seen[-1] == 1  # passes shrank until they fitted
    assert caplog.text.count("out of memory") == 1  # logged once per call


def test_out_of_memory_in_activation_patching(tiny, batch, monkeypatch):
    cfg = method_config("activation", kinds=("head_out",), max_rows=64)
    want = run_method("activation", tiny, batch, cfg).nodes[0].scores
    seen = _inject_oom(monkeypatch, activation_mod, "patched_metric",
                       lambda w, resid, kv, layer, p0, prompt, *a: len(prompt), limit=5)
    got = retry_on_oom(lambda: run_method("activation", tiny, batch, cfg), "cell test/activation").nodes[0].scores
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert max(seen) > 5 and max(seen[-20:]) <= 5


def test_out_of_memory_that_no_chunk_fits_is_raised(monkeypatch):
    def always():
        raise torch.OutOfMemoryError("injected")

    with pytest.raises(torch.OutOfMemoryError):
        retry_on_oom(always, "cell test/none", max_halvings=3)


def test_views_sum_positions_and_average_prompts():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    s, axes = views(x, ("prompt", "layer", "pos"), per_prompt=False, per_position=False)
    assert axes == ("layer",) and torch.equal(s, x.sum(2).mean(0))
    s, axes = views(x, ("prompt", "layer", "pos"), per_prompt=True, per_position=True)
    assert axes == ("prompt", "layer", "pos") and torch.equal(s, x)


def test_progress_is_reported_inside_a_cell(tiny, batch):
    fractions: list[float] = []
    with reporting(fractions.append):
        run_method("activation", tiny, batch, method_config("activation", kinds=("resid_pre",), max_rows=8))
    assert fractions and fractions[-1] == pytest.approx(1.0)
    assert fractions == sorted(fractions) and len(fractions) > 2  # several chunks, monotone
