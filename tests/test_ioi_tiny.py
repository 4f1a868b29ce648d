"""The embedded ioi-tiny checkpoint: loads offline by name, really does IOI on held-out name pairs, and the
training script that made it is deterministic."""

import json
import socket

import pytest
import torch

from attrpatch import load_model, make_batch
from attrpatch.evaluate import engine_logit_diff, evaluate_task
from attrpatch.models import CHECKPOINTS, REGISTRY
from attrpatch.train_ioi_tiny import TrainConfig, TrainError, build_model, lr_at, train

TEST_SEED = 11  # not the README's evaluation seed (7): the bar must hold on another held-out sample


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


def test_loads_by_name_as_eval_bridge(ioi_tiny):
    from transformer_lens.model_bridge import TransformerBridge

    assert isinstance(ioi_tiny.bridge, TransformerBridge)
    assert not ioi_tiny.bridge.training
    assert not any(m.training for m in ioi_tiny.bridge.modules())
    assert ioi_tiny.spec.embedded


def test_does_ioi_on_held_out_pairs(ioi_tiny):
    m = evaluate_task(ioi_tiny, "ioi", "abc", split="test", n_prompts=500, seed=TEST_SEED)
    assert m.clean_mean >= 3.0
    assert m.accuracy >= 0.9
    # abc: neither answer is in the prompt, so each prompt's difference is the model's preference between
    # two absent names (|LD| ~7 per prompt here), zero on average: the mean is within 3 standard errors
    # of 0 and small next to the clean mean.
    se = m.corrupt.std().item() / len(m.corrupt) ** 0.5
    assert abs(m.corrupt_mean) < 3 * se
    assert abs(m.corrupt_mean) < 0.1 * m.clean_mean
    flip = evaluate_task(ioi_tiny, "ioi", "flip", split="test", n_prompts=500, seed=TEST_SEED)
    torch.testing.assert_close(flip.clean, m.clean)  # same clean prompts for the same seed
    assert flip.corrupt_mean < -1.0  # the other name is now the indirect object


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


TINY = dict(n_layer=1, n_head=2, n_embd=16, n_positions=32, steps=3, polish_steps=2, batch_size=4, warmup=2)


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
                                 dict(init_std=0.0), dict(polish_steps=-1), dict(polish_lr=0.0)])
def test_bad_train_config_raises(bad):
    with pytest.raises(TrainError):
        TrainConfig(**bad)


def test_polish_cycle_only_extends_the_schedule():
    """The first ``steps`` learning rates do not depend on the polish cycle, which restarts at polish_lr."""
    base = TrainConfig(steps=100, warmup=10, polish_steps=0)
    polished = TrainConfig(steps=100, warmup=10, polish_steps=40, polish_lr=5e-4)
    assert [lr_at(base, s) for s in range(100)] == [lr_at(polished, s) for s in range(100)]
    assert lr_at(polished, 100) == pytest.approx(5e-4)
    assert lr_at(polished, 139) == pytest.approx(5e-5, rel=0.02)  # t = 39/40, not quite the end
    assert lr_at(polished, 99) == pytest.approx(0.1 * polished.lr, rel=0.01)
