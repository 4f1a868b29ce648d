"""The sweep worker without Ray: cells, their records, progress inside a cell, the driver watchdog.

    python -m pytest -q tests/test_sweep_worker.py
"""

from __future__ import annotations

import os
import socket

import pytest

from attrpatch.results import ResultsRoot
from sweeps.config import MethodOptions, ModelOptions, OutputOptions, SweepConfig, TaskOptions, WandbOptions
from sweeps.grid import Cell, model_entries
from sweeps.worker import ShardWorker, Watchdog


class Recorded:
    """Stands in for the driver's progress actor: ``update.remote(label, fraction)``."""

    def __init__(self):
        self.calls: list[tuple[str, float]] = []
        outer = self

        class _Update:
            @staticmethod
            def remote(label, fraction):
                outer.calls.append((label, fraction))

        self.update = _Update()


@pytest.fixture(scope="module")
def worker(tiny_dir, tmp_path_factory):
    cfg = SweepConfig(name="w", models=(tiny_dir,), methods=("activation",),
                      task=TaskOptions(n_prompts=6, shard_size=6, seed=2),
                      method=MethodOptions(kinds=("resid_pre", "head_out"), max_rows=4),
                      wandb=WandbOptions(mode="disabled"),
                      output=OutputOptions(root=str(tmp_path_factory.mktemp("w") / "r"), progress=False),
                      model=ModelOptions(device="cpu"))
    (entry,) = model_entries(cfg)
    return ShardWorker(entry, cfg, ResultsRoot(cfg.output.root))


def test_progress_moves_inside_a_long_cell(worker, monkeypatch):
    import sweeps.worker as w

    ticks = iter(range(0, 10**6, 1))  # every report is more than 0.5 s after the previous one
    monkeypatch.setattr(w.time, "monotonic", lambda: float(next(ticks)))
    worker.progress = Recorded()
    cell = Cell(worker.entry.name, "ioi", "activation", 0)
    record = worker.run(cell, fingerprint="f", options={"x": 1})
    fractions = [f for label, f in worker.progress.calls if label == cell.label]
    assert len(fractions) >= 5 and fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert 0 < fractions[0] < 0.5  # the first report comes early in the cell, not at its end
    assert record["fingerprint"] == "f" and record["options"] == {"x": 1}
    assert record["parts"]["nodes"]["rows"] == record["rows"]["nodes"] > 0


def test_watchdog_sees_a_dead_driver(tmp_path):
    root = ResultsRoot(str(tmp_path))
    alive = Watchdog.__new__(Watchdog)  # the check alone, without the exiting thread
    alive.driver, alive.root = {"pid": os.getpid(), "host": socket.gethostname(), "launch": "x"}, root
    assert not alive.driver_gone()
    dead = Watchdog.__new__(Watchdog)
    dead.driver, dead.root = {"pid": 2**22 + 12345, "host": socket.gethostname(), "launch": "x"}, root
    assert dead.driver_gone()
    remote = Watchdog.__new__(Watchdog)  # another host: the lock's heartbeat decides
    remote.driver, remote.root = {"pid": 1, "host": "elsewhere", "launch": "x"}, root
    assert remote.driver_gone()  # no lock at all
    import time

    root.write_json("_lock.json", {"launch": "x", "heartbeat": time.time()})
    assert not remote.driver_gone()
    root.write_json("_lock.json", {"launch": "y", "heartbeat": time.time()})
    assert remote.driver_gone()  # another launch took the root
