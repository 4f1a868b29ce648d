"""The loader: local checkpoints through the user's path, the registry, and one clear error per bad input."""

import json

import pytest
import torch
from transformer_lens.model_bridge import TransformerBridge
from transformers import GPT2Config, GPT2LMHeadModel

from attrpatch import load_model, load_tokenizer
from attrpatch.models import REGISTRY, ModelLoadError, resolve_spec


def test_tokenizer_is_gpt2_offline():
    tok = load_tokenizer()
    assert len(tok) == 50257
    assert tok(" Mary")["input_ids"] == [5335]
    assert tok.decode(tok("When John and Mary went to the shops")["input_ids"]) == "When John and Mary went to the shops"


def test_local_checkpoint_loads_as_eval_bridge(tiny, tiny_dir):
    assert isinstance(tiny.bridge, TransformerBridge)
    assert not tiny.bridge.training
    assert all(not m.training for m in tiny.bridge.modules())
    assert tiny.spec.source.endswith(tiny_dir.split("/")[-1])
    hf = GPT2LMHeadModel.from_pretrained(tiny_dir).eval()
    tokens = torch.tensor([[50256, 464, 3797, 318]])
    with torch.no_grad():
        torch.testing.assert_close(tiny.bridge(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


def test_eval_mode_is_deterministic(tiny):
    tokens = torch.tensor([[50256, 464, 3797, 318, 257]])
    with torch.no_grad():
        assert torch.equal(tiny.bridge(tokens), tiny.bridge(tokens))


def test_registry_has_all_sizes_with_resource_hints():
    for name in ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl", "ioi-tiny"):
        spec = REGISTRY[name]
        assert spec.memory_gb > 0 and spec.num_cpus > 0 and 0 < spec.num_gpus <= 1
    sizes = [REGISTRY[n].n_params_m for n in ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl")]
    assert sizes == sorted(sizes)


def test_unknown_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="unknown model 'gpt3'.*gpt2-small"):
        load_model("gpt3")


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_directory_with_other_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="'llama' model.*GPT-2 only"):
        load_model(str(tmp_path))


def test_wrong_vocabulary(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=1, n_embd=8, vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="vocabulary of 100"):
        load_model(str(tmp_path))


def test_hub_name_without_network(tmp_path, monkeypatch):
    """A real connection attempt to a closed local port stands in for the missing network."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("attrpatch.models.HUB_HOST", ("127.0.0.1", 9))
    with pytest.raises(ModelLoadError, match=r"no network: .*model.path=DIR.*embedded model"):
        load_model("gpt2-small")


def test_hub_name_offline_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="no network"):
        load_model("gpt2-xl")


def test_local_spec_estimates_resources(tiny_dir):
    spec = resolve_spec(tiny_dir)
    assert spec.memory_gb >= 0.5 and 0 < spec.num_gpus <= 1
