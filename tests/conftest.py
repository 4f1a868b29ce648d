"""Session-scoped tiny random GPT-2 checkpoints, saved and loaded through the same path a user's directory takes."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from attrpatch import load_model, load_tokenizer

# Two shapes, so that no test passes only because n_heads == n_layers or d_head == 16.
SHAPES = {
    "tiny-a": dict(n_layer=2, n_head=4, n_embd=64, n_positions=64),
    "tiny-b": dict(n_layer=3, n_head=3, n_embd=48, n_positions=64),
}


def save_random_gpt2(path, seed: int = 0, **shape) -> str:
    """A random GPT-2 with the real vocabulary and larger-than-default weights (so effects are not tiny)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(**shape, vocab_size=50257)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "wte" not in name:
                p.mul_(4.0)  # std 0.08: attention patterns far from uniform, MLPs non-linear
            elif p.dim() == 1 and "ln" not in name:
                p.normal_(0, 0.05)
            elif "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="session", params=sorted(SHAPES))
def tiny_dir(request, tmp_path_factory):
    return save_random_gpt2(tmp_path_factory.mktemp(request.param), seed=1, **SHAPES[request.param])


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """A LoadedModel per shape (parametrised over SHAPES)."""
    return load_model(tiny_dir)
