"""EAP-IG: edge attribution patching with integrated gradients on the input embeddings.

    python -c "from attrpatch import load_model, make_batch; from attrpatch.methods import run_method, MethodConfig; m = load_model('ioi-tiny'); print(run_method('eap_ig', m, make_batch('ioi', m.tokenizer, 8), MethodConfig(ig_steps=5)).edges[0].scores.shape)"

Algorithm (Hanna, Pezzelle & Belinkov 2024, "Have Faith in Faithfulness: Going Beyond Circuit Overlap When
Finding Model Mechanisms", arXiv:2403.17806; the "inputs" variant). Graph: ``attrpatch.graph``.

1. Run the run and the patch input without gradients; keep every source's write (a_src,run, a_src,patch)
   and the token embeddings e_run, e_patch.
2. For k = 1 … m (m = ``ig_steps``), run the run input with its token embedding replaced by
   e_run + (k/m)·(e_patch − e_run), and take ∂metric/∂(input of every target). The m steps are stacked along
   the batch axis (m·prompts rows per pass, chunked to ``max_rows`` and the memory budget), not looped as
   m separate full passes.
3. Average the gradients over the steps and contract them with the source changes, one einsum per block of
   targets (as EAP does):

       score(src → dst) = Σ_pos (a_src,patch − a_src,run) · (1/m) Σ_{k=1..m} ∂metric/∂(input of dst) |_{α=k/m}

Checkable facts (``tests/test_edges_ig.py``): with m = 1 the only step is α = 1, the patch input itself, so
EAP-IG(denoise) = −EAP(noise) exactly (EAP's gradient on the clean run, times clean − corrupted). The
right Riemann sum converges to the path integral: for ``embed``, whose every reader is a target, the sum of
its outgoing scores tends to metric(patch) − metric(run) (IG completeness) with error O(1/m).
The paper writes k = 1 … m; some versions of the authors' code use k = 0 … m−1 (which at m = 1 is EAP).

Steps 1 and 3 are the shared EAP loop (``core.edge_scores``); step 2 is ``averaged_grads``. Options:
``EapIgOptions.ig_steps``; config read: ``directions``, ``per_prompt``, ``per_position``, ``max_rows``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attrpatch.engine import Weights, weights
from attrpatch.graph import EdgeGraph
from attrpatch.methods import MethodConfig, MethodError, Options, register, register_cost
from attrpatch.methods.core import (
    Cost,
    TargetGrads,
    Work,
    as_scores,
    edge_axes,
    edge_loop_cost,
    edge_scores,
    target_grads,
    wide,
)
from attrpatch.models import LoadedModel
from attrpatch.scores import EdgeScores, MethodResult
from attrpatch.tasks import PromptBatch


@dataclass(frozen=True)
class EapIgOptions(Options):
    ig_steps: int = 5  # interpolation steps m (Hanna et al. use 5 on IOI)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ig_steps < 1:
            raise MethodError(f"ig_steps must be at least 1, got {self.ig_steps}")


def averaged_grads(w: Weights, part: PromptBatch, run: Tensor, patch: Tensor, rows: int, steps: int
                   ) -> tuple[None, TargetGrads]:
    """Step 2: target gradients averaged over α = k/m, k = 1 … m, with the steps along the batch axis.

    ``rows`` bounds one pass: ``rows // len(part)`` steps go into each pass (at least one)."""
    n = len(part)
    per_pass = max(1, min(steps, rows // n))
    total: list[Tensor] | None = None
    for k0 in range(1, steps + 1, per_pass):
        ks = torch.arange(k0, min(k0 + per_pass, steps + 1), device=w.device)
        g = len(ks)
        alpha = (ks.to(w.resid_dtype) / steps).repeat_interleave(n)[:, None, None]  # copy-major rows
        e_patch = w.W_E[patch].to(w.resid_dtype).repeat(g, 1, 1)

        def interpolate(e_run: Tensor, alpha: Tensor = alpha, e_patch: Tensor = e_patch) -> Tensor:
            return e_run + alpha * (e_patch - e_run)

        _, blocks = target_grads(w, run.repeat(g, 1), part.answer_pos.repeat(g), part.answer_ids,
                                 part.wrong_ids, embed=interpolate)
        summed = [wide(b.reshape(g, n, *b.shape[1:])).sum(0) for b in blocks]
        total = summed if total is None else [t + s for t, s in zip(total, summed, strict=True)]
        del blocks
    assert total is not None
    return None, [t / steps for t in total]


def eap_ig_scores(w: Weights, batch: PromptBatch, directions: tuple[str, ...] = ("denoise",), steps: int = 5,
                  per_prompt: bool = True, per_position: bool = True, max_rows: int = 256) -> dict[str, Tensor]:
    """Steps 1–3 for each direction: ``{direction: scores}`` with axes ``edge_axes(per_prompt, per_position)``."""

    def grads(w: Weights, part: PromptBatch, run: Tensor, patch: Tensor, rows: int):
        return averaged_grads(w, part, run, patch, rows, steps)

    return edge_scores(w, batch, grads, directions, per_prompt, per_position, max_rows)


@register("eap_ig", produces="edges", options=EapIgOptions)
def eap_ig(model: LoadedModel, batch: PromptBatch, cfg: MethodConfig) -> MethodResult:
    """EAP-IG (Hanna et al. 2024): edge scores with gradients integrated along the input-embedding path."""
    w = weights(model)
    scores = eap_ig_scores(w, batch, cfg.directions, cfg.options.ig_steps, cfg.per_prompt, cfg.per_position,
                           cfg.max_rows)
    index = EdgeGraph.of(w).index()
    axes = edge_axes(cfg.per_prompt, cfg.per_position)
    return MethodResult(edges=[EdgeScores(d, index, as_scores(s), axes) for d, s in scores.items()])


@register_cost("eap_ig")
def eap_ig_cost(w: Work, cfg: MethodConfig) -> Cost:
    return edge_loop_cost(w, cfg, n_grad_rows=w.n * cfg.options.ig_steps)
