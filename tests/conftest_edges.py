"""Fixtures and helpers shared by the edge-method tests (tests/test_edges*.py)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from attrpatch import load_model


def _tiny64(tiny_dir):
    """The tiny model in float64, so that 1e-5 agreement measures the algorithm, not float32 rounding."""
    model = load_model(tiny_dir)
    model.bridge.to(torch.float64)
    return model


# A test module registers it with ``from conftest_edges import tiny64_fixture`` (fixture name ``tiny64``).
tiny64_fixture = pytest.fixture(scope="module", name="tiny64")(_tiny64)


@contextlib.contextmanager
def bridge_grads(model):
    """TransformerLens' gradient cache needs activations that require grad: unfreeze the weights briefly
    (torch.autograd.grad never touches their .grad)."""
    params = list(model.bridge.parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(False)


def rel_close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal to ``rtol`` relative to the largest reference score (cells near zero are judged on that scale)."""
    scale = float(ref.abs().max())
    assert scale > 0
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=rtol * scale)
