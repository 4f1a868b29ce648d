"""Edge attribution patching speed on a GPT-2-small-shaped random model; every ratio is measured in this run.

    .venv/bin/python bench/bench_edges.py                       # the Demo's 8 IOI prompts (15 tokens), all baselines
    .venv/bin/python bench/bench_edges.py --tl-prompts 2 --loop-fraction 0.25
    .venv/bin/python bench/bench_edges.py --device cuda --quick   # on a GPU: 1 repeat, a 0.2 % exact subset

Baselines, all producing the 32,491 edge scores of the same batch:

* floor: a plain engine forward on the patch input + forward and backward on the run input (no split, no
  scores): the least any gradient-based edge method can cost.
* ACDC++ loop: the nested loop of Syed et al.'s ``acdc_nodes(mode="edge")`` (every upstream × downstream
  component pair, skip the wrong-order ones, one ``(grad · (clean − corrupt)).sum().item()`` per edge) on
  caches made with TransformerLens hooks on the bridge. With ``--loop-fraction f < 1`` a uniform random f of
  the pairs is timed and the loop time is divided by f (stated in the output).
* TransformerLens 4.3 ``attribution_patch(granularity="edge")``, which loops over prompts internally; it is
  timed on ``--tl-prompts`` prompts and scaled linearly to the batch (stated in the output).

attrpatch's EAP is timed at the default granularity (per prompt and per position) and summed (the ACDC++
granularity). Timings are medians of ``--repeats`` runs after a warm-up.

``--device cuda``: the model (and TransformerLens' bridge), the caches and the tokens live on the GPU, every
timer is read after ``torch.cuda.synchronize()``, and the card is named. The methods get the batch on the CPU,
as the sweep passes it, and move the tokens themselves. ``--quick``: one repeat and an exact-patching subset
of 0.2 % of the edges.
"""

from __future__ import annotations

import argparse
import itertools
import random
import resource
import statistics
import tempfile
import time

import torch
from transformer_lens.tools.analysis.attribution_patching import (
    EdgeAttributionConfig,
    _edge_hook_flags,
    _edge_hook_names,
    _writer_hook_names,
    attribution_patch,
    cache_activation_and_gradient,
)
from transformer_lens.tools.analysis.attribution_patching import Node as TLNode
from transformers import GPT2Config, GPT2LMHeadModel

from attrpatch import load_model, make_batch
from attrpatch.components import Node
from attrpatch.engine import weights
from attrpatch.graph import EdgeGraph
from attrpatch.methods.core import edge_scores
from attrpatch.methods.eap_ig import eap_ig_scores
from attrpatch.methods.edge_activation import choose_edges, exact_edge_scores
from attrpatch.testing import batch_on, bench_device, device_line, floor, grad_through, sync, write_json

DEVICE = torch.device("cpu")  # set by main (--device); every timer is read after sync(DEVICE)


def clock() -> float:
    sync(DEVICE)
    return time.perf_counter()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = clock()
        fn()
        times.append(clock() - t)
    return statistics.median(times)


def with_bridge_grads(model, fn):
    with grad_through(model):
        return fn()


def acdcpp_caches(model, batch):
    """The three caches of ACDC++'s ``get_3_caches`` (clean, corrupted, gradients), via TL hooks."""
    n_layers = model.bridge.cfg.n_layers

    def metric(logits):
        rows = torch.arange(len(batch), device=logits.device)
        final = logits[rows, batch.answer_pos]
        return (final[rows, batch.answer_ids] - final[rows, batch.wrong_ids]).sum()

    names = _edge_hook_names(n_layers) + _writer_hook_names(n_layers)

    def run():
        with _edge_hook_flags(model.bridge):
            clean = cache_activation_and_gradient(model.bridge, batch.clean_tokens, metric, names,
                                                  compute_gradient=False)
            corrupt = cache_activation_and_gradient(model.bridge, batch.corrupt_tokens, metric, names)
        return clean.activations, corrupt.activations, corrupt.gradients

    return with_bridge_grads(model, run)


def acdcpp_pairs(n_layers: int, n_heads: int):
    """ACDC++'s component lists: (hook name, head index or None, layer) for upstream and downstream."""
    writers = _writer_hook_names(n_layers)
    up = [(writers[0], None, -1)]
    down = []
    for layer in range(n_layers):
        up += [(writers[1 + 2 * layer], h, layer) for h in range(n_heads)] + [(writers[2 + 2 * layer], None, layer)]
        for kind in ("q_input", "k_input", "v_input"):
            down += [(TLNode(kind=kind, position=0, layer=layer, head=h).hook_name, h, layer) for h in range(n_heads)]
        down.append((TLNode(kind="mlp_in", position=0, layer=layer).hook_name, None, layer))
    down.append((TLNode(kind="logits", position=0, layer=n_layers - 1).hook_name, None, n_layers))
    return list(itertools.product(up, down))


def acdcpp_loop(caches, pairs) -> int:
    """The ACDC++ edge loop, literally: skip wrong-order pairs, one product-sum-item per edge."""
    clean, corrupt, grad = caches
    results = {}
    for (u_name, u_head, u_layer), (d_name, d_head, d_layer) in pairs:
        if u_layer > d_layer:
            continue
        if u_layer == d_layer and (u_name.endswith("mlp_out") or d_name.endswith(("q_input", "k_input", "v_input"))):
            continue
        u_idx = (slice(None), slice(None), u_head) if u_head is not None else (slice(None),)
        d_idx = (slice(None), slice(None), d_head) if d_head is not None else (slice(None),)
        value = (grad[d_name][d_idx] * (clean[u_name][u_idx] - corrupt[u_name][u_idx])).sum()
        results[(u_name, u_head, d_name, d_head)] = value.item()
    return len(results)


def compare_tl(ours, tl_results, graph: EdgeGraph) -> tuple[float, float]:
    """Max |ours − TL| over every edge and position of the prompts TL ran, and the largest |TL score|."""
    kinds = {"embed": "embed", "attn_head_out": "head_out", "mlp_out": "mlp_out", "q_input": "head_q",
             "k_input": "head_k", "v_input": "head_v", "mlp_in": "mlp_in", "logits": "logits"}

    def ours_node(node):
        kind = kinds[node.kind]
        return Node(kind, graph.n_layers if kind == "logits" else (node.layer or 0), node.head)

    si = {n: i for i, n in enumerate(graph.src)}
    di = {n: i for i, n in enumerate(graph.dst)}
    diff = top = 0.0
    for i, res in enumerate(tl_results):
        mine = ours[i].cpu()
        for (u, v), value in res.edge_scores.items():
            got = float(mine[u.position, si[ours_node(u)], di[ours_node(v)]])
            diff, top = max(diff, abs(got - value)), max(top, abs(value))
    return diff, top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--task", default="ioi_seed8", help="the Demo's 8 IOI prompts: 15 tokens each")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tl-prompts", type=int, default=1, help="prompts TL's edge attribution is timed on")
    parser.add_argument("--loop-fraction", type=float, default=1.0, help="fraction of ACDC++ pairs timed")
    parser.add_argument("--exact-subset", type=float, default=0.01, help="edge fraction for exact patching")
    # One thread: on a shared 2-core host, two OpenMP threads spin-wait on each other (4x slower, noisier).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the model and tokens live")
    parser.add_argument("--quick", action="store_true", help="1 repeat, --exact-subset 0.002")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.exact_subset = 1, 0.002
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = device = bench_device(args.device)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        GPT2LMHeadModel(GPT2Config()).save_pretrained(tmp)  # gpt2-small shape: 12 layers, 768 wide, 12 heads
        model = load_model(tmp, device=args.device)
    w = weights(model)
    graph = EdgeGraph.of(w)
    batch = make_batch(args.task, model.tokenizer, n_prompts=args.prompts, seed=0)
    on_dev = batch_on(batch, device)  # tokens on the device, for the floor, ACDC++ and TL
    print(device_line(device))
    print(f"model: random GPT-2 small shape ({w.n_layers} layers, d_model {w.d_model}, {w.n_heads} heads); "
          f"{len(batch)} {args.task} prompts, {batch.n_pos} positions; {graph.n_edges} edges; "
          f"torch threads {torch.get_num_threads()}")

    t_floor = timed(lambda: floor(w, on_dev), args.repeats)
    t_ours = timed(lambda: edge_scores(w, batch, directions=("denoise",), per_prompt=True, per_position=True), args.repeats)
    t_sum = timed(lambda: edge_scores(w, batch, directions=("denoise",), per_prompt=False, per_position=False), args.repeats)
    print(f"floor (fwd + fwd + bwd)              {t_floor:8.3f} s")
    print(f"EAP per prompt & position            {t_ours:8.3f} s   {t_ours / t_floor:5.2f}x the floor")
    print(f"EAP summed (prompts, positions)      {t_sum:8.3f} s   {t_sum / t_floor:5.2f}x the floor")

    # ACDC++: caches, then the loop (optionally timed on a random fraction of the pairs).
    t_cache = timed(lambda: acdcpp_caches(model, on_dev), 1)
    caches = acdcpp_caches(model, on_dev)
    pairs = acdcpp_pairs(w.n_layers, w.n_heads)
    if args.loop_fraction < 1:
        pairs = random.Random(0).sample(pairs, int(len(pairs) * args.loop_fraction))
    t = clock()
    n_scored = acdcpp_loop(caches, pairs)
    t_loop = (clock() - t) / args.loop_fraction
    del caches
    t_acdcpp = t_cache + t_loop
    note = "" if args.loop_fraction >= 1 else f" (timed on {args.loop_fraction:.0%} of the pairs, scaled)"
    print(f"ACDC++ caches (TL hooks)             {t_cache:8.3f} s")
    print(f"ACDC++ edge loop ({n_scored} edges scored){note}  {t_loop:8.3f} s")
    print(f"ACDC++ total                         {t_acdcpp:8.3f} s   EAP summed is {t_acdcpp / t_sum:7.1f}x faster "
          f"(goal >= 1000x); scoring step alone: loop {t_loop:.3f} s vs "
          f"{max(t_sum - t_floor, 1e-9):.3f} s above the floor")

    # TransformerLens 4.3 edge attribution, per prompt (it loops over prompts itself), scaled to the batch.
    k = min(args.tl_prompts, len(batch))

    def tl_run():
        return [with_bridge_grads(model, lambda i=i, ap=ap, a=a, wr=wr: attribution_patch(
                    model.bridge, on_dev.clean_tokens[i:i + 1], on_dev.corrupt_tokens[i:i + 1],
                    lambda lg: lg[0, ap, a] - lg[0, ap, wr], EdgeAttributionConfig(granularity="edge")))
                for i, (ap, a, wr) in enumerate(zip(*(t[:k].tolist() for t in (
                    batch.answer_pos, batch.answer_ids, batch.wrong_ids)), strict=True))]

    t = clock()
    tl_res = tl_run()
    t_tl = (clock() - t) * len(batch) / k
    print(f"TL attribution_patch(edge)           {t_tl:8.3f} s   (timed on {k} prompt(s), scaled x{len(batch) / k:g}); "
          f"EAP per prompt & position is {t_tl / t_ours:6.1f}x faster (goal >= 50x)")
    diff, top = compare_tl(edge_scores(w, batch, directions=("denoise",))["denoise"], tl_res, graph)
    print(f"agreement with TL on {k} prompt(s), every edge and position: max |diff| = {diff:.2e} "
          f"(largest |score| {top:.2e})")

    # EAP-IG and exact edge patching, for scale.
    t_ig = timed(lambda: eap_ig_scores(w, batch, ("denoise",), steps=5, per_prompt=True, per_position=False), 1)
    print(f"EAP-IG, 5 steps, per prompt          {t_ig:8.3f} s   {t_ig / t_floor:5.2f}x the floor")
    keep = choose_edges(w, batch, "denoise", args.exact_subset, seed=0, max_rows=256)
    t = clock()
    exact_edge_scores(w, batch, "denoise", keep, per_prompt=True, per_position=False)
    t_exact = clock() - t
    n_keep = int(keep.sum())
    print(f"exact edge patching, {n_keep} edges      {t_exact:8.3f} s   {n_keep / t_exact:7.1f} edges/s "
          f"(all {graph.n_edges} edges would take ~{graph.n_edges / n_keep * t_exact / 60:.0f} min)")
    write_json(args.json, {
        "bench": "edges", "device": device_line(device), "repeats": args.repeats, "edges": graph.n_edges,
        "floor_s": t_floor, "eap_s": t_ours, "eap_summed_s": t_sum, "acdcpp_caches_s": t_cache,
        "acdcpp_loop_s": t_loop, "acdcpp_s": t_acdcpp, "loop_fraction": args.loop_fraction, "tl_s": t_tl,
        "tl_prompts": k, "eap_ig_s": t_ig, "exact_s": t_exact, "exact_edges": n_keep,
        "eap_per_floor": t_ours / t_floor, "vs_tl": t_tl / t_ours, "vs_acdcpp": t_acdcpp / t_sum,
        "loop_vs_scoring": t_loop / max(t_sum - t_floor, 1e-9), "tl_max_diff": diff, "tl_max_score": top,
        "equal": diff <= 1e-4 * max(1.0, top)})
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
          + (f"; peak CUDA memory allocated {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
             if device.type == "cuda" else ""))


if __name__ == "__main__":
    main()
