"""The end of a sweep at scale: the comparison, statistics and figures over 10^8 edge rows, in bounded memory.

    .venv/bin/python bench/bench_summary.py                      # 10^8 edge rows (~1 GB of Parquet), then the summary
    .venv/bin/python bench/bench_summary.py --rows 1e7 --keep /tmp/big-root

A synthetic results root is written directly as Parquet in the contract's layout (no model runs): GPT-2
small's 32,491 edges, per prompt, summed over positions, for an approximation (``edge_attribution``) and its
exact reference (``edge_activation``) with a known correlation (exact = approximation + noise), in 32-prompt
shard parts, ``--rows`` rows in all. Then, in a fresh process, the sweep's own end-of-sweep step
(``sweeps.summary.summarise``: ``analysis.compare``'s join and statistics over every row in DuckDB with its
memory limit and spilling, the stratified sample, the figures, an offline W&B run) runs on it; its wall time and
the process's peak resident memory (``getrusage``) are printed (goal: under 4 GiB), with the Pearson correlation
it found beside the designed one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NOISE = 0.5  # exact = approx + NOISE · N(0, 1) with approx ~ N(0, 1): Pearson = 1 / sqrt(1 + NOISE²)
SHARD = 32


def write_root(root: Path, rows: float) -> dict:
    """The synthetic root; returns what was written."""
    import pyarrow as pa

    from attrpatch.graph import EdgeGraph
    from attrpatch.results import EDGE_SCHEMA, ResultsRoot, part_path

    graph = EdgeGraph(12, 12)
    s_idx, d_idx = (t.numpy() for t in graph.valid.nonzero(as_tuple=True))
    n_edges = len(s_idx)
    n_prompts = int(rows / 2 / n_edges / SHARD + 0.999) * SHARD
    res = ResultsRoot(str(root))

    def node_columns(nodes, idx):
        comps = sorted({n.component for n in nodes})
        code = np.array([comps.index(n.component) for n in nodes], np.int32)[idx]
        layer = np.array([n.layer for n in nodes], np.int16)[idx]
        head = np.array([-1 if n.head is None else n.head for n in nodes], np.int16)[idx]
        comp = pa.DictionaryArray.from_arrays(pa.array(code), pa.array(comps)).cast(pa.string())
        return comp, pa.array(layer), pa.array(head, mask=head < 0)

    src_cols, dst_cols = node_columns(graph.src, s_idx), node_columns(graph.dst, d_idx)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    written = 0
    for shard in range(n_prompts // SHARD):
        approx = rng.standard_normal((SHARD, n_edges)).astype(np.float32)
        exact = approx + NOISE * rng.standard_normal((SHARD, n_edges)).astype(np.float32)
        prompt = np.repeat(np.arange(shard * SHARD, (shard + 1) * SHARD, dtype=np.int32), n_edges)
        for method, scores in (("edge_attribution", approx), ("edge_activation", exact)):
            n = scores.size
            table = pa.Table.from_arrays([
                pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int8)), pa.array(["denoise"])).cast(pa.string()),
                *[pa.concat_arrays([c] * SHARD) for c in src_cols], *[pa.concat_arrays([c] * SHARD) for c in dst_cols],
                pa.nulls(n, pa.int16()), pa.array(prompt), pa.array(np.ones(n, np.int32)), pa.array(scores.ravel()),
            ], schema=EDGE_SCHEMA)
            res.write_table(part_path("edges", "gpt2-small", "ioi", method, shard), table)
            written += n
    res.write_json("manifest.json", {"models": {"gpt2-small": {"source": "gpt2", "n_params": 124439808,
                                                               "d_model": 768}}})
    return {"rows": written, "prompts": n_prompts, "edges": n_edges, "write_s": time.perf_counter() - t0,
            "bytes": sum(f.stat().st_size for f in root.rglob("*.parquet"))}


def summarise(root: Path) -> dict:
    """The sweep's end-of-sweep step on ``root`` (this process is fresh: its peak RSS is the step's)."""
    from attrpatch.results import ResultsRoot
    from sweeps.config import OutputOptions, SweepConfig, WandbOptions
    from sweeps.driver import SweepReport
    from sweeps.summary import summarise as run

    cfg = SweepConfig(name="scale", methods=("edge_attribution", "edge_activation"),
                      wandb=WandbOptions(mode="offline"), output=OutputOptions(root=str(root)))
    report = SweepReport(cfg, ResultsRoot(str(root)), records=[], ran=0, skipped=0, wall_s=0, dispatch_s=0)
    t0 = time.perf_counter()
    run(report)
    seconds = time.perf_counter() - t0
    rows = [r for r in report.correlations if r["kind"] == "head_out->head_q"]
    return {"summary_s": seconds, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "pearson": rows[0]["pearson"] if rows else None, "pairs": sum(r["n"] for r in report.correlations),
            "plots": len(report.plots), "wandb": len(report.wandb_dirs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=float, default=1e8, help="edge rows in the synthetic root (both methods)")
    ap.add_argument("--keep", default=None, help="write the root here and keep it (default: a temporary one)")
    ap.add_argument("--summarise-only", default=None, help=argparse.SUPPRESS)  # the fresh child process
    args = ap.parse_args()
    if args.summarise_only:
        print(json.dumps(summarise(Path(args.summarise_only))))
        return
    root = Path(args.keep or tempfile.mkdtemp(prefix="attrpatch-summary-")) / "root"
    if (root / "manifest.json").exists():
        print(f"reusing {root}")
        info = {"rows": None}
    else:
        info = write_root(root, args.rows)
        print(f"wrote {info['rows']:,} edge rows ({info['prompts']} prompts × {info['edges']:,} edges × 2 methods) "
              f"in {info['write_s']:.0f} s: {info['bytes'] / 1e9:.2f} GB of Parquet", flush=True)
    out = subprocess.run([sys.executable, __file__, "--summarise-only", str(root)], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "WANDB_SILENT": "true"})
    if out.returncode != 0:
        raise SystemExit(out.stdout + out.stderr)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"end-of-sweep step: {res['summary_s']:.0f} s, peak RSS {res['peak_gib']:.2f} GiB (goal < 4 GiB); "
          f"{res['pairs']:,} pairs compared; Pearson {res['pearson']:.4f} (designed {1 / np.sqrt(1 + NOISE**2):.4f}); "
          f"{res['plots']} figures, {res['wandb']} W&B run(s)")
    if res["peak_gib"] >= 4:
        raise SystemExit("the end-of-sweep step used more than 4 GiB")


if __name__ == "__main__":
    main()
