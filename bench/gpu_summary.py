"""The one table of ``bench/gpu_check.sh``: the card, the tests, the three method benches' figures against their
goals (issue 12), and the sweep's wall time and cells.

    .venv/bin/python bench/gpu_summary.py OUTDIR [--sweep-root ROOT]

Reads ``OUTDIR/stages.tsv`` (stage, status, seconds, note, written by gpu_check.sh), the benches' ``--json``
files (``attribution.json``, ``edges.json``, ``activation.json``), the pytest summary line from
``OUTDIR/gpu_check.log``, and the sweep's completion records under ``ROOT/_done``. Prints Markdown.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re


def load(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def goal(value: float | None, target: float, at_least: bool = True) -> str:
    if value is None:
        return "not measured"
    return "met" if (value >= target if at_least else value <= target) else "**not met**"


def equal(ok: bool | None, diff: float | None) -> str:
    if ok is None:
        return ""
    return f"equal (max abs diff {diff:.1e})" if ok else f"**NOT equal** (max abs diff {diff:.1e})"


def sweep_rows(root: str | None, seconds: str | None) -> list[str]:
    """Cells, devices and Σ compute from the completion records; the wall time is the stage's."""
    if not root or not os.path.isdir(os.path.join(root, "_done")):
        return []
    records = [load(p) for p in glob.glob(os.path.join(root, "_done", "**", "*.json"), recursive=True)]
    records = [r for r in records if r]
    cells: dict[str, int] = {}
    devices: set[str] = set()
    compute = 0.0
    for path in glob.glob(os.path.join(root, "_done", "**", "*.json"), recursive=True):
        m = re.search(r"model=([^/]+)/task=([^/]+)/([^/]+)/", path)
        if m:
            key = f"{os.path.basename(m.group(1))}/{m.group(3)}"
            cells[key] = cells.get(key, 0) + 1
    for r in records:
        compute += float(r.get("compute_s", 0.0))
        if r.get("device"):
            devices.add(str(r["device"]))
    by_model: dict[str, list[str]] = {}
    for key, n in sorted(cells.items()):
        model, what = key.split("/", 1)
        by_model.setdefault(model, []).append(f"{what.removeprefix('method=')} {n}")
    detail = "; ".join(f"{m}: {', '.join(v)}" for m, v in by_model.items())
    rows = []
    try:
        import csv

        with open(os.path.join(root, "plots", "compare.csv")) as f:
            for r in csv.DictReader(f):
                rows.append(f"| sweep: {r['method']} vs {r['reference']}, {r['model']}, {r['kind']} ({r['granularity']}) "
                            f"| Pearson {float(r['pearson']):+.3f}, Spearman {float(r['spearman']):+.3f} over "
                            f"{r['n_scores']} scores | | |")
    except (OSError, KeyError, ValueError):
        pass
    return [f"| sweep: wall (Ray start, model loads, summary included) | {seconds or '?'} s for {len(records)} cells "
            f"(Σ worker compute {compute:.1f} s; devices {', '.join(sorted(devices)) or '?'}) | | {detail} |", *rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--sweep-root", default=None)
    args = ap.parse_args()
    out = args.outdir
    stages: dict[str, tuple[str, str, str]] = {}
    if os.path.exists(os.path.join(out, "stages.tsv")):
        for line in open(os.path.join(out, "stages.tsv")):
            parts = (line.rstrip("\n").split("\t") + ["", "", "", ""])[:4]
            stages[parts[0]] = (parts[1], parts[2], parts[3])
    device, _, card = stages.get("device", ("cpu", "", "cpu"))
    atp, eap, act = (load(os.path.join(out, f"{n}.json")) for n in ("attribution", "edges", "activation"))
    line = next((b for b in (atp, eap, act) if b), {}).get("device", "")
    on_gpu = device == "cuda"
    print(f"## GPU check: {card if on_gpu else 'NO GPU: CPU smoke only (not GPU figures)'}\n")
    if line:
        print(f"{line}\n")
    print("| check | figure | goal | result |")
    print("|---|---|---|---|")

    tests = stages.get("tests")
    summary = ""
    try:
        text = open(os.path.join(out, "gpu_check.log"), errors="replace").read()
        found = re.findall(r"^=*\s*(\d+ (?:passed|failed)[^\n=]*?)\s*=*$", text, flags=re.M)
        summary = found[-1] if found else ""
    except OSError:
        pass
    if tests:
        print(f"| device-parametrised tests on {device} | {summary or tests[0]} ({tests[1]} s) | all pass | "
              f"{'ok' if tests[0] == 'ok' else '**' + tests[0] + '** ' + tests[2]} |")

    if atp:
        print(f"| AtP (all 12 node kinds) vs TransformerLens `attribution_patch` | {atp['vs_tl']:.1f}x faster "
              f"(ours {atp['ours_s'] * 1e3:.0f} ms, TL {atp['tl_s'] * 1e3:.0f} ms) | >= 50x | "
              f"{goal(atp['vs_tl'], 50)}; {equal(atp['equal'], atp['max_diff'])} |")
        print(f"| AtP / floor (fwd + fwd + bwd, engine) | {atp['ours_per_floor']:.2f}x (floor "
              f"{atp['floor_engine_s'] * 1e3:.0f} ms; TL / floor {atp['tl_per_floor']:.1f}x) | <= 1.5x | "
              f"{goal(atp['ours_per_floor'], 1.5, at_least=False)} |")
    elif "bench_attribution" in stages:
        print(f"| AtP bench | {' '.join(stages['bench_attribution'][::2])} | | no figures |")

    if eap:
        print(f"| EAP (per prompt and position) vs TransformerLens edge `attribution_patch` | {eap['vs_tl']:.1f}x "
              f"faster (ours {eap['eap_s']:.3f} s, TL {eap['tl_s']:.2f} s, timed on {eap['tl_prompts']} prompt(s) "
              f"and scaled) | >= 50x | {goal(eap['vs_tl'], 50)}; {equal(eap.get('equal'), eap.get('tl_max_diff'))} |")
        print(f"| EAP (summed) vs the ACDC++ loop (TL-hook caches + one `.item()` per edge) | {eap['vs_acdcpp']:.1f}x "
              f"faster (ours {eap['eap_summed_s']:.3f} s, ACDC++ {eap['acdcpp_s']:.2f} s: caches "
              f"{eap['acdcpp_caches_s']:.2f} s + loop {eap['acdcpp_loop_s']:.2f} s) | >= 1000x | "
              f"{goal(eap['vs_acdcpp'], 1000)} |")
        print(f"| EAP / floor | {eap['eap_per_floor']:.2f}x (floor {eap['floor_s'] * 1e3:.0f} ms) | <= 2x | "
              f"{goal(eap['eap_per_floor'], 2, at_least=False)} |")
        print(f"| EAP-IG (5 steps); exact edge patching | {eap['eap_ig_s']:.2f} s; {eap['exact_edges']} edges in "
              f"{eap['exact_s']:.2f} s ({eap['exact_edges'] / eap['exact_s']:.0f} edges/s) | | |")
    elif "bench_edges" in stages:
        print(f"| EAP bench | {' '.join(stages['bench_edges'][::2])} | | no figures |")

    if act:
        for g in act["grids"]:
            print(f"| activation patching vs TL `get_act_patch_{g['name']}` ({g['cells']} cells) | {g['ratio']:.1f}x "
                  f"(ours {g['ours_s']:.2f} s, TL {g['tl_s']:.1f} s extrapolated from {act['tl_cells']} cells) | "
                  f">= 8x | {goal(g['ratio'], 8)}; {equal(g['max_diff'] < 1e-4, g['max_diff'])} |")
        print(f"| activation patching, {len(act['grids'])} grids | {act['tl_total_s'] / act['ours_sum_s']:.1f}x "
              f"(ours {act['ours_sum_s']:.1f} s as separate calls, TL {act['tl_total_s']:.0f} s) | >= 8x on every grid | "
              f"{goal(min(g['ratio'] for g in act['grids']), 8)} (lowest {min(g['ratio'] for g in act['grids']):.1f}x) |")
    elif "bench_activation" in stages:
        print(f"| activation bench | {' '.join(stages['bench_activation'][::2])} | | no figures |")

    sweep = stages.get("sweep")
    if sweep and sweep[0] == "skipped":
        print(f"| sweep (one GPU, fractional workers) | not run: {sweep[2]} | | |")
    elif sweep:
        rows = sweep_rows(args.sweep_root, sweep[1])
        print(*(rows or [f"| sweep | {sweep[0]} after {sweep[1]} s, no completion records | | |"]), sep="\n")
        if sweep[0] != "ok":
            print(f"| sweep status | **{sweep[0]}** {sweep[2]} | | |")

    print("\nstages: " + ", ".join(f"{k} {v[0]} ({v[1]} s)" for k, v in stages.items() if k != "device"))
    setup = stages.get("setup")
    if setup:
        print(f"set-up: {setup[2]}")


if __name__ == "__main__":
    main()
