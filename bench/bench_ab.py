"""This checkout's methods against an earlier commit's, in one process, interleaved round by round.

    .venv/bin/python bench/bench_ab.py                                   # against ee31e6e (before the one engine)
    .venv/bin/python bench/bench_ab.py --baseline REV --rounds 8 floor atp eap act:attn_head_pattern_by_pos
    .venv/bin/python bench/bench_ab.py --model ioi-tiny --task ioi --prompts 32 act    # one default-sweep shard

The earlier commit's ``attrpatch`` package is taken from git (``git archive REV attrpatch``) into a temporary
directory, renamed ``attrpatch_base`` (its own imports rewritten), and imported beside this checkout's package.
Both load the same model — by default a random GPT-2-small-shaped checkpoint (12 layers, d_model 768, 12 heads,
real vocabulary), else ``--model`` (a registered name or a checkpoint directory) — and the same prompts (by
default the 8 ``ioi_seed8`` prompts); one torch thread. Each round runs base and new back to back, alternating which goes
first; the printed ratios are medians of per-round ratios of wall time and of this process's CPU time (the CPU
time is the steadier one on a shared machine). What each name times:

* ``floor``: engine fwd(clean) + fwd(corrupted) + bwd to the embeddings;
* ``atp``: ``run_method("attribution")``, every node kind, per prompt and position, ``denoise``;
* ``eap`` / ``eap_sum``: the EAP edge loop per prompt and position / summed;
* ``act:<granularity>``: ``run_method("activation")`` on one activation-patching grid; ``act``: its default (every
  kind's own grids).

A ratio above 1 is a slow-down of this checkout. The API differences between the two commits are bridged here
(the earlier commit had ``MethodConfig(extra=…)`` and ``edge_attribution.eap_scores``).
"""

from __future__ import annotations

import argparse
import importlib
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BASELINE = "ee31e6e"  # the last commit before the one-engine / one-contract refactor
DEFAULT = ("floor", "atp", "eap", "eap_sum", "act:resid_pre", "act:attn_head_q_by_pos",
           "act:attn_head_pattern_by_pos")


def baseline_package(rev: str, into: Path) -> None:
    """``attrpatch`` at ``rev`` as the package ``attrpatch_base`` under ``into``."""
    archive = into / "base.tar"
    subprocess.run(["git", "archive", "-o", str(archive), rev, "attrpatch"], cwd=REPO, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    (into / "attrpatch").rename(into / "attrpatch_base")
    pattern = re.compile(r"\b(from|import) attrpatch\b")
    for path in (into / "attrpatch_base").rglob("*.py"):
        path.write_text(pattern.sub(r"\1 attrpatch_base", path.read_text()))


def setup(pkg: str, ckpt: str, task: str, prompts: int):
    """A function from a name above to a zero-argument callable that runs it with package ``pkg``."""
    m = importlib.import_module(pkg)
    eng = importlib.import_module(pkg + ".engine")
    meth = importlib.import_module(pkg + ".methods")
    model = m.load_model(ckpt)
    batch = m.make_batch(task, model.tokenizer, n_prompts=prompts, seed=0)
    w = eng.weights(model)
    rows = torch.arange(len(batch))

    def floor():  # attrpatch.testing.floor, but on ``pkg``'s engine (the earlier package has no such helper)
        with torch.no_grad():
            eng.forward(w, batch.clean_tokens, batch.answer_pos)
        leaf = {}

        def edit(kind, layer, x):
            if kind == "embed":
                x = leaf["x"] = x.detach().requires_grad_(True)
            return x

        with torch.enable_grad():
            logits = eng.forward(w, batch.corrupt_tokens, batch.answer_pos, edit)
            metric = (logits[rows, batch.answer_ids] - logits[rows, batch.wrong_ids]).sum()
            torch.autograd.grad(metric, [leaf["x"]])

    try:  # this checkout's API
        core = importlib.import_module(pkg + ".methods.core")
        edge_scores = core.edge_scores

        def eap(per):
            return edge_scores(w, batch, directions=("denoise",), per_prompt=per, per_position=per)

        def config(method, **options):
            return meth.method_config(method, directions=("denoise",), **options)
    except (ImportError, AttributeError):  # the earlier one
        ea = importlib.import_module(pkg + ".methods.edge_attribution")

        def eap(per):
            return ea.eap_scores(w, batch, ("denoise",), per_prompt=per, per_position=per)

        def config(method, **options):
            return meth.MethodConfig(directions=("denoise",), extra=options)

    fns = {"floor": floor, "atp": lambda: meth.run_method("attribution", model, batch, config("attribution")),
           "eap": lambda: eap(True), "eap_sum": lambda: eap(False)}

    def get(name):
        if name in fns:
            return fns[name]
        if name == "act":
            return lambda: meth.run_method("activation", model, batch, config("activation"))
        if name.startswith("act:"):
            grid = name.split(":", 1)[1]
            return lambda: meth.run_method("activation", model, batch, config("activation", granularities=(grid,)))
        raise SystemExit(f"unknown name {name!r}: one of floor, atp, eap, eap_sum, act, act:<granularity>")

    return get


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", default=DEFAULT)
    ap.add_argument("--baseline", default=BASELINE, help="the earlier commit (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--model", default=None, help="a registered model or checkpoint dir (default: random GPT-2 small)")
    ap.add_argument("--task", default="ioi_seed8")
    ap.add_argument("--prompts", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from attrpatch.testing import GPT2_SHAPES, save_random_gpt2

    with tempfile.TemporaryDirectory(prefix="attrpatch-ab-") as tmp:
        tmp = Path(tmp)
        baseline_package(args.baseline, tmp)
        sys.path.insert(0, str(tmp))
        ckpt = args.model or str(save_random_gpt2(tmp / "model", seed=0, scale=1.0, **GPT2_SHAPES["gpt2-small"]))
        get = {k: setup(pkg, ckpt, args.task, args.prompts) for k, pkg in (("base", "attrpatch_base"),
                                                                           ("new", "attrpatch"))}
        print(f"baseline {args.baseline} vs this checkout; {args.model or 'random GPT-2-small shape'}, "
              f"{args.prompts} {args.task} prompts, 1 thread; "
              f"medians of per-round ratios over {args.rounds} rounds", flush=True)
        for name in args.names:
            fn = {k: g(name) for k, g in get.items()}
            fn["base"](), fn["new"]()  # warm-up
            wall = {"base": [], "new": []}
            cpu = {"base": [], "new": []}
            for r in range(args.rounds):
                for k in ("base", "new") if r % 2 == 0 else ("new", "base"):
                    t, c = time.perf_counter(), time.process_time()
                    fn[k]()
                    wall[k].append(time.perf_counter() - t)
                    cpu[k].append(time.process_time() - c)
            w_ratio = statistics.median(n / b for n, b in zip(wall["new"], wall["base"], strict=True))
            c_ratio = statistics.median(n / b for n, b in zip(cpu["new"], cpu["base"], strict=True))
            print(f"{name:30s} wall base {statistics.median(wall['base']):7.3f} s new "
                  f"{statistics.median(wall['new']):7.3f} s new/base {w_ratio:.2f} | CPU base "
                  f"{statistics.median(cpu['base']):7.3f} s new {statistics.median(cpu['new']):7.3f} s "
                  f"new/base {c_ratio:.2f}", flush=True)


if __name__ == "__main__":
    main()
