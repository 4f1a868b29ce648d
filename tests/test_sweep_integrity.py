"""A results root you can trust: fingerprints, verified resume, fail-fast input, the manifest, one writer, loopback.

    python -m pytest -q tests/test_sweep_integrity.py

Every bad input runs through the real entry point (``sweeps.run.main``) and must end with exit code 2, one
line on stderr and nothing written. Relaunches of the same root with changed options must refuse before any
work and name the changed keys; additive changes compute only the new cells. Faults (a truncated or
bit-flipped part, a SIGKILLed driver, a concurrent launch, SIGTERM) are survived with exact rows.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from test_sweep_methods import ATP, EXACT
from test_sweep_ray import PLUGIN, _cfg, _counts, _duplicates, _expected

from attrpatch.errors import ConfigError
from attrpatch.testing import SHAPES, save_random_gpt2
from sweeps.config import MethodOptions, SweepConfig, TaskOptions, WandbOptions
from sweeps.driver import run_sweep
from sweeps.grid import model_entries
from sweeps.run import main
from sweeps.verify import main as verify_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_random_gpt2(tmp_path_factory.mktemp("integrity") / "m", seed=1, **SHAPES["tiny-a"])


def _tree(root) -> dict[str, bytes]:
    """Every file under a root with its bytes (the manifest's heartbeat aside)."""
    out = {}
    for p in glob.glob(f"{root}/**/*", recursive=True):
        if os.path.isfile(p) and not p.endswith("manifest.json") and "/wandb/" not in p and "/plots/" not in p:
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written

def _bad_inputs(ckpt, tmp_path):
    truncated = tmp_path / "truncated"
    save_random_gpt2(truncated, seed=2, **SHAPES["tiny-a"])
    st = truncated / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    common = [f"model.path={ckpt}", f"methods=[{ATP}]", f"plugins=[{PLUGIN}]", "task.n_prompts=8", "wandb=disabled"]
    builtin = [f"model.path={ckpt}", "methods=[attribution]", "task.n_prompts=8", "wandb=disabled"]
    return [
        ("unknown kind", [*common, "method.kinds=[nonsense]"], "method.kinds: ['nonsense'] is scored by none"),
        ("typo in a method option", [*common, f"+method.overrides.{ATP}.sleep=1"],
         f"method {ATP!r} takes no option ['sleep']"),
        ("bad option value", [f"model.path={ckpt}", "methods=[activation]", "wandb=disabled",
                              "+method.overrides.activation.granularities=[resid]"],
         "unknown activation-patching granularities ['resid']"),
        ("truncated checkpoint", [f"model.path={truncated}", f"methods=[{ATP}]", f"plugins=[{PLUGIN}]",
                                  "wandb=disabled"], "model.safetensors' is truncated: its header needs"),
        ("cuda without CUDA", [*common, "model.device=cuda"], "model.device=cuda but this machine has no usable CUDA"),
        ("root under a file", [*common, f"output.root={a_file}/r"], "is a file, not a directory"),
        ("root on a read-only file system", [*common, "output.root=/proc/attrpatch-test/r"], "is not writable"),
        ("a billion prompts", [*common, "task.n_prompts=1000000000"], "more than limits.max_prompts"),
        ("W&B online without a key", [*common, "wandb=online"], "wandb.mode=online but no W&B API key"),
        ("rows beyond the limit", [*builtin, "limits.max_rows=100"], "more than limits.max_rows=100"),
        ("memory beyond the worker", [*builtin, "model.memory_gb=0.001"], "GiB per worker"),
    ]


def test_bad_inputs_fail_fast_with_one_line_and_nothing_written(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no W&B key anywhere
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rows = _bad_inputs(ckpt, tmp_path)
    capsys.readouterr()  # the checkpoint writer's progress bars
    for name, args, words in rows:
        slug = "".join(c if c.isalnum() else "-" for c in name)
        root = tmp_path / f"root-{slug}"
        has_root = any(a.startswith("output.root=") for a in args)
        t0 = time.perf_counter()
        rc = main([*args, *([] if has_root else [f"output.root={root}"]), f"hydra.run.dir={tmp_path}/h/{slug}",
                   "output.progress=false"])
        elapsed = time.perf_counter() - t0
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert rc == 2, (name, err)
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], (name, err)
        assert not root.exists(), f"{name}: something was written"
        if name == "a billion prompts":
            assert elapsed < 5, f"refusing a billion prompts took {elapsed:.1f} s"
    assert not (tmp_path / "a-file").is_dir() and not os.path.exists("/proc/attrpatch-test")
    assert len(rows) == 11


# ---------------------------------------------------------------- relaunches of one root

def test_relaunches_refuse_changed_options_and_compute_only_new_cells(ray_session, ckpt, tmp_path):
    root = tmp_path / "r"
    base = _cfg(root, [ckpt], (ATP,), n_prompts=8, shard_size=4)
    first = run_sweep(base)
    assert first.ran == 2 * 2
    before = _tree(root)
    changed = {
        "task.seed": dataclasses.replace(base, task=dataclasses.replace(base.task, seed=4)),
        "task.shard_size": dataclasses.replace(base, task=dataclasses.replace(base.task, shard_size=2)),
        "task.n_prompts": dataclasses.replace(base, task=dataclasses.replace(base.task, n_prompts=12)),
        "method.directions": dataclasses.replace(
            base, method=dataclasses.replace(base.method, directions=("denoise", "noise"))),
        "model.dtype": dataclasses.replace(base, model=dataclasses.replace(base.model, dtype="bfloat16")),
    }
    for key, cfg in changed.items():
        with pytest.raises(ConfigError) as info:
            run_sweep(cfg)
        line = str(info.value)
        assert "\n" not in line and "computed with other options" in line and "resume=overwrite" in line, line
        assert key.split(".")[1] in line, (key, line)
        assert _tree(root) == before, f"{key}: the refused launch changed the root"
        assert not (root / "_lock.json").exists()
    # options that do not touch scores change freely: nothing recomputed
    free = dataclasses.replace(base, wandb=WandbOptions(mode="offline"),
                               method=dataclasses.replace(base.method, max_rows=7),
                               cluster=dataclasses.replace(base.cluster, in_flight=1))
    assert run_sweep(free).ran == 0
    # additions compute only the new cells
    more = dataclasses.replace(base, methods=(ATP, EXACT))
    assert run_sweep(more).ran == 2
    assert _counts(root) == {k: v for k, v in _expected(more).items() if v} and _duplicates(root) == 0
    # resume=overwrite discards the old cells and computes the new ones: only seed-4 prompts remain
    over = dataclasses.replace(changed["task.seed"], resume="overwrite", methods=(ATP, EXACT))
    report = run_sweep(over)
    assert report.ran == 2 * 3
    assert _counts(root) == {k: v for k, v in _expected(over).items() if v} and _duplicates(root) == 0
    assert verify_main([str(root)]) == 0


def test_a_half_finished_root_refuses_too(ray_session, ckpt, tmp_path):
    root = tmp_path / "r"
    base = _cfg(root, [ckpt], (ATP,), n_prompts=8, shard_size=4)
    run_sweep(base)
    name = model_entries(base)[0].name
    os.remove(root / f"_done/model={name}/task=ioi/method={ATP}/part-00001.json")  # as if stopped before it
    with pytest.raises(ConfigError, match="task.seed 3 → 5"):
        run_sweep(dataclasses.replace(base, task=dataclasses.replace(base.task, seed=5)))


def test_damaged_parts_are_recomputed_and_verify_names_them(ray_session, ckpt, tmp_path, caplog, capsys):
    root = tmp_path / "r"
    cfg = _cfg(root, [ckpt], (ATP, EXACT), n_prompts=8, shard_size=4)
    run_sweep(cfg)
    expected = _counts(root)
    name = model_entries(cfg)[0].name
    truncated = root / f"nodes/model={name}/task=ioi/method={ATP}/part-00000.parquet"
    truncated.write_bytes(truncated.read_bytes()[:100])
    flipped = root / f"nodes/model={name}/task=ioi/method={EXACT}/part-00001.parquet"
    original = flipped.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    orphan = root / f"nodes/model={name}/task=ioi/method={EXACT}/part-00007.parquet"
    orphan.write_bytes(flipped.read_bytes())
    assert verify_main([str(root)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any("part-00000.parquet" in line and "checksum mismatch" in line for line in lines), lines
    assert any(f"method={EXACT}/part-00001.parquet: checksum mismatch" in line for line in lines), lines
    assert any("part-00007.parquet: a part with no completion record" in line for line in lines), lines
    orphan.unlink()
    with caplog.at_level("WARNING"):
        report = run_sweep(cfg)
    # the truncated part by its size, the flipped byte (same size) by its checksum: both recomputed
    assert sorted(report.recomputed) == sorted([f"{name}/ioi/{ATP}/0", f"{name}/ioi/{EXACT}/1"])
    assert caplog.text.count("recomputing cell") == 2 and "checksum mismatch" in caplog.text
    assert report.ran == 2 and flipped.read_bytes() == original  # the same scores again, byte for byte
    assert verify_main([str(root)]) == 0
    assert _counts(root) == expected and _duplicates(root) == 0


def test_manifest_records_failure_of_the_end_of_sweep(ray_session, ckpt, tmp_path, monkeypatch):
    import analysis.wandb_log

    def broken(*args, **kwargs):
        raise RuntimeError("W&B is down")

    monkeypatch.setattr(analysis.wandb_log, "log_comparison", broken)
    root = tmp_path / "r"
    cfg = _cfg(root, [ckpt], (ATP, EXACT), n_prompts=4, shard_size=4, wandb="offline")
    with pytest.raises(RuntimeError, match="W&B is down"):
        run_sweep(cfg)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "W&B is down" in manifest["error"]
    assert not (root / "_lock.json").exists()
    monkeypatch.undo()
    assert run_sweep(dataclasses.replace(cfg, wandb=WandbOptions(mode="disabled"))).ran == 0  # resumable


# ---------------------------------------------------------------- the driver dies, or two launch at once

def _launch(args: list[str], tmp_path, name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sweeps.run", *args, f"hydra.run.dir={tmp_path}/h-{name}",
                             "output.progress=false", "cluster.num_cpus=2"], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _sweep_args(ckpt, root, sleep_s=1.0, n_prompts=24):
    slow = ", ".join(f"{m}: {{sleep_s: {sleep_s}}}" for m in (ATP, EXACT))
    return [f"model.path={ckpt}", f"methods=[{ATP},{EXACT}]", f"plugins=[{PLUGIN}]", f"task.n_prompts={n_prompts}",
            "task.shard_size=4", "task.seed=3", f"method.overrides={{{slow}}}", "wandb=disabled", f"output.root={root}"]


def test_sigkilled_driver_stops_its_workers_and_the_relaunch_resumes(ckpt, tmp_path):
    root = tmp_path / "r"
    args = _sweep_args(ckpt, root)
    proc = _launch(args, tmp_path, "a")
    _wait_for(lambda: len(glob.glob(f"{root}/_done/**/*.json", recursive=True)) >= 3, proc)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "ShardWorker" in " ".join(p.cmdline())]
    assert workers, "no worker process found"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 15  # the workers notice the driver is gone within seconds
    while any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [w.pid for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"workers {alive} outlived their driver"
    done = len(glob.glob(f"{root}/_done/**/*.json", recursive=True))
    time.sleep(2)
    assert len(glob.glob(f"{root}/_done/**/*.json", recursive=True)) == done  # nothing finishes after the kill
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "running"  # what a SIGKILL leaves; the relaunch says so and continues
    rerun = subprocess.run([sys.executable, "-m", "sweeps.run", *args, f"hydra.run.dir={tmp_path}/h-b",
                            "output.progress=false", "cluster.num_cpus=2"], cwd=REPO, env=ENV, capture_output=True,
                           text=True, timeout=600)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out
    assert "taking over the lock" in out and "ended without finishing" in out
    cfg = SweepConfig(models=(ckpt,), methods=(ATP, EXACT), plugins=(PLUGIN,),
                      task=TaskOptions(n_prompts=24, shard_size=4, seed=3))
    assert _counts(root) == {k: v for k, v in _expected(cfg).items() if v} and _duplicates(root) == 0
    assert json.loads((root / "manifest.json").read_text())["status"] == "complete"
    assert verify_main([str(root)]) == 0


def test_a_second_launch_on_the_same_root_refuses_and_sigterm_is_an_interrupt(ckpt, tmp_path):
    root = tmp_path / "r"
    args = _sweep_args(ckpt, root, sleep_s=1.0)
    first = _launch(args, tmp_path, "a")
    _wait_for(lambda: (root / "_lock.json").exists() and (root / "manifest.json").exists(), first)
    second = subprocess.run([sys.executable, "-m", "sweeps.run", *args, f"hydra.run.dir={tmp_path}/h-b",
                             "output.progress=false"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    holder = json.loads((root / "_lock.json").read_text())
    err = [line for line in second.stderr.splitlines() if line.strip()]
    assert second.returncode == 2 and len(err) == 1, second.stdout + second.stderr
    assert "is in use by launch" in err[0] and f"pid {holder['pid']}" in err[0] and holder["host"] in err[0]
    _wait_for(lambda: len(glob.glob(f"{root}/_done/**/*.json", recursive=True)) >= 2, first)
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 143, out
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and not (root / "_lock.json").exists()
    assert not glob.glob(f"{root}/**/.*.tmp", recursive=True)


# ---------------------------------------------------------------- what listens where

def _listening(pids: set[int]) -> set[tuple[str, int]]:
    out = set()
    for pid in pids:
        try:
            for c in psutil.Process(pid).net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.add((c.laddr.ip, c.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


LOOPBACK = ("127.", "::1", "::ffff:127.")


def test_a_local_sweep_listens_on_loopback_only(ckpt, tmp_path):
    root = tmp_path / "r"
    proc = _launch(_sweep_args(ckpt, root, sleep_s=1.0, n_prompts=16), tmp_path, "a")
    seen: set[tuple[str, int]] = set()
    processes: set[int] = set()
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            tree = {proc.pid} | {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            break
        processes |= tree
        seen |= _listening(tree)
        if len(glob.glob(f"{root}/_done/**/*.json", recursive=True)) >= 4:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert len(processes) >= 4 and len(seen) >= 3, (processes, seen)  # GCS, raylet, workers: the check has teeth
    outside = sorted(a for a in seen if not a[0].startswith(LOOPBACK))
    assert not outside, f"listening beyond loopback: {outside}"
    assert os.environ.get("RAY_AUTH_MODE", "token") != "disabled"  # Ray's token authentication stays on


def test_methods_options_are_typed_everywhere():
    """Every built-in method declares an Options dataclass; the sweep's per-method overrides go through it."""
    from attrpatch.methods import METHODS, Options, load_builtin_methods

    load_builtin_methods()
    for info in METHODS.values():
        assert issubclass(info.options, Options) and dataclasses.is_dataclass(info.options)
    opts = MethodOptions(overrides={"faithfulness": {"k_percent": [1, 10]}, "eap_ig": {"ig_steps": 2}})
    assert opts.for_method("faithfulness").options.k_percent == (1.0, 10.0)
