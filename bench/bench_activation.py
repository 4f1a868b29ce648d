"""Exhaustive activation patching, every TransformerLens granularity: attrpatch vs TransformerLens 4.3 ``patching``.

    .venv/bin/python bench/bench_activation.py                 # GPT-2-small shape, batch 8 IOI prompts of 15 tokens
    .venv/bin/python bench/bench_activation.py --tl-cells 0    # time TL on every cell (hours on 2 CPUs)
    .venv/bin/python bench/bench_activation.py --grids layer,head_by_pos   # some grids (names or groups)
    .venv/bin/python bench/bench_activation.py --device cuda --quick       # on a GPU: 8 TL cells a grid

A random GPT-2 with GPT-2 small's shape (12 layers, d_model 768, 12 heads, real vocabulary) is saved to a
temporary directory and loaded with ``attrpatch.load_model``; the batch is the eight ``ioi_seed8`` prompts
(15 tokens each), direction ``denoise`` (TL's). For each granularity we time ``run_method("activation")``
on the whole grid, and TransformerLens' ``get_act_patch_<name>`` (``reduce="none"``, per prompt) on the
bridge. TL runs one full forward per cell, and a full grid takes over an hour here, so by default TL is
timed on ``--tl-cells`` random cells per granularity (via TL's own ``index_df``) and its time per cell is
multiplied by the number of cells in TL's grid: the TL column is then an extrapolation, and the output says
so. TL's results on those cells are compared with ours (max |difference| printed; must be < 1e-4).
The composites (``block_every``, ``attn_head_*_every``) call their parts in TL; their rows are sums (printed
when every part was measured).

``--grids``: a comma list of TL grid names and/or groups (``layer``: resid_pre/resid_mid/attn_out/mlp_out;
``head_by_pos``: attn_head_{out,q,k,v}_by_pos; ``pattern_by_pos``; ``dest_src``: the dest × src grid;
``all_pos``: attn_head_{out,q,k,v,pattern}_all_pos; ``all``, the default: all 15). ``--device cuda``: the
model (and TL's bridge), the clean cache and the tokens live on the GPU, timers are read after
``torch.cuda.synchronize()``, and the card is named; ``run_method`` gets the batch on the CPU, as the sweep
passes it. ``--quick``: 8 TL cells per grid and no one-call total (a smoke run, or a GPU check with a time box).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import pandas as pd
import torch
from transformer_lens import patching
from transformers import GPT2Config, GPT2LMHeadModel

from attrpatch import load_model, make_batch
from attrpatch.methods import method_config, run_method
from attrpatch.methods.activation import COMPOSITES, GRANULARITIES
from attrpatch.metrics import logit_diff
from attrpatch.testing import batch_on, bench_device, device_line, sync, write_json

# TL's grid axes in TL's index order, in our axis names.
TL_AXES = {
    **{k: ("layer", "pos") for k in ("resid_pre", "resid_mid", "attn_out", "mlp_out")},
    **{f"attn_head_{t}_by_pos": ("layer", "pos", "head") for t in ("out", "q", "k", "v")},
    **{f"attn_head_{t}_all_pos": ("layer", "head") for t in ("out", "q", "k", "v", "pattern")},
    "attn_head_pattern_by_pos": ("layer", "head", "pos"),
    "attn_head_pattern_dest_src_pos": ("layer", "head", "pos", "src_pos"),
}
GROUPS = {
    "layer": ("resid_pre", "resid_mid", "attn_out", "mlp_out"),
    "head_by_pos": tuple(f"attn_head_{t}_by_pos" for t in ("out", "q", "k", "v")),
    "pattern_by_pos": ("attn_head_pattern_by_pos",),
    "dest_src": ("attn_head_pattern_dest_src_pos",),
    "all_pos": tuple(f"attn_head_{t}_all_pos" for t in ("out", "q", "k", "v", "pattern")),
    "all": tuple(TL_AXES),
}


def chosen_grids(spec: str) -> list[str]:
    """The TL grid names of ``--grids`` (names and groups), in TL_AXES order."""
    want = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part not in GROUPS and part not in TL_AXES:
            raise SystemExit(f"--grids: unknown {part!r}; use groups {sorted(GROUPS)} or names {list(TL_AXES)}")
        want.update(GROUPS.get(part, (part,)))
    return [name for name in TL_AXES if name in want]


def random_gpt2_small(path: str) -> str:
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=12, n_head=12, n_embd=768)).eval().save_pretrained(path)
    return path


def time_ours(model, batch, names, max_rows, device) -> tuple[float, dict]:
    cfg = method_config("activation", directions=("denoise",), max_rows=max_rows, granularities=tuple(names))
    sync(device)
    t0 = time.perf_counter()
    result = run_method("activation", model, batch, cfg)
    sync(device)
    return time.perf_counter() - t0, result


def time_tl(model, batch, clean_cache, name, n_cells, gen) -> tuple[float, int, pd.DataFrame, torch.Tensor]:
    """TL on ``n_cells`` random cells of its grid (all when 0): (seconds per cell, grid size, cells, effect)."""
    axes = TL_AXES[name]
    sizes = {"layer": model.bridge.cfg.n_layers, "head": model.bridge.cfg.n_heads, "pos": batch.n_pos,
             "src_pos": batch.n_pos}
    shape = [sizes[a] for a in axes]
    total = int(torch.tensor(shape).prod())
    flat = torch.randperm(total, generator=gen)[:n_cells] if n_cells else torch.arange(total)
    cells = torch.stack(torch.unravel_index(flat, shape), 1)
    df = pd.DataFrame(cells.numpy(), columns=list(axes))
    fn = getattr(patching, f"get_act_patch_{name}")
    device = batch.corrupt_tokens.device
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        res = fn(model.bridge, batch.corrupt_tokens, clean_cache, lambda logits: logit_diff(logits, batch),
                 index_axis_names=None, index_df=df, reduce="none", baseline=True)
        effect = res.effect().T.cpu()  # [prompt, cell]
        per_cell = (time.perf_counter() - t0) / len(df)
    return per_cell, total, df, effect


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tl-cells", type=int, default=24, help="TL cells timed per granularity (0 = every cell)")
    ap.add_argument("--max-rows", type=int, default=256, help="attrpatch rows per forward (MethodConfig.max_rows)")
    # One thread: this 2-core box is shared, and oversubscribed threads made one forward ~10x slower in our runs.
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both sides (0 = torch default)")
    ap.add_argument("--task", default="ioi_seed8", help="ioi_seed8 (the demo's 8 prompts, 15 tokens) or ioi")
    ap.add_argument("--corruption", default=None, help="the task's corruption (None = its default)")
    ap.add_argument("--grids", default="all", help="comma list of TL grid names and/or groups " + str(sorted(GROUPS)))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the model and tokens live")
    ap.add_argument("--quick", action="store_true", help="8 TL cells per grid (unless --tl-cells is given), no "
                    "one-call total")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    names = chosen_grids(args.grids)
    if args.quick and args.tl_cells == ap.get_default("tl_cells"):
        args.tl_cells = 8
    if args.threads:
        torch.set_num_threads(args.threads)
    device = bench_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(random_gpt2_small(tmp), device=args.device)
    batch = make_batch(args.task, model.tokenizer, n_prompts=8, seed=0, corruption=args.corruption)
    on_dev = batch_on(batch, device)  # tokens on the device, for TL
    differ = (batch.clean_tokens != batch.corrupt_tokens).any(0).nonzero()[:, 0].tolist()
    print(device_line(device))
    print(f"model: random GPT-2 small shape (12 layers, d_model 768, 12 heads); task {args.task} "
          f"(corruption {args.corruption or 'default'}): {len(batch)} prompts, lengths {batch.lengths.tolist()}, "
          f"clean and corrupt differ at positions {differ}; direction denoise; torch threads "
          f"{torch.get_num_threads()}")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        _, clean_cache = model.bridge.run_with_cache(on_dev.clean_tokens)
    run_method("activation", model, batch.select([0]),  # warm-up (weights extraction, allocator)
               method_config("activation", granularities=("attn_head_q_all_pos",)))

    rows = []
    worst = 0.0
    for name in names:
        ours_s, result = time_ours(model, batch, [name], args.max_rows, device)
        per_cell, total, df, tl_effect = time_tl(model, on_dev, clean_cache, name, args.tl_cells, gen)
        scores = result.nodes[0].scores
        g_axes = GRANULARITIES[name].axes[1:]
        idx = tuple(torch.as_tensor(df[a].to_numpy().copy()) for a in g_axes)
        err = float((scores[(slice(None), *idx)] - tl_effect).abs().max())
        worst = max(worst, err)
        rows.append((name, total, per_cell * total, ours_s, err))
        print(f"{name:32s} cells {total:6d}  TL {per_cell * total:9.1f} s  ours {ours_s:7.2f} s  "
              f"ratio {per_cell * total / ours_s:7.1f}x  max|ours-TL| {err:.1e}", flush=True)
    times = {r[0]: r for r in rows}
    for comp, parts in COMPOSITES.items():
        if not all(p in times for p in parts):
            continue
        tl_s = sum(times[p][2] for p in parts)
        ours_s = sum(times[p][3] for p in parts)
        print(f"{comp:32s} (sum of parts)       TL {tl_s:9.1f} s  ours {ours_s:7.2f} s  ratio {tl_s / ours_s:7.1f}x")
    tl_total, ours_sum = sum(r[2] for r in rows), sum(r[3] for r in rows)
    note = ("TL times extrapolated from " + f"{args.tl_cells} random cells per granularity"
            if args.tl_cells else "TL timed on every cell")
    all_s = None
    if args.quick:
        print(f"TOTAL {len(names)} of {len(TL_AXES)} TL granularities: TL {tl_total:.1f} s ({note}); ours as separate "
              f"calls {ours_sum:.2f} s; ratio {tl_total / ours_sum:.1f}x (--quick: no one-call run)")
    else:
        all_s, _ = time_ours(model, batch, names, args.max_rows, device)
        print(f"TOTAL {len(names)} of {len(TL_AXES)} TL granularities: TL {tl_total:.1f} s ({note}); ours in one call "
              f"{all_s:.2f} s (sum of separate calls {ours_sum:.2f} s); ratio {tl_total / all_s:.1f}x")
    print(f"equal results: max |ours - TL| over the timed TL cells = {worst:.1e} ({'OK' if worst < 1e-4 else 'FAIL'})")
    write_json(args.json, {
        "bench": "activation", "device": device_line(device), "task": args.task, "tl_cells": args.tl_cells,
        "grids": [{"name": n, "cells": c, "tl_s": t, "ours_s": o, "ratio": t / o, "max_diff": e} for n, c, t, o, e in rows],
        "tl_total_s": tl_total, "ours_sum_s": ours_sum, "ours_one_call_s": all_s, "max_diff": worst,
        "equal": worst < 1e-4})


if __name__ == "__main__":
    main()
