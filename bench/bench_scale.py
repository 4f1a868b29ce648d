"""Scale rehearsal: the real sweep command on random GPT-2s of the four real sizes, and the plan checked against it.

    .venv/bin/python bench/bench_scale.py                        # small, medium, large, xl (~1 h on 2 cores)
    .venv/bin/python bench/bench_scale.py --sizes gpt2-small,gpt2-medium --prompts 4

For each size (small 12×12×768, medium 24×16×1024, large 36×20×1280, xl 48×25×1600; the real vocabulary;
random weights at GPT-2's initialisation saved once as local checkpoint directories under
``~/.cache/attrpatch/bench-shapes``) it runs ``python -m sweeps.run`` — the command a user types, default
settings (memory budget, worker sizing, W&B offline, plots) — on one shard of ``--prompts`` IOI prompts with a
method set that fits this CPU:

* ``attribution``: node AtP, every kind, per prompt and position;
* ``edge_attribution``: EAP on every edge, per prompt (summed over positions);
* ``eap_ig``: EAP-IG, 3 steps, per prompt;
* ``activation``: exact activation patching of every layer's attention and MLP output (all positions at once);
* ``edge_activation``: exact edge patching of ~``--edges`` edges (half the top by |EAP|, half random), per prompt;
* ``faithfulness``: MIB's CPR/CMD curve over 5 circuit sizes, ranked by EAP.

Reported per size: whether it completed, wall, compute per method (from the completion records) beside the
plan's prediction for it (measured / predicted), peak resident memory of the worker and of the driver (sampled
from the process tree every 0.2 s), rows and bytes per table, and the end-of-sweep step's time. For the small
and medium shapes the prediction must be within ±35 % of the measurement per method (printed as a check).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("ATTRPATCH_CACHE", Path.home() / ".cache" / "attrpatch")) / "bench-shapes"
METHODS = ("attribution", "edge_attribution", "eap_ig", "activation", "edge_activation", "faithfulness")
CHECKED = ("gpt2-small", "gpt2-medium")  # the plan must be within ±35 % of the measurement here
TOLERANCE = 0.35


def checkpoint(size: str) -> Path:
    """A random GPT-2 of the real size, saved once (GPT-2's own initialisation: std 0.02)."""
    from attrpatch.testing import GPT2_SHAPES, save_random_gpt2

    path = CACHE / size
    if not (path / "config.json").exists():
        t = time.perf_counter()
        tmp = path.with_name(path.name + ".tmp")
        save_random_gpt2(tmp, seed=0, scale=1.0, **GPT2_SHAPES[size])
        tmp.rename(path)
        print(f"  saved a random {size} checkpoint in {time.perf_counter() - t:.0f} s: {path}", flush=True)
    return path


class PeakSampler:
    """Peak resident memory of the driver process and of its ShardWorker processes, sampled."""

    def __init__(self, pid: int, every_s: float = 0.2):
        self.pid, self.every_s = pid, every_s
        self.driver = self.worker = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                self.driver = max(self.driver, root.memory_info().rss)
                for p in root.children(recursive=True):
                    try:
                        if "ShardWorker" in " ".join(p.cmdline()):
                            self.worker = max(self.worker, p.memory_info().rss)
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
            except psutil.NoSuchProcess:
                return
            time.sleep(self.every_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def run_size(size: str, prompts: int, edges: int, out: Path, threads: int) -> dict:
    from attrpatch.graph import EdgeGraph
    from attrpatch.testing import GPT2_SHAPES

    ckpt = checkpoint(size)
    shape = GPT2_SHAPES[size]
    n_edges = EdgeGraph(shape["n_layer"], shape["n_head"]).n_edges
    root = out / size
    if root.exists():  # a sweep would resume it and time nothing
        raise SystemExit(f"{root} already holds a results root: pass a new --out")
    args = [
        sys.executable, "-m", "sweeps.run", f"model.path={ckpt}", f"methods=[{','.join(METHODS)}]",
        "task=ioi", f"task.n_prompts={prompts}", f"task.shard_size={prompts}", f"output.root={root}",
        f"hydra.run.dir={out}/hydra-{size}", "output.progress=false", f"cluster.num_cpus={threads}",
        f"model.num_cpus={threads}", "method.overrides.edge_attribution.per_position=false",
        "method.overrides.eap_ig.per_position=false", "method.overrides.eap_ig.ig_steps=3",
        "method.overrides.activation.granularities=[attn_out_all_pos,mlp_out_all_pos]",
        "method.overrides.edge_activation.per_position=false",
        f"method.overrides.edge_activation.edge_subset={edges / n_edges:.3g}",
        "method.overrides.faithfulness.k_percent=[1,5,20,50,100]",
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = PeakSampler(proc.pid)
    log, _ = proc.communicate()
    sampler.stop()
    wall = time.perf_counter() - t0
    (out / f"{size}.log").write_text(log)
    result = {"size": size, "completed": proc.returncode == 0, "wall_s": wall, "driver_gib": sampler.driver / 2**30,
              "worker_gib": sampler.worker / 2**30, "returncode": proc.returncode}
    if not result["completed"]:
        result["error"] = log.strip().splitlines()[-1] if log.strip() else "?"
        return result
    manifest = json.loads((root / "manifest.json").read_text())
    plan = json.loads((root / "plan.json").read_text())
    measured, predicted = collections.Counter(), collections.Counter()
    rows, size_bytes = collections.Counter(), collections.Counter()
    for rec in (root / "_done").rglob("*.json"):
        r = json.loads(rec.read_text())
        measured[r["method"] or "prompts"] += r["compute_s"]
        for table, part in r["parts"].items():
            rows[table] += part["rows"]
            size_bytes[table] += part["bytes"]
    for c in plan["cells"]:
        predicted[c["method"] or "prompts"] += c["seconds"]
    result.update(measured=dict(measured), predicted=dict(predicted), rows=dict(rows), bytes=dict(size_bytes),
                  summary_s=manifest.get("summary_s"), plan_seconds=plan["totals"]["seconds"])
    return result


def report(results: list[dict]) -> bool:
    ok = True
    print("\n| size | completed | wall | driver peak | worker peak | end-of-sweep step | rows (bytes) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        tables = ", ".join(f"{t} {n:,} ({r['bytes'][t] / 1e6:.1f} MB)" for t, n in sorted(r.get("rows", {}).items()))
        print(f"| {r['size']} | {'yes' if r['completed'] else 'NO: ' + r.get('error', '')} | {r['wall_s']:.0f} s | "
              f"{r['driver_gib']:.2f} GiB | {r['worker_gib']:.2f} GiB | {r.get('summary_s') or 0:.1f} s | {tables} |")
        ok &= r["completed"]
    print("\ncompute per method, measured (predicted by the plan, measured/predicted):")
    print("| size | " + " | ".join(("prompts", *METHODS)) + " |")
    print("|---|" + "---|" * (len(METHODS) + 1))
    for r in results:
        if not r["completed"]:
            continue
        cells = []
        for m in ("prompts", *METHODS):
            got, want = r["measured"].get(m, 0.0), r["predicted"].get(m, 0.0)
            ratio = got / want if want else float("nan")
            cells.append(f"{got:.1f} s ({want:.1f} s, {ratio:.2f})")
            if r["size"] in CHECKED and m != "prompts" and want and not (1 - TOLERANCE <= ratio <= 1 + TOLERANCE):
                ok = False
                print(f"  ! {r['size']} {m}: measured/predicted = {ratio:.2f}, outside ±{TOLERANCE:.0%}")
        print(f"| {r['size']} | " + " | ".join(cells) + " |")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="gpt2-small,gpt2-medium,gpt2-large,gpt2-xl")
    ap.add_argument("--prompts", type=int, default=4, help="prompts (one shard) per size")
    ap.add_argument("--edges", type=int, default=50, help="edges patched exactly per size")
    ap.add_argument("--threads", type=int, default=2, help="CPUs of the local Ray and of the one worker")
    ap.add_argument("--out", default=None, help="where the results roots go (default: a new temporary directory)")
    args = ap.parse_args()
    import tempfile

    out = Path(args.out or tempfile.mkdtemp(prefix="attrpatch-scale-"))
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for size in args.sizes.split(","):
        print(f"{size}: running the sweep …", flush=True)
        results.append(run_size(size, args.prompts, args.edges, out, args.threads))
        r = results[-1]
        print(f"  {'completed' if r['completed'] else 'FAILED'} in {r['wall_s']:.0f} s; worker peak "
              f"{r['worker_gib']:.2f} GiB, driver peak {r['driver_gib']:.2f} GiB", flush=True)
    ok = report(results)
    print(f"\nresults roots and logs under {out}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
