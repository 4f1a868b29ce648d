"""Sweep overhead: wall time of a 20-shard sweep over the Σ of its workers' compute time (goal ≤ 1.2).

    python bench/bench_sweep.py [--workers 1] [--shard-size 16] [--methods attribution,activation]
    python bench/bench_sweep.py --mixed --workers 2          # two model sizes in one sweep on 2 workers

Baseline and measurement come from the same run: every worker times its own method calls (``compute_s``
in each completion record); the driver times the sweep. With one worker the ratio is pure overhead
(scheduling, Parquet writes, completion records, driver round trips); with N workers it is reported as
wall × N / Σ compute (1.0 = perfect use of the workers). Two walls are printed: ``dispatch`` (first cell
handed out → last cell finished: what the sweep adds per cell) and ``launch`` (the whole call: Ray start,
model loads in the workers, correlation summary and plots included; a fixed cost per launch).
Uses a random GPT-2 of 4 layers, 4 heads, d_model 128 (twice ioi-tiny's depth) unless --model is given.
``--mixed`` sweeps it together with a random GPT-2 twice as wide and 1.5× as deep (6 layers, 8 heads, d_model
256), the shards split between the two: the models share the workers (the larger one's start first; a worker
whose model has nothing left is released for the other's), so the dispatch wall should stay within 1.2 ×
Σ compute / workers even though the workers must switch models (each switch loads a model, counted as overhead).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a registered model or checkpoint dir (default: a random 4-layer, d_model-128 GPT-2)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--methods", default="attribution,activation")
    ap.add_argument("--kinds", default="resid_pre,attn_out,mlp_out,head_out", help="node kinds ('' = all)")
    ap.add_argument("--mixed", action="store_true", help="two model sizes in one sweep (see the docstring)")
    args = ap.parse_args()

    import ray

    from sweeps.config import (
        ClusterOptions,
        MethodOptions,
        ModelOptions,
        OutputOptions,
        SweepConfig,
        TaskOptions,
        WandbOptions,
    )
    from sweeps.driver import run_sweep

    with tempfile.TemporaryDirectory() as tmp:
        from attrpatch.testing import save_random_gpt2

        model = args.model
        if model is None:
            model = save_random_gpt2(os.path.join(tmp, "random-4-layer"), seed=0, n_layer=4, n_head=4, n_embd=128,
                                     n_positions=64)
        models = (model,)
        shards = args.shards
        if args.mixed:
            models += (save_random_gpt2(os.path.join(tmp, "random-6-layer"), seed=1, n_layer=6, n_head=8,
                                        n_embd=256, n_positions=64),)
            shards = args.shards // 2  # per model
        cfg = SweepConfig(
            name="bench", models=models, tasks=("ioi",), methods=tuple(args.methods.split(",")),
            model=ModelOptions(workers=args.workers, device="cpu"),
            task=TaskOptions(n_prompts=shards * args.shard_size, shard_size=args.shard_size),
            method=MethodOptions(kinds=tuple(args.kinds.split(",")) if args.kinds else None),
            cluster=ClusterOptions(num_cpus=max(2, args.workers)), wandb=WandbOptions(mode="disabled"),
            output=OutputOptions(root=os.path.join(tmp, "results"), progress=False),
        )
        t0 = time.perf_counter()
        ray.init(num_cpus=max(2, args.workers), include_dashboard=False, logging_level="WARNING")
        ray_start = time.perf_counter() - t0
        try:
            report = run_sweep(cfg)
        finally:
            ray.shutdown()
    compute = report.compute_s
    writes = sum(r["write_s"] for r in report.records if not r["resumed"])
    n = args.workers
    by_model: dict[str, float] = {}
    for r in report.records:
        by_model[r["model"]] = by_model.get(r["model"], 0.0) + r["compute_s"]
    print(f"sweep: {len(models)} model(s) × {shards} shards × (prompts + {args.methods}) = {report.ran} cells, "
          f"{n} worker(s) per model on {max(2, args.workers)} CPUs, shard size {args.shard_size}")
    if args.mixed:
        print("compute per model: " + ", ".join(f"{m} {s:.1f} s" for m, s in by_model.items())
              + f"; workers started: {len(report.workers)} (model loads: "
              + ", ".join(f"{w['load_s']:.1f} s" for w in report.workers) + ")")
    print(f"Σ worker compute            {compute:8.2f} s   (Parquet writes, counted as overhead: {writes:.2f} s)")
    print(f"dispatch wall               {report.dispatch_s:8.2f} s   ratio wall×workers/Σcompute = "
          f"{report.dispatch_s * n / compute:.3f}   (goal ≤ 1.2)")
    print(f"launch wall (+Ray {ray_start:.1f} s)   {report.wall_s + ray_start:8.2f} s   ratio = "
          f"{(report.wall_s + ray_start) * n / compute:.3f}   (fixed per-launch costs included)")


if __name__ == "__main__":
    main()
