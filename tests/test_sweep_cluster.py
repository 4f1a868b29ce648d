"""Joining an existing multi-node Ray cluster: ``cluster=join cluster.address=HOST:PORT`` spreads the cells.

    python -m pytest -q tests/test_sweep_cluster.py

A helper process starts a two-node cluster on this machine with ``ray.cluster_utils.Cluster`` (a head and
one more node, 1 CPU and 1 logical GPU each), as ``ray start --head`` and ``ray start --address=…`` would on
two machines. The sweep runs as the real command in a second process and joins it, so each node hosts one
worker and both serve cells. The cluster lives outside this process: a Ray node started in-process installs
its own SIGTERM handler, and this pytest process may hold test_sweep_ray.py's session Ray. A private
``RAY_TMPDIR`` keeps the cluster's sockets and address file away from any other ``ray.init()`` on the machine.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
from test_sweep_methods import ATP, EXACT
from test_sweep_ray import _counts, _duplicates, _expected

from attrpatch.testing import SHAPES, save_random_gpt2
from sweeps.config import SweepConfig, TaskOptions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")

# Runs in the helper process: two nodes of 1 CPU + 1 logical GPU; prints the address and node ids, then
# holds the cluster until its stdin closes and shuts it down (Cluster.shutdown checks its processes ended).
CLUSTER = """
import json, sys
from ray.cluster_utils import Cluster
node = dict(num_cpus=1, num_gpus=1, object_store_memory=80 * 2**20, include_dashboard=False)
cluster = Cluster(initialize_head=True, head_node_args=node)
cluster.add_node(**node)
cluster.wait_for_nodes()
print(json.dumps({"address": cluster.address, "nodes": [n.node_id for n in cluster.list_all_nodes()]}), flush=True)
sys.stdin.read()
cluster.shutdown()
"""


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc): the cluster's GCS, raylets and their Ray workers."""
    children: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = open(stat).read()
        except OSError:  # exited meanwhile
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(text.split(" ", 1)[0]))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def two_node_cluster():
    """A running two-node Ray cluster in a helper process: yields its address, node ids and environment."""
    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    env = {**os.environ, "RAY_TMPDIR": tmp,  # workers import the test plugin module, so tests/ goes on their path
           "PYTHONPATH": os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p)}
    helper = subprocess.Popen([sys.executable, "-c", CLUSTER], cwd=REPO, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        line = helper.stdout.readline()
        while line and not line.startswith("{"):  # anything Ray prints before the cluster is up
            line = helper.stdout.readline()
        assert line, f"the cluster helper exited with {helper.wait(timeout=30)} before starting"
        yield {**json.loads(line), "env": env}
    finally:
        below = _descendants(helper.pid)
        helper.stdin.close()  # the helper calls cluster.shutdown()
        try:
            rc = helper.wait(timeout=60)
        except subprocess.TimeoutExpired:
            helper.kill()  # its nodes fate-share with it
            rc = helper.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in below) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = sorted(p for p in below if _alive(p))
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"Ray processes left behind: {left}"
        assert rc == 0, f"cluster shutdown failed (exit code {rc})"


def test_sweep_joins_a_two_node_cluster_and_runs_on_both_nodes(two_node_cluster, tmp_path):
    ckpt = save_random_gpt2(tmp_path / "m", seed=1, **SHAPES["tiny-a"])
    root = tmp_path / "r"
    # cells long enough that the second worker is up before the first has drained the queue
    slow = ", ".join(f"{m}: {{sleep_s: 0.5}}" for m in (ATP, EXACT))
    address = two_node_cluster["address"]
    args = [sys.executable, "-m", "sweeps.run", f"model.path={ckpt}", f"methods=[{ATP},{EXACT}]",
            "plugins=[test_sweep_methods]", "task.n_prompts=16", "task.shard_size=2", "task.seed=3",
            f"method.overrides={{{slow}}}", "model.num_cpus=1", "model.num_gpus=1",  # a whole node per worker
            "cluster=join", f"cluster.address={address}", "wandb=disabled",
            f"output.root={root}", "output.progress=false", f"hydra.run.dir={tmp_path}/h"]
    run = subprocess.run(args, cwd=REPO, env=two_node_cluster["env"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr

    # the dataset: exactly the rows the methods give in-process, each once
    cfg = SweepConfig(models=(ckpt,), methods=(ATP, EXACT), plugins=("test_sweep_methods",),
                      task=TaskOptions(n_prompts=16, shard_size=2, seed=3))
    assert _counts(root) == {k: v for k, v in _expected(cfg).items() if v}
    assert _duplicates(root) == 0
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["cells_run"] == 8 * 3
    assert manifest["config"]["cluster"]["address"] == address

    # every cell ran on the joined cluster (not a local Ray), and both of its nodes served cells
    records = [json.loads(open(p).read()) for p in glob.glob(f"{root}/_done/**/*.json", recursive=True)]
    assert len(records) == 8 * 3
    per_node = {n: sum(r["node"] == n for r in records) for n in {r["node"] for r in records}}
    assert set(per_node) == set(two_node_cluster["nodes"]), per_node
