"""RelP: attribution patching with LRP propagation coefficients in place of the gradient — nodes (``relp``)
and edges (``edge_relp``), still two forwards and one backward.

    python -c "from attrpatch import load_model, make_batch; from attrpatch.methods import run_method, MethodConfig; m = load_model('ioi-tiny'); r = run_method('relp', m, make_batch('ioi', m.tokenizer, 8), MethodConfig(kinds=('mlp_out', 'resid_pre'))); print([(n.component, tuple(n.scores.shape)) for n in r.nodes])"

Algorithm (Rezaei Jafari, Eberle, Khakzar & Nanda 2025, "RelP: Faithful and Efficient Circuit Discovery via
Relevance Patching", arXiv:2508.21258; the rules as the authors' code implements them,
github.com/FarnoushRJ/RelP, ``TransformerLens/transformer_lens``). Exactly AtP's steps (``attribution``
for nodes, ``edge_attribution`` for edges) with one change: the run forward is taken with the engine's LRP
``rules`` (``engine.forward(rules=…)``), which leave every forward value bit-identical and replace the
backward of three ops, so the one backward returns the LRP propagation coefficient ĝ instead of the gradient.

1. Patch forward: the patch prompt, no graph; keep ``a_patch`` at every site (edges: every source's write).
2. Run forward with autograd under the rules; keep ``a_run``.
3. One backward: ``ĝ = "∂" Σ_prompts metric / "∂" site`` through the modified backward (edges: at every
   target's input, the engine's split q/k/v and MLP inputs).
4. Score, one einsum per kind (edges: per block of targets, ``core.edge_scores``):

       RelP(n)     = Σ_d ĝ_d(run) · (a_patch − a_run)_d
       RelP(u → v) = Σ_pos Σ_d ĝ_{input of v, d}(run) · (write_u,patch − write_u,run)_d

5. Views as AtP's (``per_position=False`` sums positions, ``per_prompt=False`` averages prompts).

The rules (``RelpOptions.rules``; names of the engine's ``LRP_RULES``; the authors' names in brackets):

* ``"ln"`` [LN-rule, Ali et al. 2022]: every LayerNorm (ln1, ln2, ln_final) with its scale σ held
  constant in the backward: ``ĝ_x = (γ⊙ĝ_y − mean(γ⊙ĝ_y)) / σ``; the centring stays differentiable.
* ``"gelu"`` [Identity-rule, Rezaei Jafari et al. 2024]: ``ĝ_x = ĝ_y · GELU(x) / x̃`` with
  ``x̃ = x + 1e-6 · (sign(x), or 1 where x = 0)`` (their ``stabilize``), so ``x·ĝ_x = GELU(x)·ĝ_y``.
* ``"ah"`` [AH-rule, Ali et al. 2022]: the attention pattern is a constant of the backward (no gradient
  into the scores, so queries and keys get ĝ = 0 and their RelP scores are exactly 0); the values get the
  full ``Aᵀ ĝ_z``; ``∂/∂pattern`` itself is unchanged.
* Everything else is the plain gradient: linear maps (0-rule, Montavon et al. 2019; biases absorb
  relevance), residual additions, the unembedding and the metric. No ε-rule. (The authors' Half-rule is for
  gated MLPs, which GPT-2 does not have.)

Which set is "the paper's" (the default here, ``("ln", "gelu", "ah")``): the authors' README lists exactly
these three for a GPT-2 (LN-rule, Identity-rule, AH-rule, plus the 0-rule for linear layers), and the code as
first published (26 Aug 2025, two days before the paper) had them switched on by default. The later "Bugs
fixed" commit drops AH-rule from the default list, and its demo sets the flags after building the model, so
there the GELU rule (installed at construction) does not take effect either — that demo runs the LN-rule
alone. Which of the two produced the paper's table could not be settled without the paper's text;
``rules=["ln"]`` reproduces the later demo, ``rules=[]`` is plain AtP.

Conservation (``tests/test_relp.py``): with every rule on, the run's backward is the gradient of the network
with σ, the attention patterns and the GELU ratios GELU(x)/x̃ frozen at the run's values — a map that is
linear in every residual stream once the biases are zero — so with zero biases ``Σ_{pos,d} resid · ĝ`` is
the same at every layer and equals the metric (up to the stabiliser). Conservation holds for ``a · ĝ``;
``Δa · ĝ`` obeys no sum rule. The node and edge scores are tied exactly as AtP's and EAP's are:
``RelP(u) = Σ_v RelP(u → v)`` for every source u, whatever the rules (the residual additions are untouched).

Direction: the authors' demo patches clean activations into the corrupted run with ĝ taken on the corrupted
run (our ``denoise``, the default); ``noise`` is the same on the clean run. Reported (GPT-2 small, IOI,
Pearson against activation patching, AtP → RelP): residual stream 0.753 → 0.968, attention outputs
0.979 → 0.962, MLP outputs 0.195 → 0.992; GPT-2 large MLP outputs 0.006 → 0.956.

``edge_relp`` carries the same rules to EAP's graph (not in the paper's material seen here: the substitution
is the natural one, ``core.edge_scores`` with the rules in the target gradients). With ``"ah"`` every edge
into a query or key input scores 0 (Q- and K-composition is invisible), so drop ``"ah"`` to score them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from attrpatch.engine import Weights, weights
from attrpatch.graph import EdgeGraph
from attrpatch.methods import MethodConfig, Options, register, register_cost
from attrpatch.methods.core import (
    ATP_KINDS,
    Cost,
    TargetGrads,
    Work,
    as_scores,
    atp_cost,
    atp_scores,
    edge_axes,
    edge_loop_cost,
    edge_scores,
    target_grads,
    views,
)
from attrpatch.models import LoadedModel
from attrpatch.scores import EdgeScores, MethodResult, NodeScores
from attrpatch.tasks import PromptBatch

Rule = Literal["ln", "gelu", "ah"]
PAPER_RULES: tuple[Rule, ...] = ("ln", "gelu", "ah")


@dataclass(frozen=True)
class RelpOptions(Options):
    rules: tuple[Rule, ...] = PAPER_RULES  # the LRP rules of the backward (module docstring); () = plain AtP


def relp_scores(w: Weights, batch: PromptBatch, kinds: tuple[str, ...] = ATP_KINDS,
                directions: tuple[str, ...] = ("denoise",), rules: tuple[str, ...] = PAPER_RULES,
                ) -> dict[tuple[str, str], tuple[Tensor, tuple[str, ...]]]:
    """Steps 1–4 for nodes on any engine weights: ``{(direction, kind): (scores, axes)}``, per prompt and
    position."""
    return atp_scores(w, batch, kinds, directions, rules=frozenset(rules))


def edge_relp_scores(w: Weights, batch: PromptBatch, directions: tuple[str, ...] = ("denoise",),
                     rules: tuple[str, ...] = PAPER_RULES, per_prompt: bool = True, per_position: bool = True,
                     max_rows: int = 256) -> dict[str, Tensor]:
    """Steps 1–4 for edges: ``{direction: scores}`` with axes ``edge_axes(per_prompt, per_position)``."""
    frozen = frozenset(rules)

    def grads(w: Weights, part: PromptBatch, run: Tensor, patch: Tensor, rows: int) -> tuple[Tensor, TargetGrads]:
        return target_grads(w, run, part.answer_pos, part.answer_ids, part.wrong_ids, rules=frozen)

    return edge_scores(w, batch, grads, directions, per_prompt, per_position, max_rows)


@register("relp", produces="nodes", options=RelpOptions, kinds=ATP_KINDS)
def relp(model: LoadedModel, batch: PromptBatch, cfg: MethodConfig) -> MethodResult:
    """RelP (Rezaei Jafari et al. 2025): AtP with LRP propagation coefficients (LN, GELU, attention rules)."""
    kinds = tuple(k for k in ATP_KINDS if k in (cfg.kinds or ATP_KINDS))
    nodes = []
    for (direction, kind), (s, axes) in relp_scores(weights(model), batch, kinds, cfg.directions,
                                                    cfg.options.rules).items():
        s, axes = views(s, axes, cfg.per_prompt, cfg.per_position)
        nodes.append(NodeScores(kind, direction, as_scores(s), axes))
    return MethodResult(nodes=nodes)


@register("edge_relp", produces="edges", options=RelpOptions)
def edge_relp(model: LoadedModel, batch: PromptBatch, cfg: MethodConfig) -> MethodResult:
    """Edge RelP: EAP with LRP propagation coefficients at every target's input (same rules as relp)."""
    w = weights(model)
    scores = edge_relp_scores(w, batch, cfg.directions, cfg.options.rules, cfg.per_prompt, cfg.per_position,
                              cfg.max_rows)
    index = EdgeGraph.of(w).index()
    axes = edge_axes(cfg.per_prompt, cfg.per_position)
    return MethodResult(edges=[EdgeScores(d, index, as_scores(s), axes) for d, s in scores.items()])


@register_cost("relp")
def relp_cost(w: Work, cfg: MethodConfig) -> Cost:
    return atp_cost(w, cfg, tuple(cfg.kinds or ATP_KINDS))


@register_cost("edge_relp")
def edge_relp_cost(w: Work, cfg: MethodConfig) -> Cost:
    return edge_loop_cost(w, cfg, n_grad_rows=w.n)
