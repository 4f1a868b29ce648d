"""Attribution patching of every node kind: attrpatch vs TransformerLens 4.3 ``attribution_patch`` vs the floor.

    .venv/bin/python bench/bench_attribution.py              # GPT-2-small shape, batch 8 (ioi_seed8, 15 tokens)
    .venv/bin/python bench/bench_attribution.py --repeats 3 --threads 2
    .venv/bin/python bench/bench_attribution.py --device cuda --quick   # on a GPU, fewer rounds

A random GPT-2 with GPT-2 small's shape (12 layers, d_model 768, 12 heads, real vocabulary) is saved to a
temporary directory and loaded with ``attrpatch.load_model``; the batch is the eight ``ioi_seed8`` prompts.
Timed, each the median of ``--repeats`` runs in this process:

(a) ours: ``run_method("attribution")`` — all 12 node kinds (embed … head_pattern), per prompt and
    position, direction ``denoise``;
(b) TransformerLens: ``attribution_patch(granularity="node")`` on the bridge over the same 8 pairs (it
    scores embed, every head's z and every mlp_out, per position; it loops over prompts internally, and
    here it is called once per prompt so each call gets its own answer tokens — the same work);
(c) the floor: forward(clean, no grad) + forward(corrupted) + one backward to the embeddings, with no
    scoring at all, measured on the bridge (``hook_embed`` is the gradient target) and on
    ``attrpatch.engine``. The "vs floor" goal uses the engine floor, the faster (stricter) of the two.

The runs are interleaved (floor, ours, bridge floor; then ours, TL, floor) round after round, and each ratio is
the median of the per-round ratios, so a shared machine's changing load affects both sides alike.

Both libraries' scores are compared on what they share (max |difference| printed). Ratios are measured in
this run on a machine that may be shared: compare them, not the absolute seconds.

``--device cuda``: the model (and so TransformerLens' bridge) and the tokens live on the GPU; every timer is
read after ``torch.cuda.synchronize()``; the card is named in the output. ``run_method`` gets the batch on
the CPU, as the sweep passes it, and moves the tokens itself (inside its timing). ``--quick``: 2 rounds and 1
TL round (a smoke run, or a GPU check with a time box).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformer_lens.tools.analysis.attribution_patching import attribution_patch
from transformers import GPT2Config, GPT2LMHeadModel

from attrpatch import load_model, make_batch
from attrpatch.components import hook_name
from attrpatch.engine import weights
from attrpatch.methods import MethodConfig, run_method
from attrpatch.testing import batch_on, bench_device, device_line, floor, grad_through, sync, write_json


def random_gpt2_small(path: str) -> str:
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=12, n_head=12, n_embd=768)).eval().save_pretrained(path)
    return path


def timed(fn, device) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def interleaved(fns: dict, rounds: int, device) -> tuple[dict[str, list[float]], dict]:
    """Run every function once per round, round after round, so that a shared machine's changing load
    hits all of them alike; ratios are then taken within a round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    outs = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            t, outs[name] = timed(fn, device)
            times[name].append(t)
    return times, outs


def ours(model, batch):
    return run_method("attribution", model, batch, MethodConfig(directions=("denoise",)))


def tl(model, batch):
    scores = []
    pos, ans, wrong = (t.tolist() for t in (batch.answer_pos, batch.answer_ids, batch.wrong_ids))
    with grad_through(model):
        for i, (ap, a, wr) in enumerate(zip(pos, ans, wrong, strict=True)):
            res = attribution_patch(model.bridge, batch.clean_tokens[i:i + 1], batch.corrupt_tokens[i:i + 1],
                                    lambda lg, ap=ap, a=a, wr=wr: lg[0, ap, a] - lg[0, ap, wr])
            scores.append(res.node_scores)
    return scores


def floor_bridge(model, batch):
    bridge = model.bridge
    rows = torch.arange(len(batch), device=batch.clean_tokens.device)
    with torch.no_grad():
        bridge(batch.clean_tokens)
    live = {}

    def capture(t, hook):
        live["embed"] = t

    with grad_through(model), bridge.hooks(fwd_hooks=[(hook_name("embed"), capture)]):
        final = bridge(batch.corrupt_tokens)[rows, batch.answer_pos]
        metric = final[rows, batch.answer_ids] - final[rows, batch.wrong_ids]
        return torch.autograd.grad(metric.sum(), [live["embed"]])


def compare(result, tl_scores) -> tuple[float, float, int]:
    """Max |ours − TL| over the shared nodes, the largest |score|, and how many nodes were compared."""
    by = {n.component: n.scores for n in result.nodes}
    diff, top, count = 0.0, 0.0, 0
    for i, node_scores in enumerate(tl_scores):
        for node, value in node_scores.items():
            if node.kind == "embed":
                mine = by["embed"][i, node.position]
            elif node.kind == "mlp_out":
                mine = by["mlp_out"][i, node.layer, node.position]
            else:
                mine = by["head_out"][i, node.layer, node.head, node.position]
            diff, top, count = max(diff, abs(float(mine) - value)), max(top, abs(value)), count + 1
    return diff, top, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--tl-repeats", type=int, default=3, help="timed TL runs (each is 8 prompts)")
    # One thread: on a CPU shared with other jobs, two-thread ops wait on each other and the same forward
    # varied 6-19 s between runs here; one thread ran it in 1.9 s +- 5%.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the model and tokens live")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 1 TL round (overrides --repeats, --tl-repeats)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.tl_repeats = 2, 1
    torch.set_num_threads(args.threads)
    device = bench_device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(random_gpt2_small(tmp), device=args.device)
    batch = make_batch("ioi_seed8", model.tokenizer, n_prompts=8)
    on_dev = batch_on(batch, device)  # tokens on the device, for TL and the floors
    print(device_line(device))
    print(f"model: 12 layers, d_model 768, 12 heads; batch {len(batch)} x {batch.n_pos} tokens; "
          f"torch threads {torch.get_num_threads()}")
    ours(model, batch), floor(weights(model), on_dev), floor_bridge(model, on_dev)  # warm-up
    fast, outs = interleaved({"engine": lambda: floor(weights(model), on_dev), "ours": lambda: ours(model, batch),
                              "bridge": lambda: floor_bridge(model, on_dev)}, args.repeats, device)
    slow, tl_outs = interleaved({"ours": lambda: ours(model, batch), "tl": lambda: tl(model, on_dev),
                                 "engine": lambda: floor(weights(model), on_dev)}, args.tl_repeats, device)
    diff, top, count = compare(outs["ours"], tl_outs["tl"])
    med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    ratio = lambda a, b, t: statistics.median(x / y for x, y in zip(t[a], t[b], strict=True))  # noqa: E731
    n_scores = sum(n.scores.numel() for n in outs["ours"].nodes)
    print(f"medians over {args.repeats} interleaved rounds (TL: {args.tl_repeats} rounds with ours); ratios are "
          "medians of per-round ratios")
    print(f"(a) ours, all 12 kinds ({n_scores} scores):  {med(fast['ours']):8.1f} ms")
    print(f"(b) TransformerLens attribution_patch node:    {med(slow['tl']):8.1f} ms   ({count} scores)")
    print(f"(c) floor fwd+fwd+bwd, engine:                 {med(fast['engine']):8.1f} ms")
    print(f"    floor fwd+fwd+bwd, bridge:                 {med(fast['bridge']):8.1f} ms")
    print(f"speed-up vs TL: {ratio('tl', 'ours', slow):.1f}x   (goal >= 50x); the ceiling for any method that "
          f"needs fwd+fwd+bwd is TL / engine floor = {ratio('tl', 'engine', slow):.1f}x")
    print(f"ours / engine floor: {ratio('ours', 'engine', fast):.2f}x   (goal <= 1.5x);  "
          f"ours / bridge floor: {ratio('ours', 'bridge', fast):.2f}x")
    print(f"agreement with TL on {count} shared scores: max |diff| = {diff:.2e} (largest |score| {top:.2e})")
    write_json(args.json, {
        "bench": "attribution", "device": device_line(device), "rounds": args.repeats, "tl_rounds": args.tl_repeats,
        "ours_s": med(fast["ours"]) / 1e3, "tl_s": med(slow["tl"]) / 1e3, "floor_engine_s": med(fast["engine"]) / 1e3,
        "floor_bridge_s": med(fast["bridge"]) / 1e3, "vs_tl": ratio("tl", "ours", slow),
        "tl_per_floor": ratio("tl", "engine", slow), "ours_per_floor": ratio("ours", "engine", fast),
        "ours_per_bridge_floor": ratio("ours", "bridge", fast), "n_scores": n_scores, "tl_scores": count,
        "max_diff": diff, "max_score": top, "equal": diff <= 1e-4 * max(1.0, top)})
    if diff > 1e-4 * max(1.0, top):
        raise SystemExit("ours and TransformerLens disagree")


if __name__ == "__main__":
    main()
