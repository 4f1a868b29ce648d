"""Peak memory of edge attribution patching on a gpt2-xl-shaped random model (48 layers, 1600 wide, 25 heads).

    .venv/bin/python bench/bench_edges_xl_memory.py                    # the Demo's 8 IOI prompts (15 tokens), per prompt & position
    .venv/bin/python bench/bench_edges_xl_memory.py --no-per-position  # scores summed over positions
    .venv/bin/python bench/bench_edges_xl_memory.py --budget-scale 0.25  # a quarter of the memory budget

The weights are random tensors in the engine's layout (``attrpatch.engine.Weights``), made directly with no
Hugging Face model or bridge in between (that would hold a second 6 GB copy); the unembedding shares the
embedding's storage, as GPT-2 ties them. EAP then runs exactly as ``run_method("edge_attribution", …)`` does on a
loaded model (``core.edge_scores`` on the model's weights), chunking the prompts so a pass stays inside the
memory budget (``core.memory_budget``: the free RAM less a margin). Peak memory is the process's maximum resident set size (``getrusage``), which includes the
weights; the baseline line shows the RSS right after the weights were made.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from attrpatch import load_tokenizer, make_batch
from attrpatch.engine import random_weights
from attrpatch.graph import EdgeGraph
from attrpatch.methods.core import budget_scale, edge_bytes_per_row, edge_scores, memory_budget, rows_per_pass
from attrpatch.models import ModelShape


def gib_peak() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--task", default="ioi_seed8", help="the Demo's 8 IOI prompts: 15 tokens each")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--d-model", type=int, default=1600)
    parser.add_argument("--heads", type=int, default=25)
    parser.add_argument("--no-per-position", dest="per_position", action="store_false")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="scale the memory budget (core.budget_scale, as an out-of-memory retry does)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with budget_scale(args.budget_scale):
        run(args)


def run(args) -> None:
    t = time.perf_counter()
    shape = ModelShape(args.layers, args.heads, args.d_model, 4 * args.d_model, 50257, 1024)
    w = random_weights(shape)
    n_params = shape.n_params
    print(f"random weights: {n_params / 1e9:.2f} B parameters in {time.perf_counter() - t:.0f} s; "
          f"RSS after weights {gib_peak():.2f} GiB")
    batch = make_batch(args.task, load_tokenizer(), n_prompts=args.prompts, seed=0)
    graph = EdgeGraph.of(w)
    rows = rows_per_pass(edge_bytes_per_row(w, batch.n_pos), 256, w.device)
    print(f"{len(batch)} prompts x {batch.n_pos} positions; {graph.n_edges} edges "
          f"({graph.n_src} sources x {graph.n_dst} targets); {rows} prompt(s) per pass "
          f"(budget {memory_budget(w.device) / 2**30:.1f} GiB: the free RAM less a margin, x{args.budget_scale}); per position: "
          f"{args.per_position}")
    t = time.perf_counter()
    scores = edge_scores(w, batch, directions=("denoise",), per_prompt=True, per_position=args.per_position)["denoise"]
    elapsed = time.perf_counter() - t
    assert torch.isfinite(scores).all()
    print(f"EAP done in {elapsed:.0f} s; scores {tuple(scores.shape)} "
          f"({scores.numel() * scores.element_size() / 2**30:.2f} GiB); peak RSS {gib_peak():.2f} GiB")


if __name__ == "__main__":
    main()
