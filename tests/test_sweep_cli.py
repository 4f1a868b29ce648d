"""The command line in a real subprocess: Ctrl-C mid-sweep leaves no partial file and the relaunch resumes.

    python -m pytest -q tests/test_sweep_cli.py

(Each launch starts its own local Ray, as a user's would; this module keeps to two launches.)
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
from test_sweep_methods import ATP, EXACT
from test_sweep_ray import _counts, _duplicates, _expected

from attrpatch.testing import SHAPES, save_random_gpt2
from sweeps.config import SweepConfig, TaskOptions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")


def test_ctrl_c_leaves_no_partial_file_and_the_relaunch_resumes(tmp_path):
    ckpt = save_random_gpt2(tmp_path / "m", seed=1, **SHAPES["tiny-a"])
    root = tmp_path / "r"
    # cells long enough to interrupt mid-way (Hydra's dict syntax: {name: {sleep_s: 1.0}, …})
    slow = ", ".join(f"{m}: {{sleep_s: 1.0}}" for m in (ATP, EXACT))
    args = [sys.executable, "-m", "sweeps.run", f"model.path={ckpt}", f"methods=[{ATP},{EXACT}]",
            "plugins=[test_sweep_methods]", "task.n_prompts=24", "task.shard_size=4", "task.seed=3",
            f"method.overrides={{{slow}}}", "wandb=disabled",
            f"output.root={root}", "output.progress=false", f"hydra.run.dir={tmp_path}/h", "cluster.num_cpus=2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    # a shell starts background jobs with SIGINT ignored, and Python then keeps ignoring it: give the sweep
    # the default disposition, as a terminal's foreground command has, whatever launched pytest
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not glob.glob(f"{root}/nodes/**/*.parquet", recursive=True):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "run the same command again to resume" in out

    assert not glob.glob(f"{root}/**/.*.tmp", recursive=True)  # no temporary file left behind
    parts = glob.glob(f"{root}/**/*.parquet", recursive=True)
    for p in parts:
        pq.read_table(p)  # every part that exists is a complete Parquet file
    done = glob.glob(f"{root}/_done/**/*.json", recursive=True)
    assert 0 < len(done) < 18, "the interrupt should land mid-sweep"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["cells_run"] == len(done)

    rerun = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{18 - len(done)} to run" in rerun.stdout + rerun.stderr  # only the missing cells ran
    cfg = SweepConfig(models=(ckpt,), methods=(ATP, EXACT), plugins=("test_sweep_methods",),
                      task=TaskOptions(n_prompts=24, shard_size=4, seed=3))
    assert _counts(root) == {k: v for k, v in _expected(cfg).items() if v}
    assert _duplicates(root) == 0
    assert json.loads((root / "manifest.json").read_text())["status"] == "complete"
