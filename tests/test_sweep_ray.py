"""Sweeps on a real local Ray (one Ray start for the whole module): results, resume, faults, Hydra, W&B.

    python -m pytest -q tests/test_sweep_ray.py

The Ray session declares one logical GPU (``ray.init(num_gpus=1)``): workers are placed with fractional
GPUs exactly as on a GPU cluster, and each one must notice that CUDA is absent and run on the CPU.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import threading
import time

import duckdb
import numpy as np
import pytest
from test_sweep_methods import ATP, EXACT

from analysis.wandb_log import read_offline_run
from attrpatch import load_model, make_batch
from attrpatch.methods import run_method
from attrpatch.metrics import final_logit_diff
from attrpatch.results import EDGE_SCHEMA, NODE_SCHEMA
from attrpatch.scores import concat, edge_table, node_table
from attrpatch.testing import SHAPES, save_random_gpt2
from sweeps.config import (
    ClusterOptions,
    MethodOptions,
    OutputOptions,
    SweepConfig,
    TaskOptions,
    WandbOptions,
)
from sweeps.driver import run_sweep
from sweeps.grid import model_entries
from sweeps.worker import shard_of

PLUGIN = "test_sweep_methods"  # registers the two test methods in the workers too


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("sweep-models")
    return [save_random_gpt2(base / name, seed=1, **SHAPES[name]) for name in sorted(SHAPES)]


def _cfg(root, models, methods, n_prompts=8, shard_size=4, sleep_s=0.0, wandb="disabled", overrides=None, plots=False,
         **method_kw) -> SweepConfig:
    slow = {m: {"sleep_s": sleep_s} for m in (ATP, EXACT) if m in methods and sleep_s}
    return SweepConfig(
        name="t", models=tuple(models), tasks=("ioi",), methods=tuple(methods), plugins=(PLUGIN,),
        task=TaskOptions(n_prompts=n_prompts, shard_size=shard_size, seed=3),
        method=MethodOptions(overrides={**slow, **(overrides or {})}, **method_kw),
        cluster=ClusterOptions(max_restarts=3, max_task_retries=3),
        wandb=WandbOptions(mode=wandb), output=OutputOptions(root=str(root), progress=False, plots=plots),
    )


def _expected(cfg: SweepConfig, methods=None) -> dict[tuple, int]:
    """Rows per (table, model, method), computed in this process shard by shard (the oracle)."""
    out = {}
    for entry in model_entries(cfg):
        model = load_model(entry.source)
        batch = make_batch("ioi", model.tokenizer, cfg.task.n_prompts, cfg.task.seed)
        shards = [shard_of(batch, s, cfg.task.shard_size) for s in range(-(-len(batch) // cfg.task.shard_size))]
        out[("prompts", entry.name, None)] = len(batch)
        for m in methods or cfg.methods:
            res = [run_method(m, model, sh, cfg.method.for_method(m)) for sh in shards]
            out[("nodes", entry.name, m)] = sum(len(concat([node_table(n, sh) for n in r.nodes], NODE_SCHEMA))
                                                for r, sh in zip(res, shards, strict=True))
            out[("edges", entry.name, m)] = sum(len(concat([edge_table(e, sh) for e in r.edges], EDGE_SCHEMA))
                                                for r, sh in zip(res, shards, strict=True))
    return out


def _counts(root) -> dict[tuple, int]:
    """Rows per (table, model, method) as DuckDB reads the Hive-partitioned dataset."""
    con = duckdb.connect()
    out = {}
    for table in ("nodes", "edges"):
        if glob.glob(f"{root}/{table}/**/*.parquet", recursive=True):
            for model, method, n in con.sql(
                    f"select model, method, count(*) from read_parquet('{root}/{table}/**/*.parquet', "
                    "hive_partitioning=true) group by all").fetchall():
                out[(table, model, method)] = n
    for model, n in con.sql(f"select model, count(*) from read_parquet('{root}/prompts/**/*.parquet', "
                            "hive_partitioning=true) group by all").fetchall():
        out[("prompts", model, None)] = n
    return out


def _duplicates(root) -> int:
    con = duckdb.connect()
    nodes = con.sql(f"select count(*) - count(distinct (model, task, method, direction, component, layer, head, pos, "
                    f"src_pos, prompt)) from read_parquet('{root}/nodes/**/*.parquet', hive_partitioning=true)")
    prompts = con.sql(f"select count(*) - count(distinct (model, task, prompt)) from "
                      f"read_parquet('{root}/prompts/**/*.parquet', hive_partitioning=true)")
    return nodes.fetchall()[0][0] + prompts.fetchall()[0][0]


def test_two_models_all_families_end_to_end(ray_session, ckpts, tmp_path):
    """Two models × node and edge methods from one call: rows, values, baselines, placement, plots, W&B."""
    root = tmp_path / "r"
    methods = (ATP, EXACT, "attribution", "activation", "edge_attribution", "edge_activation")
    cfg = _cfg(root, ckpts, methods, wandb="offline", plots=True, kinds=("resid_pre", "attn_out", "head_out"),
               per_position=True, overrides={"edge_attribution": {"per_position": False},
                                              "edge_activation": {"per_position": False}})
    report = run_sweep(cfg)
    names = [e.name for e in model_entries(cfg)]

    # every cell ran once; the dataset holds exactly the rows the methods give in-process, no duplicates
    assert report.ran == len(report.records) == 2 * 2 * (1 + len(methods)) and report.skipped == 0
    # (the oracle recomputes the cheap methods; each exact method scores the same coordinates as its
    # approximation here, which the correlation join checks below)
    expected = {k: v for k, v in _expected(cfg, (ATP, EXACT, "attribution", "edge_attribution")).items() if v}
    for name in names:
        expected[("nodes", name, "activation")] = expected[("nodes", name, "attribution")]
        expected[("edges", name, "edge_activation")] = expected[("edges", name, "edge_attribution")]
    assert _counts(root) == expected
    assert _duplicates(root) == 0

    # written scores are the method's scores (AtP test method, one model, both shards)
    model = load_model(ckpts[0])
    batch = make_batch("ioi", model.tokenizer, 8, 3)
    shards = [shard_of(batch, s, 4) for s in (0, 1)]
    ref = concat([node_table(run_method(ATP, model, sh, cfg.method.for_method(ATP)).nodes[0], sh) for sh in shards],
                 NODE_SCHEMA).sort_by([("prompt", "ascending"), ("layer", "ascending"), ("pos", "ascending")])
    got = duckdb.sql(f"select * exclude (model, task, method) from read_parquet('{root}/nodes/model={names[0]}/"
                     f"task=ioi/method={ATP}/*.parquet', hive_partitioning=true) order by prompt, layer, pos").to_arrow_table()
    assert got.drop_columns(["score"]).equals(ref.drop_columns(["score"]))
    np.testing.assert_allclose(got["score"].to_numpy(), ref["score"].to_numpy(), atol=1e-6)

    # prompts table: the metric baselines are the engine's clean / corrupted logit differences
    from attrpatch.engine import forward, weights

    w = weights(model)
    clean = final_logit_diff(forward(w, batch.clean_tokens, batch.answer_pos), batch)
    corrupt = final_logit_diff(forward(w, batch.corrupt_tokens, batch.answer_pos), batch)
    p = duckdb.sql(f"select prompt, clean_metric, corrupt_metric from read_parquet('{root}/prompts/model={names[0]}/"
                   "task=ioi/*.parquet') order by prompt").fetchnumpy()
    np.testing.assert_allclose(p["clean_metric"], clean.detach().numpy(), atol=1e-4)
    np.testing.assert_allclose(p["corrupt_metric"], corrupt.detach().numpy(), atol=1e-4)
    assert not np.allclose(p["clean_metric"], p["corrupt_metric"])

    # placement: fractional logical GPUs from the spec, device forced to cpu (no CUDA here)
    assert report.workers and all(w["device"] == "cpu" for w in report.workers)
    specs = {e.name: e.spec for e in model_entries(cfg)}
    for w in report.workers:
        assert w["resources"]["GPU"] == pytest.approx(specs[w["model"]].num_gpus)
        assert w["resources"]["CPU"] == pytest.approx(specs[w["model"]].num_cpus)

    # correlations: every approximation against its exact method, per kind, matching a numpy recomputation
    pairs = {(r["model"], r["approx"], r["exact"], r["kind"]) for r in report.correlations}
    for name in names:  # the join covers every exact score
        for approx, exact, table in (("attribution", "activation", "nodes"),
                                     ("edge_attribution", "edge_activation", "edges")):
            n = sum(r["n"] for r in report.correlations if (r["model"], r["approx"], r["exact"]) == (name, approx, exact))
            assert n == expected[(table, name, exact)]
    for name in names:
        assert {(name, ATP, EXACT, "resid_pre"), (name, "attribution", "activation", "head_out"),
                (name, "attribution", "activation", "resid_pre")} <= pairs
        assert any(k[:3] == (name, "edge_attribution", "edge_activation") for k in pairs)
    row = next(r for r in report.correlations if (r["model"], r["approx"]) == (names[0], ATP))
    j = duckdb.sql(f"""select a.score x, b.score y
        from read_parquet('{root}/nodes/model={names[0]}/task=ioi/method={ATP}/*.parquet') a
        join read_parquet('{root}/nodes/model={names[0]}/task=ioi/method={EXACT}/*.parquet') b
        using (direction, component, layer, pos, prompt)""").fetchnumpy()
    assert row["n"] == len(j["x"]) == expected[("nodes", names[0], EXACT)]
    assert row["pearson"] == pytest.approx(np.corrcoef(j["x"], j["y"])[0, 1], abs=1e-6)
    assert row["pearson"] > 0.5  # AtP tracks exact patching of the residual stream

    # plots under ROOT/plots, and one offline W&B run per (model, task) holding the same numbers
    # node pairs: {ATP, attribution} × {EXACT, activation}; edge pair: edge_attribution × edge_activation;
    # one figure per pair and model, and correlation against size (two models)
    assert len(report.plots) == 2 * 5 + 1 and all(open(p, "rb").read(4) == b"\x89PNG" for p in report.plots)
    assert len(report.wandb_dirs) == 2 and all(d.startswith(str(root / "wandb")) for d in report.wandb_dirs)
    run = read_offline_run(report.wandb_dirs[0])
    assert run["name"] == f"{names[0]}/ioi" and run["group"] == "t"
    assert run["summary"][f"{ATP}_vs_{EXACT}/resid_pre/pearson"] == pytest.approx(row["pearson"])
    assert run["summary"][f"{ATP}_vs_{EXACT}/resid_pre/n"] == row["n"]
    assert run["summary"]["correlations"]["_type"] == "table-file"
    assert run["summary"]["points"]["_type"] == "table-file"  # the sampled pairs, filterable by kind and layer
    assert f"points/{ATP}_vs_{EXACT}/resid_pre_table" in run["history_keys"]  # a native scatter per kind
    assert "points/edge_attribution_vs_edge_activation/head_out->logits_table" in run["history_keys"]
    media = glob.glob(f"{report.wandb_dirs[0]}/files/media/images/scatter/*.png")
    assert len(media) == 5
    points = glob.glob(f"{report.wandb_dirs[0]}/files/media/table/points_*.table.json")
    assert len(points) == 1
    logged = json.load(open(points[0]))
    assert logged["columns"] == ["comparison", "kind", "layer", "approximation", "exact"]
    assert {r[1] for r in logged["data"]} >= {"resid_pre", "head_out", "head_out->logits"}

    # manifest: resolved config, versions, git sha, times, model sizes, fingerprints
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["end"] >= manifest["start"]
    assert manifest["config"]["methods"] == list(methods) and manifest["versions"]["ray"] == ray_session.__version__
    assert manifest["git_sha"] and len(manifest["git_sha"]) == 40
    assert set(manifest["models"]) == set(names)
    assert {m["d_model"] for m in manifest["models"].values()} == {64, 48}
    assert all(m["n_params"] > 2e6 for m in manifest["models"].values())
    rec = json.loads((root / f"_done/model={names[0]}/task=ioi/method={ATP}/part-00000.json").read_text())
    assert rec["fingerprint"] == manifest["fingerprints"][f"{names[0]}/ioi/{ATP}"]
    assert rec["parts"]["nodes"]["rows"] == rec["rows"]["nodes"] and len(rec["parts"]["nodes"]["sha256"]) == 64


def test_relaunch_skips_finished_cells_and_computes_only_the_rest(ray_session, ckpts, tmp_path):
    root = tmp_path / "r"
    cfg = _cfg(root, ckpts[:1], (ATP, EXACT), n_prompts=12)
    first = run_sweep(cfg)
    assert first.ran == 3 * 3
    before = _counts(root)
    again = run_sweep(cfg)
    assert again.ran == 0 and again.skipped == 9 and again.workers == []  # nothing to do: no worker started
    # lose two cells (as if the sweep had stopped before them): only those are recomputed
    name = model_entries(cfg)[0].name
    for rel in (f"_done/model={name}/task=ioi/method={EXACT}/part-00002.json",
                f"_done/model={name}/task=ioi/prompts/part-00001.json"):
        os.remove(root / rel)
    os.remove(root / f"nodes/model={name}/task=ioi/method={EXACT}/part-00002.parquet")
    third = run_sweep(cfg)
    assert third.ran == 2 and sorted(r["cell"] for r in third.records if not r["resumed"]) == [
        f"{name}/ioi/prompts/1", f"{name}/ioi/{EXACT}/2"]
    assert _counts(root) == before and _duplicates(root) == 0


def test_killed_worker_is_restarted_and_the_sweep_completes(ray_session, ckpts, tmp_path):
    """SIGKILL one worker mid-sweep: Ray restarts it, its shards re-run, rows are exact with no duplicates."""
    ray = ray_session
    root = tmp_path / "r"
    cfg = _cfg(root, ckpts[:1], (ATP, EXACT), n_prompts=24, sleep_s=1.0)
    killed = {}

    def kill_one_worker():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not glob.glob(f"{root}/_done/**/*.json", recursive=True):
            time.sleep(0.1)
        launch = json.loads((root / "_lock.json").read_text())["launch"]  # this launch's workers only
        names = [n for n in ray.util.list_named_actors()
                 if n.startswith(f"attrpatch/t/{launch}/") and not n.endswith("/progress")]
        actor = ray.get_actor(sorted(names)[0])
        pid = ray.get(actor.pid.remote())
        os.kill(pid, signal.SIGKILL)
        killed["pid"] = pid

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    report = run_sweep(cfg)
    killer.join(timeout=5)
    assert "pid" in killed, "the worker was not killed during the sweep"
    pids = {r["pid"] for r in report.records}
    started = {w["pid"] for w in report.workers}
    assert pids - started, "no cell was finished by a restarted worker"
    assert report.ran == 6 * 3
    assert _counts(root) == {k: v for k, v in _expected(cfg).items() if v}
    assert _duplicates(root) == 0
    assert not glob.glob(f"{root}/**/.*.tmp", recursive=True)


def test_hydra_entry_point_single_and_multirun(ray_session, ckpts, tmp_path, capsys):
    """The real command line (in this process, reusing the Ray session): a list sweep, then -m multirun."""
    from sweeps.run import main

    common = [f"plugins=[{PLUGIN}]", "task.n_prompts=4", "task.shard_size=4", "wandb=disabled",
              "output.progress=false", f"hydra.run.dir={tmp_path}/h", f"hydra.sweep.dir={tmp_path}/hm"]
    rc = main([f"models=[{ckpts[0]},{ckpts[1]}]", f"methods=[{ATP},{EXACT}]", f"output.root={tmp_path}/one",
               *common])
    assert rc == 0
    out = capsys.readouterr().out
    assert "approximation vs exact patching" in out and f"Parquet dataset: {tmp_path}/one" in out
    assert len(_counts(tmp_path / "one")) == 2 * 3  # 2 models × (prompts + 2 methods)

    rc = main(["-m", f"model.path={ckpts[0]}", f"methods=[{ATP}],[{EXACT}]", f"output.root={tmp_path}/multi",
               *common])
    assert rc == 0
    counts = _counts(tmp_path / "multi")
    assert {k[2] for k in counts} == {None, ATP, EXACT}  # both jobs wrote into the shared root

    rc = main([f"model.path={ckpts[0]}", "methods=[no_such_method]", *common])
    assert rc == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "ShardWorker pid" not in line]  # Ray's log relay
    assert len(err) == 1 and err[0].startswith("error: methods: unknown method 'no_such_method'")
