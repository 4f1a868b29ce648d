"""Prompt sets → a ``PromptBatch`` (clean and corrupted tokens, the two answer tokens, answer positions).

    python -c "from attrpatch import load_tokenizer, make_batch; print(make_batch('ioi', load_tokenizer(), n_prompts=4))"

Tasks register a generator ``(TaskConfig) -> list[Prompt]`` under a name; ``make_batch`` tokenizes the
prompts, checks them and pads them on the right.

Padding cannot leak: prompts are right-padded, GPT-2 attention is causal, and every metric reads the logits
at each prompt's own ``answer_pos`` (its last real token), so no position after it can change the metric.
Scores at padded positions are therefore exactly zero, and ``scores.py`` drops them before writing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Int
from torch import Tensor

from attrpatch.errors import ConfigError


class TaskError(ConfigError):
    """A task name, prompt set or corruption that cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class Prompt:
    """One clean/corrupted pair. The metric compares ``answer`` with ``wrong`` after the last token."""

    clean: str
    corrupt: str
    answer: str
    wrong: str
    template: int = 0  # which template made it (for per-template mean ablation); 0 when not templated


@dataclass(frozen=True)
class TaskConfig:
    """What to generate. ``corruption`` is task-specific; ``None`` takes the task's default."""

    name: str
    n_prompts: int = 64  # IOI replications use tens to hundreds of prompts; 64 fits one CPU shard
    seed: int = 0  # generators are deterministic given the seed
    corruption: str | None = None
    split: str = "all"  # ioi only: "train" / "test" hold out name-pair combinations; "all" mixes both

    def __post_init__(self) -> None:
        if self.n_prompts < 1:
            raise TaskError(f"n_prompts must be at least 1, got {self.n_prompts}: ask for one or more prompts")
        if self.split not in ("all", "train", "test"):
            raise TaskError(f"split must be 'all', 'train' or 'test', got {self.split!r}")


Generator = Callable[[TaskConfig], list[Prompt]]
TASKS: dict[str, Generator] = {}
CORRUPTIONS: dict[str, tuple[str, ...]] = {}  # task → allowed corruptions, the first is the default


def register_task(name: str, corruptions: tuple[str, ...]) -> Callable[[Generator], Generator]:
    """Register a generator under ``name``; registering a name twice is a bug and raises."""

    def wrap(fn: Generator) -> Generator:
        if name in TASKS:
            raise ValueError(f"task {name!r} is registered twice")
        TASKS[name] = fn
        CORRUPTIONS[name] = corruptions
        return fn

    return wrap


@dataclass
class PromptBatch:
    """Tokenized prompts, right-padded with ``<|endoftext|>``; index ``n`` is prompt ``prompt_ids[n]``."""

    clean_tokens: Int[Tensor, "batch pos"]
    corrupt_tokens: Int[Tensor, "batch pos"]
    answer_ids: Int[Tensor, " batch"]
    wrong_ids: Int[Tensor, " batch"]
    answer_pos: Int[Tensor, " batch"]  # index of each prompt's last real token
    prompt_ids: Int[Tensor, " batch"]  # global prompt numbers (stable across shards)
    prompts: list[Prompt] = field(repr=False)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def lengths(self) -> Int[Tensor, " batch"]:
        return self.answer_pos + 1

    @property
    def n_pos(self) -> int:
        return self.clean_tokens.shape[1]

    def select(self, index: Sequence[int] | Tensor) -> PromptBatch:
        """A sub-batch (a shard), trimmed to its own longest prompt."""
        idx = torch.as_tensor(index, dtype=torch.long)
        if idx.numel() == 0:
            raise TaskError("cannot select an empty set of prompts")
        n_pos = int(self.answer_pos[idx].max()) + 1
        return PromptBatch(
            clean_tokens=self.clean_tokens[idx, :n_pos],
            corrupt_tokens=self.corrupt_tokens[idx, :n_pos],
            answer_ids=self.answer_ids[idx],
            wrong_ids=self.wrong_ids[idx],
            answer_pos=self.answer_pos[idx],
            prompt_ids=self.prompt_ids[idx],
            prompts=[self.prompts[i] for i in idx.tolist()],
        )

    def shards(self, shard_size: int) -> list[PromptBatch]:
        """Consecutive shards of at most ``shard_size`` prompts."""
        if shard_size < 1:
            raise TaskError(f"shard_size must be at least 1, got {shard_size}")
        return [self.select(range(i, min(i + shard_size, len(self)))) for i in range(0, len(self), shard_size)]


def _single_token(tokenizer, text: str, what: str, n: int) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise TaskError(
            f"prompt {n}: the {what} {text!r} is {len(ids)} tokens {ids}, but the metric compares single "
            "tokens: choose an answer that is one GPT-2 token (usually with a leading space, e.g. ' Mary')"
        )
    return ids[0]


def tokenize_prompts(prompts: Sequence[Prompt], tokenizer, prepend_bos: bool = True,
                     first_id: int = 0) -> PromptBatch:
    """Tokenize and check prompts; pad on the right. ``prepend_bos`` adds ``<|endoftext|>`` as TL does."""
    if len(prompts) == 0:
        raise TaskError("the prompt set is empty: ask for n_prompts >= 1 or pass at least one Prompt")
    bos = [tokenizer.eos_token_id] if prepend_bos else []
    clean, corrupt, ans, wrong = [], [], [], []
    for n, p in enumerate(prompts):
        c = bos + tokenizer(p.clean, add_special_tokens=False)["input_ids"]
        k = bos + tokenizer(p.corrupt, add_special_tokens=False)["input_ids"]
        if len(c) != len(k):
            raise TaskError(
                f"prompt {n}: clean and corrupted prompts tokenize to different lengths ({len(c)} vs {len(k)} "
                f"tokens): {p.clean!r} vs {p.corrupt!r}. Patching needs aligned positions: use corruptions "
                "that replace single tokens with single tokens"
            )
        if len(c) == 0:
            raise TaskError(f"prompt {n} is empty: every prompt needs at least one token")
        clean.append(c)
        corrupt.append(k)
        ans.append(_single_token(tokenizer, p.answer, "answer", n))
        wrong.append(_single_token(tokenizer, p.wrong, "wrong answer", n))
    n_pos = max(len(c) for c in clean)
    pad = tokenizer.eos_token_id

    def padded(rows: list[list[int]]) -> Tensor:
        return torch.tensor([r + [pad] * (n_pos - len(r)) for r in rows], dtype=torch.long)

    return PromptBatch(
        clean_tokens=padded(clean),
        corrupt_tokens=padded(corrupt),
        answer_ids=torch.tensor(ans),
        wrong_ids=torch.tensor(wrong),
        answer_pos=torch.tensor([len(c) - 1 for c in clean]),
        prompt_ids=torch.arange(first_id, first_id + len(prompts)),
        prompts=list(prompts),
    )


def generate(cfg: TaskConfig) -> list[Prompt]:
    """The prompts of a task, checked for a known name and corruption."""
    _load_builtin_tasks()
    if cfg.name not in TASKS:
        raise TaskError(f"unknown task {cfg.name!r}: use one of {sorted(TASKS)}")
    allowed = CORRUPTIONS[cfg.name]
    if cfg.corruption is not None and cfg.corruption not in allowed:
        raise TaskError(f"task {cfg.name!r} has no corruption {cfg.corruption!r}: use one of {list(allowed)}")
    prompts = TASKS[cfg.name](cfg)
    if not prompts:
        raise TaskError(f"task {cfg.name!r} produced no prompts: ask for n_prompts >= 1")
    return prompts


def make_batch(name: str, tokenizer, n_prompts: int = 64, seed: int = 0, corruption: str | None = None,
               split: str = "all") -> PromptBatch:
    """Generate and tokenize a task's prompts: the documented entry point."""
    cfg = TaskConfig(name=name, n_prompts=n_prompts, seed=seed, corruption=corruption, split=split)
    return tokenize_prompts(generate(cfg), tokenizer)


def _load_builtin_tasks() -> None:
    from attrpatch.tasks import factual, ioi, pronoun  # noqa: F401  (registration on import)


__all__ = ["CORRUPTIONS", "TASKS", "Prompt", "PromptBatch", "TaskConfig", "TaskError", "generate",
           "make_batch", "register_task", "tokenize_prompts"]
