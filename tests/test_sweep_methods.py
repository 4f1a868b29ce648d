"""Two small but real methods registered for the sweep tests only (workers import this module as a plugin).

    python -m pytest -q tests/test_sweep_methods.py

``sweep_test_resid_exact``: exact patching of ``resid_pre`` at every (layer, pos): restart the engine at
layer L from the corrupted residual stream with one position replaced by the clean one (denoise).
``sweep_test_resid_atp``: its attribution estimate, grad(metric on the corrupted run) · (clean − corrupt).
``sleep_s`` (their own option) makes a cell take longer (the fault tests need time to kill a worker mid-sweep).
Both are checked here against a slow literal loop, so the sweep tests run on trustworthy numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from attrpatch import make_batch
from attrpatch.engine import Start, forward, run_with_acts, weights
from attrpatch.methods import METHODS, MethodConfig, Options, register
from attrpatch.scores import MethodResult, NodeScores

EXACT, ATP = "sweep_test_resid_exact", "sweep_test_resid_atp"


@dataclass(frozen=True)
class SleepOptions(Options):
    sleep_s: float = 0.0  # seconds a cell waits after computing (fault tests kill workers mid-sweep)


def _ld(logits, batch, reps=1):
    ans = batch.answer_ids.repeat(reps)[:, None]
    wrong = batch.wrong_ids.repeat(reps)[:, None]
    return (logits.gather(1, ans) - logits.gather(1, wrong))[:, 0]


def _runs(batch, direction):
    return (batch.corrupt_tokens, batch.clean_tokens) if direction == "denoise" else (batch.clean_tokens, batch.corrupt_tokens)


def resid_exact(model, batch, cfg):
    """Exact resid_pre patching at every (layer, pos) (sweep tests only)."""
    w = weights(model)
    out = []
    for direction in cfg.directions:
        run, patch = _runs(batch, direction)
        with torch.no_grad():
            base, acts = run_with_acts(w, run, batch.answer_pos, kinds=("resid_pre",))
            _, src = run_with_acts(w, patch, batch.answer_pos, kinds=("resid_pre",))
            b, p = run.shape
            scores = torch.zeros(b, w.n_layers, p)
            eye = torch.eye(p, dtype=torch.bool)[:, None, :, None]  # [copy, 1, pos, 1]
            for layer in range(w.n_layers):
                a, s = acts[("resid_pre", layer)], src[("resid_pre", layer)]
                patched = torch.where(eye, s[None], a[None]).reshape(p * b, p, -1)
                logits = forward(w, None, batch.answer_pos.repeat(p), start=Start(layer, patched))
                scores[:, layer] = (_ld(logits, batch, p) - _ld(base, batch).repeat(p)).reshape(p, b).T
        out.append(NodeScores("resid_pre", direction, scores, ("prompt", "layer", "pos")))
    time.sleep(cfg.options.sleep_s if cfg.options is not None else 0.0)
    return MethodResult(nodes=out)


def resid_atp(model, batch, cfg):
    """Attribution patching of resid_pre (sweep tests only)."""
    w = weights(model)
    out = []
    for direction in cfg.directions:
        run, patch = _runs(batch, direction)
        with torch.no_grad():
            _, src = run_with_acts(w, patch, batch.answer_pos, kinds=("resid_pre",))
        # a leaf at the embedding puts every resid_pre in the graph (non-leaf tensors autograd.grad can target)
        edit = lambda k, layer, x: x.detach().requires_grad_(True) if k == "embed" else x  # noqa: E731
        logits, acts = run_with_acts(w, run, batch.answer_pos, kinds=("resid_pre",), edit=edit)
        keys = [("resid_pre", layer) for layer in range(w.n_layers)]
        grads = torch.autograd.grad(_ld(logits, batch).sum(), [acts[k] for k in keys])
        scores = torch.stack([(g * (src[k] - acts[k].detach())).sum(-1) for g, k in zip(grads, keys, strict=True)], 1)
        out.append(NodeScores("resid_pre", direction, scores.detach(), ("prompt", "layer", "pos")))
    time.sleep(cfg.options.sleep_s if cfg.options is not None else 0.0)
    return MethodResult(nodes=out)


if EXACT not in METHODS:  # pytest may import this module under a second name; register once per process
    register(EXACT, produces="nodes", exact=True, options=SleepOptions, kinds=("resid_pre",))(resid_exact)
    register(ATP, produces="nodes", exact=False, options=SleepOptions, kinds=("resid_pre",))(resid_atp)


def test_resid_exact_matches_literal_loop(tiny, tokenizer):
    batch = make_batch("ioi", tokenizer, n_prompts=3, seed=2)
    cfg = MethodConfig(directions=("denoise", "noise"))
    res = resid_exact(tiny, batch, cfg)
    w = weights(tiny)
    for ns in res.nodes:
        run, patch = _runs(batch, ns.direction)
        with torch.no_grad():
            base, _ = run_with_acts(w, run, batch.answer_pos)
            _, src = run_with_acts(w, patch, batch.answer_pos, kinds=("resid_pre",))
            for layer in range(w.n_layers):
                for pos in (0, 3, int(batch.answer_pos.min())):
                    def edit(k, lyr, x, layer=layer, pos=pos, src=src):
                        if k == "resid_pre" and lyr == layer:
                            x = x.clone()
                            x[:, pos] = src[("resid_pre", layer)][:, pos]
                        return x
                    ref = _ld(forward(w, run, batch.answer_pos, edit), batch) - _ld(base, batch)
                    torch.testing.assert_close(ns.scores[:, layer, pos], ref, atol=1e-4, rtol=1e-4)


def test_resid_atp_tracks_exact_patching(tiny, tokenizer):
    """AtP is a first-order estimate: it correlates with exact patching and is not identical to it."""
    batch = make_batch("ioi", tokenizer, n_prompts=4, seed=5)
    cfg = MethodConfig()
    exact = resid_exact(tiny, batch, cfg).nodes[0].scores
    atp = resid_atp(tiny, batch, cfg).nodes[0].scores
    assert atp.shape == exact.shape
    r = torch.corrcoef(torch.stack([atp.flatten(), exact.flatten()]))[0, 1]
    assert r > 0.3
    assert not torch.allclose(atp, exact, atol=1e-3)
