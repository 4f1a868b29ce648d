"""What the tests and the benches share: random GPT-2 checkpoints and the TransformerLens oracle set-up.

    python -c "from attrpatch.testing import save_random_gpt2; print(save_random_gpt2('/tmp/rnd', n_layer=2, n_head=4, n_embd=64))"

Nothing here is used by the methods or the sweep; it is in the package so that ``bench/`` and ``tests/``
build the same checkpoints and call TransformerLens the same way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

# Test shapes: two, so that no test passes only because n_heads == n_layers or d_head == 16.
SHAPES = {
    "tiny-a": dict(n_layer=2, n_head=4, n_embd=64, n_positions=64),
    "tiny-b": dict(n_layer=3, n_head=3, n_embd=48, n_positions=64),
}
# The real GPT-2 sizes (layers, heads, d_model), for benches and plans.
GPT2_SHAPES = {
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}


def save_random_gpt2(path, seed: int = 0, scale: float = 4.0, dtype: torch.dtype = torch.float32,
                     embed_scale: float = 1.0, **shape) -> str:
    """A random GPT-2 with the real vocabulary saved as a local checkpoint directory; ``scale`` multiplies the
    weight matrices (std 0.08 at 4: attention patterns far from uniform, MLPs non-linear, effects not tiny),
    ``embed_scale`` the (tied) embedding, which sets the size of the logits and of every effect on them."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(**shape, vocab_size=50257)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "wte" in name:
                p.mul_(embed_scale)
            elif p.dim() >= 2:
                p.mul_(scale)
            elif p.dim() == 1 and "ln" not in name:
                p.normal_(0, 0.05)
            elif "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.to(dtype).save_pretrained(path)
    return os.fspath(path)


@contextlib.contextmanager
def grad_through(model) -> Iterator[None]:
    """TransformerLens' attribution code needs activations that require grad, and the loader freezes the
    weights: unfreeze them inside the block (``torch.autograd.grad`` never fills their ``.grad``)."""
    params = list(getattr(model, "bridge", model).parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(False)


def bridge_metric(logits: torch.Tensor, batch, i: int) -> torch.Tensor:
    """The logit difference of prompt ``i`` from the bridge's full logits of that prompt alone ``[1, pos, vocab]``."""
    ap = int(batch.answer_pos[i])
    return logits[0, ap, int(batch.answer_ids[i])] - logits[0, ap, int(batch.wrong_ids[i])]


def rel_close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal to ``rtol`` relative to the largest reference score (cells near zero are judged on that scale)."""
    scale = float(ref.abs().max())
    assert scale > 0
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=rtol * scale)


def devices() -> list[str]:
    """The devices the device-parametrised tests run on: ``cpu`` always, ``cuda`` when it is available."""
    return ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


# --------------------------------------------------------------------------------------- benches on a device

def bench_device(name: str) -> torch.device:
    """The device a bench runs on (``cpu`` or ``cuda``); asking for cuda where none is available is an error."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch {torch.__version__} sees no CUDA device here; use --device cpu")
    return device


def device_line(device: torch.device) -> str:
    """One line naming what a bench runs on: the card (with torch's CUDA version) or the CPU threads."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"device: cuda, {torch.cuda.get_device_name(device)} ({props.total_memory / 2**30:.0f} GiB, "
                f"torch {torch.__version__}, CUDA {torch.version.cuda})")
    return f"device: cpu, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously): call before reading a timer."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def write_json(path: str | None, figures: dict) -> None:
    """A bench's figures as JSON at ``path`` (``--json``; nothing when None), for summaries such as
    ``bench/gpu_check.sh``'s table."""
    if path:
        import json

        with open(path, "w") as f:
            json.dump(figures, f, indent=1)


def batch_on(batch, device: torch.device):
    """A copy of a ``PromptBatch`` with every tensor on ``device`` (for TransformerLens and the floors; the
    methods take the batch as the sweep passes it, on the CPU, and move what they need)."""
    import dataclasses

    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)
                                         if isinstance(getattr(batch, f.name), torch.Tensor)})


def floor(w, batch) -> None:
    """The benches' baseline: what any method that needs a clean forward, a corrupted forward and a backward
    cannot go below. Engine fwd(clean, no grad) + fwd(corrupted) + one backward of the summed logit difference
    to the token embeddings; no sites recorded, nothing scored. ``batch`` on ``w``'s device."""
    from attrpatch.engine import forward
    from attrpatch.metrics import final_logit_diff

    with torch.no_grad():
        forward(w, batch.clean_tokens, batch.answer_pos)
    leaf = {}

    def edit(kind, layer, x):
        if kind == "embed":
            x = leaf["embed"] = x.detach().requires_grad_(True)
        return x

    with torch.enable_grad():
        logits = forward(w, batch.corrupt_tokens, batch.answer_pos, edit)
        torch.autograd.grad(final_logit_diff(logits, batch).sum(), [leaf["embed"]])
