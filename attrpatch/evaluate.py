"""Held-out metrics of a model on the tasks, and the heads AtP and activation patching rank highest.

    python -m attrpatch.evaluate ioi-tiny              # IOI on 500 held-out prompts, plus pronoun / factual
    python -m attrpatch.evaluate ioi-tiny --circuit    # + top head_out heads by AtP and by activation patching

Metrics (all through ``load_model`` → ``attrpatch.engine.forward``, the path every method uses):

* clean logit difference ``logit(answer) − logit(wrong)`` at the answer position, mean and std over prompts;
* accuracy: the fraction of prompts with ``logit(answer) > logit(wrong)`` on the clean prompt;
* corrupted logit difference (same answer / wrong tokens, corrupted prompt): near 0 for ``ioi``/``abc``
  (no name repeats, so nothing marks the indirect object), negative for ``ioi``/``flip`` (the other name
  becomes the indirect object).

IOI prompts come from ``split="test"``: name pairs the embedded model never saw together in training.

``--circuit`` runs the registered methods ``attribution`` (AtP, gradient estimate) and ``activation``
(exact activation patching) on ``head_out`` in the ``denoise`` direction, sums each head's score over
positions, averages over prompts, and prints the top heads by each and the Pearson and Spearman
correlations of the two score vectors over all heads.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table
from scipy import stats

from attrpatch.engine import forward, weights
from attrpatch.metrics import ids_logit_diff
from attrpatch.models import LoadedModel, load_model
from attrpatch.tasks import PromptBatch, make_batch

log = logging.getLogger(__name__)

EVAL_SEED = 7  # any seed works for the test split; training uses seeds >= 100_000 on the train split
EVAL_PROMPTS = 500  # standard error of the mean logit difference, ioi-tiny: 0.24 clean, 0.40 abc-corrupted
CIRCUIT_PROMPTS = 64  # one shard: exact patching of the 8 heads takes seconds
CHUNK = 128  # prompts per forward: logits at the answer position are chunk × 50257 floats
# (task, corruption, split): the held-out IOI set, then the other tasks the model was not trained on.
DEFAULT_EVALS = (("ioi", "abc", "test"), ("ioi", "flip", "test"), ("pronoun", "flip", "all"),
                 ("factual", "swap", "all"))


@dataclass(frozen=True)
class TaskMetrics:
    """Per-prompt logit differences of one task/corruption, and their summaries."""

    task: str
    corruption: str
    clean: torch.Tensor  # [n] logit(answer) − logit(wrong) on the clean prompts
    corrupt: torch.Tensor  # [n] the same on the corrupted prompts

    @property
    def n(self) -> int:
        return self.clean.numel()

    @property
    def clean_mean(self) -> float:
        return self.clean.mean().item()

    @property
    def corrupt_mean(self) -> float:
        return self.corrupt.mean().item()

    @property
    def accuracy(self) -> float:
        return (self.clean > 0).float().mean().item()


def engine_logit_diff(model: LoadedModel, tokens: torch.Tensor, batch: PromptBatch,
                      chunk: int = CHUNK) -> torch.Tensor:
    """logit(answer) − logit(wrong) per prompt, from engine logits at the answer positions, in chunks."""
    w = weights(model)
    out = []
    with torch.no_grad():
        for i in range(0, len(batch), chunk):
            rows = slice(i, i + chunk)
            logits = forward(w, tokens[rows], batch.answer_pos[rows])
            out.append(ids_logit_diff(logits, batch.answer_ids[rows], batch.wrong_ids[rows]))
    return torch.cat(out)


def evaluate_task(model: LoadedModel, task: str, corruption: str, split: str = "test",
                  n_prompts: int = EVAL_PROMPTS, seed: int = EVAL_SEED) -> TaskMetrics:
    """Clean and corrupted logit differences of ``n_prompts`` prompts of a task."""
    batch = make_batch(task, model.tokenizer, n_prompts=n_prompts, seed=seed, corruption=corruption, split=split)
    return TaskMetrics(task, corruption, engine_logit_diff(model, batch.clean_tokens, batch),
                       engine_logit_diff(model, batch.corrupt_tokens, batch))


@dataclass(frozen=True)
class CircuitScores:
    """Per-head ``head_out`` scores [layer, head] of AtP and activation patching, and their agreement."""

    attribution: torch.Tensor
    activation: torch.Tensor
    n_prompts: int

    @property
    def pearson(self) -> float:
        return float(stats.pearsonr(self.attribution.flatten(), self.activation.flatten()).statistic)

    @property
    def spearman(self) -> float:
        return float(stats.spearmanr(self.attribution.flatten(), self.activation.flatten()).statistic)


def head_scores(result, direction: str = "denoise") -> torch.Tensor:
    """A method's ``head_out`` scores as [layer, head]: summed over positions, averaged over prompts."""
    found = [ns for ns in result.nodes if ns.component == "head_out" and ns.direction == direction]
    if len(found) != 1:
        raise ValueError(f"expected one head_out/{direction} NodeScores, got {len(found)}")
    ns = found[0]
    s = ns.scores.detach().float()
    if "src_pos" in ns.axes:
        raise ValueError(f"head_out scores with axes {ns.axes} have a src_pos axis")
    if "pos" in ns.axes:
        s = s.sum(ns.axes.index("pos"))
    if "prompt" in ns.axes:
        s = s.mean(ns.axes.index("prompt"))
    return s


def circuit(model: LoadedModel, n_prompts: int = CIRCUIT_PROMPTS, seed: int = EVAL_SEED,
            corruption: str = "abc") -> CircuitScores:
    """AtP and exact activation patching of every head's output, denoise direction, held-out prompts."""
    from attrpatch.methods import MethodConfig, run_method

    batch = make_batch("ioi", model.tokenizer, n_prompts=n_prompts, seed=seed, corruption=corruption,
                       split="test")
    cfg = MethodConfig(directions=("denoise",), kinds=("head_out",), per_prompt=False, per_position=False)
    atp = head_scores(run_method("attribution", model, batch, cfg))
    act = head_scores(run_method("activation", model, batch, cfg))
    return CircuitScores(atp, act, len(batch))


def _metrics_table(rows: list[TaskMetrics]) -> Table:
    t = Table(title="held-out metrics (logit difference = logit(answer) − logit(wrong))")
    for col in ("task", "corruption", "prompts", "clean LD mean", "clean LD std", "accuracy",
                "corrupted LD mean", "corrupted LD std"):
        t.add_column(col, justify="left" if col in ("task", "corruption") else "right")
    for m in rows:
        t.add_row(m.task + (" (test split)" if m.task == "ioi" else ""), m.corruption, str(m.n),
                  f"{m.clean_mean:.2f}", f"{m.clean.std().item():.2f}", f"{100 * m.accuracy:.1f}%",
                  f"{m.corrupt_mean:.2f}", f"{m.corrupt.std().item():.2f}")
    return t


def _circuit_table(c: CircuitScores, top: int) -> Table:
    t = Table(title=f"head_out, denoise (ioi/abc, {c.n_prompts} held-out prompts; score summed over "
                    "positions, mean over prompts)")
    for col in ("rank", "AtP head", "AtP score", "activation head", "activation score"):
        t.add_column(col, justify="right")
    n_heads = c.attribution.shape[1]
    # rank by magnitude: a head that hurts the task when restored matters as much as one that helps
    a_idx = c.attribution.flatten().abs().argsort(descending=True)[:top].tolist()
    p_idx = c.activation.flatten().abs().argsort(descending=True)[:top].tolist()
    for r, (i, j) in enumerate(zip(a_idx, p_idx, strict=True)):
        t.add_row(str(r + 1), f"L{i // n_heads}H{i % n_heads}", f"{c.attribution.flatten()[i].item():+.3f}",
                  f"L{j // n_heads}H{j % n_heads}", f"{c.activation.flatten()[j].item():+.3f}")
    return t


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="ioi-tiny", help="registered name or checkpoint directory")
    parser.add_argument("--n-prompts", type=int, default=EVAL_PROMPTS)
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--circuit", action="store_true", help="also rank heads by AtP and activation patching")
    parser.add_argument("--circuit-prompts", type=int, default=CIRCUIT_PROMPTS)
    parser.add_argument("--top", type=int, default=6, help="heads to list per method")  # 6 of the 8 heads
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    console = Console(width=140)  # wide enough for the tables when piped to a file
    model = load_model(args.model)
    rows = [evaluate_task(model, task, corr, split, n_prompts=args.n_prompts, seed=args.seed)
            for task, corr, split in DEFAULT_EVALS]
    console.print(_metrics_table(rows))
    if args.circuit:
        c = circuit(model, n_prompts=args.circuit_prompts, seed=args.seed)
        console.print(_circuit_table(c, min(args.top, c.attribution.numel())))
        console.print(f"correlation over all {c.attribution.numel()} heads: Pearson {c.pearson:.3f}, "
                      f"Spearman {c.spearman:.3f}")


if __name__ == "__main__":
    main()
