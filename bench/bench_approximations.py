"""The cost of AtP* (QK fix; with GradDrop) and RelP beside AtP and the fwd+fwd+bwd floor, same run.

    .venv/bin/python bench/bench_approximations.py              # GPT-2-small shape, batch 8 (ioi_seed8, 15 tokens)
    .venv/bin/python bench/bench_approximations.py --repeats 9 --threads 1
    .venv/bin/python bench/bench_approximations.py --device cuda --quick

A random GPT-2 with GPT-2 small's shape (12 layers, 12 heads, d_model 768, d_mlp 3072, the real vocabulary)
made directly in the engine's layout (``engine.random_weights``; no Hugging Face model), and the eight
``ioi_seed8`` prompts. Timed, all on the engine weights, direction ``denoise``, per prompt and position:

(a) AtP: ``core.atp_scores`` — every node kind (what ``run_method("attribution")`` computes);
(b) AtP* with the QK fix only: ``atp_star_scores`` — every kind, head_q / head_k by the exact pattern;
(c) AtP* with GradDrop: the same plus L partial backwards and L rescorings;
(d) RelP: ``relp_scores`` — every kind, the paper's rules (LN, GELU identity, AH);
(e) the floor: forward(clean, no grad) + forward(corrupted) + one backward to the embeddings, nothing scored.

Each round runs every function once, in that order; each ratio is the median over rounds of the per-round
ratio, so a shared machine's changing load hits both sides alike. Goals: QK fix ≤ 2× the floor, RelP ≤ 1.2×
AtP. Compare the ratios, not the absolute seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from attrpatch import load_tokenizer, make_batch
from attrpatch.engine import random_weights
from attrpatch.methods.atp_star import atp_star_scores
from attrpatch.methods.core import ATP_KINDS, atp_scores
from attrpatch.methods.relp import PAPER_RULES, relp_scores
from attrpatch.models import HUB_SHAPES
from attrpatch.testing import batch_on, bench_device, device_line, floor, sync, write_json

GPT2_SMALL = HUB_SHAPES["gpt2"]


def interleaved(fns: dict, rounds: int, device) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (medians)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (one: a shared CPU is steadier)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="2 rounds (overrides --repeats)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.repeats
    torch.set_num_threads(args.threads)
    device = bench_device(args.device)
    w = random_weights(GPT2_SMALL, seed=0, device=device)
    batch = batch_on(make_batch("ioi_seed8", load_tokenizer(), n_prompts=8), device)
    print(device_line(device))
    print(f"model: GPT-2 small shape (12 layers, 12 heads, d_model 768), random weights; batch {len(batch)} x "
          f"{batch.n_pos} tokens; every node kind, denoise, per prompt and position")
    fns = {
        "floor": lambda: floor(w, batch),
        "atp": lambda: atp_scores(w, batch, ATP_KINDS, ("denoise",)),
        "qk_fix": lambda: atp_star_scores(w, batch, ATP_KINDS, ("denoise",)),
        "grad_drop": lambda: atp_star_scores(w, batch, ATP_KINDS, ("denoise",), grad_drop=True),
        "relp": lambda: relp_scores(w, batch, ATP_KINDS, ("denoise",), PAPER_RULES),
    }
    for fn in fns.values():  # warm-up
        fn()
    times = interleaved(fns, rounds, device)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))  # noqa: E731
    print(f"medians over {rounds} interleaved rounds; ratios are medians of per-round ratios")
    labels = {"floor": "(e) floor fwd+fwd+bwd", "atp": "(a) AtP", "qk_fix": "(b) AtP*, QK fix",
              "grad_drop": "(c) AtP*, QK fix + GradDrop", "relp": "(d) RelP (LN, GELU, AH rules)"}
    for k in ("atp", "qk_fix", "grad_drop", "relp", "floor"):
        print(f"{labels[k]:34s} {med[k]:9.1f} ms   {ratio(k, 'floor'):5.2f}x floor   {ratio(k, 'atp'):5.2f}x AtP")
    figures = {f"{a}/{b}": ratio(a, b) for a in fns for b in ("floor", "atp") if a != b}
    print(f"QK fix / floor: {figures['qk_fix/floor']:.2f}x (goal <= 2x);  RelP / AtP: {figures['relp/atp']:.2f}x "
          f"(goal <= 1.2x);  GradDrop / AtP: {figures['grad_drop/atp']:.2f}x (L = {w.n_layers}: ~(L - 1)/2 extra "
          "backwards and L rescorings)")
    write_json(args.json, {"bench": "approximations", "device": device_line(device), "rounds": rounds,
                           "ms": med, "ratios": figures})


if __name__ == "__main__":
    main()
