"""The embedded ioi-tiny checkpoint: loads offline by name, really does IOI on held-out name pairs, and the
training script that made it is deterministic."""

import json
import socket

import pytest
import torch

from attrpatch import load_model, make_batch
from attrpatch.evaluate import engine_logit_diff, evaluate_task
from attrpatch.models import CHECKPOINTS, REGISTRY
from attrpatch.train_ioi_tiny import TrainConfig, TrainError, build_model, train

TEST_SEED = 11  # not the README's evaluation seed (7): the bar must hold on another held-out sample
needs_checkpoint = pytest.mark.skipif(
    not (CHECKPOINTS / "ioi-tiny" / "model.safetensors").exists(),
    reason="ioi-tiny checkpoint not committed yet: run `python -m attrpatch.train_ioi_tiny`",
)


@pytest.fixture(scope="module")
def ioi_tiny():
    """Loaded with every network connection refused: the embedded model needs none."""
    real = socket.socket.connect

    def refuse(self, *args, **kwargs):
        raise OSError("network disabled by test_ioi_tiny")

    socket.socket.connect = refuse
    try:
        return load_model("ioi-tiny")
    finally:
        socket.socket.connect = real


@needs_checkpoint
def test_checkpoint_is_committed_fp32_without_dropout():
    path = CHECKPOINTS / "ioi-tiny"
    assert (path / "model.safetensors").exists()
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["vocab_size"] == 50257
    assert cfg["resid_pdrop"] == cfg["embd_pdrop"] == cfg["attn_pdrop"] == 0.0
    assert (path / "model.safetensors").stat().st_size < 30e6
    from safetensors.torch import load_file

    tensors = load_file(path / "model.safetensors")  # the file, not the bridge (which adds split q/k/v copies)
    assert {t.dtype for t in tensors.values()} == {torch.float32}  # the loader passes no dtype
    assert round(sum(t.numel() for t in tensors.values()) / 1e6, 1) == REGISTRY["ioi-tiny"].n_params_m


@needs_checkpoint
def test_loads_by_name_as_eval_bridge(ioi_tiny):
    from transformer_lens.model_bridge import TransformerBridge

    assert isinstance(ioi_tiny.bridge, TransformerBridge)
    assert not ioi_tiny.bridge.training
    assert not any(m.training for m in ioi_tiny.bridge.modules())
    assert ioi_tiny.spec.embedded


@needs_checkpoint
def test_does_ioi_on_held_out_pairs(ioi_tiny):
    m = evaluate_task(ioi_tiny, "ioi", "abc", split="test", n_prompts=100, seed=TEST_SEED)
    assert m.clean_mean >= 3.0
    assert m.accuracy >= 0.9
    assert abs(m.corrupt_mean) < 0.5
    flip = evaluate_task(ioi_tiny, "ioi", "flip", split="test", n_prompts=100, seed=TEST_SEED)
    torch.testing.assert_close(flip.clean, m.clean)  # same clean prompts for the same seed
    assert flip.corrupt_mean < -1.0  # the other name is now the indirect object


@needs_checkpoint
def test_engine_metric_matches_the_bridge(ioi_tiny):
    """The evaluation path (engine) and the bridge's own forward agree on the checkpoint."""
    batch = make_batch("ioi", ioi_tiny.tokenizer, n_prompts=8, seed=TEST_SEED, split="test")
    with torch.no_grad():
        logits = ioi_tiny.bridge(batch.clean_tokens)
    rows = torch.arange(len(batch))
    final = logits[rows, batch.answer_pos]
    ref = final[rows, batch.answer_ids] - final[rows, batch.wrong_ids]
    torch.testing.assert_close(engine_logit_diff(ioi_tiny, batch.clean_tokens, batch), ref,
                               atol=1e-3, rtol=1e-4)


TINY = dict(n_layer=1, n_head=2, n_embd=16, n_positions=32, steps=3, batch_size=4, warmup=2)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_training_is_deterministic():
    a = _state(train(TrainConfig(**TINY), progress=False))
    b = _state(train(TrainConfig(**TINY), progress=False))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    init = _state(build_model(TrainConfig(**TINY)))
    assert not torch.equal(a["transformer.h.0.mlp.c_fc.weight"], init["transformer.h.0.mlp.c_fc.weight"])
    other = _state(train(TrainConfig(**{**TINY, "data_seed": 5}), progress=False))
    assert not torch.equal(a["transformer.h.0.mlp.c_fc.weight"], other["transformer.h.0.mlp.c_fc.weight"])


def test_trained_model_is_in_eval_mode():
    assert not train(TrainConfig(**{**TINY, "steps": 1}), progress=False).training


@pytest.mark.parametrize("bad", [dict(n_embd=30, n_head=4), dict(steps=0), dict(n_positions=16), dict(lr=0.0),
                                 dict(init_std=0.0)])
def test_bad_train_config_raises(bad):
    with pytest.raises(TrainError):
        TrainConfig(**bad)
