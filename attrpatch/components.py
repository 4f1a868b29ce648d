"""The component vocabulary (``docs/DESIGN.md``) and the one place that spells site and hook names.

    python -c "from attrpatch.components import NODE_KINDS, hook_name; print(NODE_KINDS, hook_name('head_q', 3))"

Kinds and their axes (``layer`` is 0 for ``embed``/``pos_embed`` and ``n_layers`` for ``logits``):

=================  =====================================  ===========================================
kind               what                                   site tensor in the engine
=================  =====================================  ===========================================
embed              token embedding (node); token+position  ``batch pos d_model``
                   embedding written to the residual
                   stream (edge source)
pos_embed          position embedding                      ``batch pos d_model``
resid_pre/mid/post residual stream at a layer              ``batch pos d_model``
attn_out, mlp_out  a layer's attention / MLP output        ``batch pos d_model``
head_out           one head's output z (result = z·W_O)    ``batch pos head d_head``
head_q/k/v         one head's query / key / value          ``batch pos head d_head``
head_q_in/k_in/    one head's q/k/v *input* (edge target;  ``batch pos head d_model``
  v_in             written ``head_q`` etc. in Parquet)
head_pattern       attention pattern                       ``batch head pos src_pos``
mlp_in             a layer's MLP input (edge target)       ``batch pos d_model``
logits             the unembedding input (edge target)     ``batch pos d_model``
=================  =====================================  ===========================================
"""

from __future__ import annotations

from dataclasses import dataclass

# Node kinds as they appear in the Parquet ``component`` column.
RESID_KINDS = ("resid_pre", "resid_mid", "resid_post")
LAYER_KINDS = ("attn_out", "mlp_out")
HEAD_VECTOR_KINDS = ("head_out", "head_q", "head_k", "head_v")
NODE_KINDS = ("embed", "pos_embed", *RESID_KINDS, *LAYER_KINDS, *HEAD_VECTOR_KINDS, "head_pattern")

# Edges: sources write to the residual stream (embed, head_out, mlp_out), targets read it. The engine site
# that holds each target's input (split per head for q/k/v; ``engine.forward(split=True)``):
DST_INPUT_SITE = {"head_q": "head_q_in", "head_k": "head_k_in", "head_v": "head_v_in",
                  "mlp_in": "mlp_in", "logits": "logits"}
QKV = ("head_q", "head_k", "head_v")
QKV_INPUT_SITES = tuple(DST_INPUT_SITE[k] for k in QKV)  # the engine's per-head q/k/v input sites, in order
DIRECTIONS = ("denoise", "noise")  # denoise: run corrupted, patch clean (TL `patching`); noise: the reverse


@dataclass(frozen=True, order=True)
class Node:
    """One component instance; ``head`` is None for non-head kinds."""

    component: str
    layer: int
    head: int | None = None


# TransformerLens hook names, for oracles and for code that must talk to the bridge's hooks.
_TL_HOOKS = {
    "embed": "hook_embed",
    "pos_embed": "hook_pos_embed",
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "head_out": "blocks.{layer}.attn.hook_z",
    "head_q": "blocks.{layer}.attn.hook_q",
    "head_k": "blocks.{layer}.attn.hook_k",
    "head_v": "blocks.{layer}.attn.hook_v",
    "head_pattern": "blocks.{layer}.attn.hook_pattern",
    "logits": "ln_final.hook_in",
}


def hook_name(kind: str, layer: int = 0) -> str:
    """The TransformerLens hook name of a node kind at a layer."""
    try:
        return _TL_HOOKS[kind].format(layer=layer)
    except KeyError:
        raise ValueError(f"no TransformerLens hook for component {kind!r}; known: {sorted(_TL_HOOKS)}") from None
