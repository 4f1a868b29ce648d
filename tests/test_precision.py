"""Lower precision: bfloat16 weights and activations with float32 reductions give the float32 scores, per kind.

bfloat16 runs on a CPU too. Every method that scores nodes or edges, every component kind it writes, on the
embedded ioi-tiny (a small shape: 2 layers, 4 heads, d_model 128; trained, so its effects have a real model's
size): Pearson ≥ 0.99 between the bfloat16 and float32 scores, wherever the float32 scores spread more than
bfloat16 can resolve. The metric is a difference of two logits of a few units, which bfloat16 holds to ~2⁻⁸ of
their size (~0.02 logit), so effects whose spread is below ~0.05 logit are noise in any bfloat16 forward,
whatever the reductions; that is why the test does not use random weights: on the random tiny shapes of the
other tests most edge and q/k effects are below that (measured: std 0.002–0.03 logit), while on ioi-tiny most
kinds are resolved and every resolved kind agrees (measured Pearson 0.997–1.000). Scores come back in float32, and the worker's weight memory
(the engine's parameter bytes, measured) is half of float32's.
"""

from __future__ import annotations

import pytest
import torch

from attrpatch import load_model, make_batch
from attrpatch.engine import weights
from attrpatch.methods import method_config, run_method

METHODS = {
    "attribution": {},
    "attention_attribution": {},
    "dla": {},
    "activation": {"kinds": ("resid_pre", "attn_out", "mlp_out", "head_out", "head_q", "head_k", "head_v")},
    "edge_attribution": {},
    "eap_ig": {"ig_steps": 3},
    "edge_activation": {"edge_subset": 0.3, "per_position": False},
}
RESOLVED = 0.05  # logits: the float32 spread below which bfloat16 cannot resolve an effect (module docstring)


@pytest.fixture(scope="module")
def pair():
    return load_model("ioi-tiny"), load_model("ioi-tiny", dtype="bfloat16")


@pytest.fixture(scope="module")
def batch(tokenizer):
    return make_batch("ioi", tokenizer, n_prompts=6, seed=11)


def test_weight_memory_halves(pair):
    full, half = (weights(m).param_bytes() for m in pair)
    assert weights(pair[1]).dtype == torch.bfloat16
    assert half / full == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bfloat16_scores_track_float32(pair, batch, method):
    cfg = method_config(method, directions=("denoise",), **METHODS[method])
    full, half = (run_method(method, m, batch, cfg) for m in pair)
    checked, kinds = 0, 0
    for a, b in zip(full.nodes + full.edges, half.nodes + half.edges, strict=True):
        assert b.scores.dtype == torch.float32  # reduced and accumulated in float32
        x, y = a.scores.flatten().double(), b.scores.flatten().double()
        keep = x != 0  # cells no patch can move (padding, non-edges) are exact zeros in both
        kinds += 1
        if keep.sum() < 3 or x[keep].std() < RESOLVED:
            continue
        r = torch.corrcoef(torch.stack([x[keep], y[keep]]))[0, 1]
        assert r >= 0.99, (method, getattr(a, "component", "edges"), float(r))
        checked += 1
    assert checked >= max(1, kinds // 2), (checked, kinds)  # most kinds of ioi-tiny are resolved, so compared
