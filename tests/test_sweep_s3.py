"""A results root on an object store, end to end, against a real S3-protocol server on loopback (moto).

    python -m pytest -q tests/test_sweep_s3.py

The real command writes ``s3://bucket/prefix/<name>`` (pyarrow's S3 file system, endpoint from
``AWS_ENDPOINT_URL``), a relaunch resumes there (nothing recomputed; a deleted part recomputed), and
``open_results`` / ``analysis.compare`` / ``sweeps.verify`` / the MIB export read it back.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
from test_sweep_methods import ATP, EXACT

from analysis.compare import compare
from analysis.query import open_results
from attrpatch.results import ResultsRoot
from attrpatch.testing import SHAPES, save_random_gpt2
from sweeps.verify import main as verify_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")


@pytest.fixture(scope="module")
def s3(monkeypatch_module):
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    for k, v in env.items():
        monkeypatch_module.setenv(k, v)
    import boto3

    boto3.client("s3").create_bucket(Bucket="bucket")
    yield env
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _sweep(args: list[str], env: dict, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweeps.run", *args, f"hydra.run.dir={tmp_path}/h",
                           "output.progress=false", "cluster.num_cpus=2"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **env,
                                            "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])})


def test_sweep_writes_resumes_and_reads_back_an_s3_root(s3, tmp_path):
    ckpt = save_random_gpt2(tmp_path / "m", seed=1, **SHAPES["tiny-a"])
    uri = "s3://bucket/prefix/s3test"
    args = [f"model.path={ckpt}", f"methods=[{ATP},{EXACT},edge_attribution,edge_activation]",
            "plugins=[test_sweep_methods]", "task.n_prompts=8", "task.shard_size=4",
            "+method.overrides.edge_activation.edge_subset=0.5", "wandb=offline", f"output.root={uri}"]
    first = _sweep(args, s3, tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    root = ResultsRoot(uri)
    records = root.records()
    assert len(records) == 2 * 5  # 2 shards × (prompts + 4 methods)
    assert root.exists("manifest.json") and root.read_json("manifest.json")["status"] == "complete"
    assert any(p.startswith("plots/") and p.endswith(".png") for p in root.list_files("plots"))
    assert not root.exists("_lock.json")

    # read back: the DuckDB views over the S3 root, the comparison, the verification
    con = open_results(uri)
    n_nodes = con.execute("SELECT count(*) FROM nodes").fetchone()[0]
    assert n_nodes > 0 and con.execute("SELECT count(DISTINCT method) FROM edges").fetchone()[0] == 2
    df, _ = compare(uri)
    assert set(df["method"]) == {ATP, "edge_attribution"} and (df["n_scores"] > 0).all()
    assert verify_main([uri]) == 0

    # resume there: nothing to do; then a lost part is recomputed (its size no longer matches the record)
    again = _sweep(args, s3, tmp_path)
    assert again.returncode == 0 and "0 to run" in again.stdout + again.stderr, again.stdout + again.stderr
    part = next(p for p in root.list_files("nodes") if f"method={ATP}" in p)
    root.delete(part)
    third = _sweep(args, s3, tmp_path)
    out = third.stdout + third.stderr
    assert third.returncode == 0 and "recomputing cell" in out and "1 to run" in out, out
    assert open_results(uri).execute("SELECT count(*) FROM nodes").fetchone()[0] == n_nodes
    assert verify_main([uri]) == 0


def test_mib_export_reads_an_s3_root(s3, tmp_path):
    from analysis.mib import export

    ckpt = save_random_gpt2(tmp_path / "m", seed=1, **SHAPES["tiny-a"])
    uri = "s3://bucket/prefix/mib"
    run = _sweep([f"model.path={ckpt}", "methods=[edge_attribution]", "task.n_prompts=4", "task.shard_size=4",
                  "wandb=disabled", f"output.root={uri}"],
                 s3, tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    model = next(iter(ResultsRoot(uri).read_json("manifest.json")["models"]))
    out = export(uri, model, "ioi", "edge_attribution", tmp_path / "g.json")
    assert out.stat().st_size > 0
