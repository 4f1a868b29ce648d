"""A functional GPT-2 forward over a bridge's weights, with an edit callback at every component site.

    python -c "from attrpatch.engine import weights; from attrpatch import load_model; print(weights(load_model('ioi-tiny')).n_layers)"

Why not the bridge's hooks: every method here needs things the hook path makes slow or impossible — starting
a forward at layer L from a cached residual stream, many patched copies of a prompt along the batch axis,
per-head q/k/v inputs for edge gradients, logits only at the answer position. The engine computes exactly
what the bridge computes (``tests/test_engine.py`` checks logits and every activation against the bridge's
``run_with_cache``), from the bridge's own weights, with no hooks at all.

Sites, in the order ``edit(kind, layer, x)`` sees them (see ``components.py`` for shapes):
``embed, pos_embed`` (layer 0), then per layer ``resid_pre``, [``head_q_in, head_k_in, head_v_in`` when
``split``], ``head_q, head_k, head_v, head_pattern, head_out`` (z), ``attn_out, resid_mid``, [``mlp_in``
when ``split``], ``mlp_out, resid_post``; last ``logits`` (layer n_layers, the input of ``ln_final``).
An edit returns the tensor to use from then on: itself to observe, another tensor to patch.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

Edit = Callable[[str, int, Tensor], Tensor]


def _identity(kind: str, layer: int, x: Tensor) -> Tensor:
    return x


@dataclass(frozen=True, eq=False)
class Weights:
    """GPT-2 parameters in TransformerLens layout (``[layer, head, d_model, d_head]`` …), never trained."""

    W_E: Float[Tensor, "vocab d_model"]
    W_pos: Float[Tensor, "n_ctx d_model"]
    ln1_w: Float[Tensor, "layer d_model"]
    ln1_b: Float[Tensor, "layer d_model"]
    W_Q: Float[Tensor, "layer head d_model d_head"]
    b_Q: Float[Tensor, "layer head d_head"]
    W_K: Float[Tensor, "layer head d_model d_head"]
    b_K: Float[Tensor, "layer head d_head"]
    W_V: Float[Tensor, "layer head d_model d_head"]
    b_V: Float[Tensor, "layer head d_head"]
    W_O: Float[Tensor, "layer head d_head d_model"]
    b_O: Float[Tensor, "layer d_model"]
    ln2_w: Float[Tensor, "layer d_model"]
    ln2_b: Float[Tensor, "layer d_model"]
    W_in: Float[Tensor, "layer d_model d_mlp"]
    b_in: Float[Tensor, "layer d_mlp"]
    W_out: Float[Tensor, "layer d_mlp d_model"]
    b_out: Float[Tensor, "layer d_model"]
    lnf_w: Float[Tensor, " d_model"]
    lnf_b: Float[Tensor, " d_model"]
    W_U: Float[Tensor, "d_model vocab"]
    b_U: Float[Tensor, " vocab"]
    eps: float
    act: str  # "gelu_new" (tanh approximation) or "gelu"

    @property
    def n_layers(self) -> int:
        return self.W_Q.shape[0]

    @property
    def n_heads(self) -> int:
        return self.W_Q.shape[1]

    @property
    def d_model(self) -> int:
        return self.W_Q.shape[2]

    @property
    def d_head(self) -> int:
        return self.W_Q.shape[3]

    @property
    def device(self) -> torch.device:
        return self.W_E.device


_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def weights(model) -> Weights:
    """The weights of a ``LoadedModel`` or ``TransformerBridge`` (GPT-2), extracted once per bridge."""
    bridge = getattr(model, "bridge", model)
    if bridge in _WEIGHTS:
        return _WEIGHTS[bridge]
    with torch.no_grad():
        blocks = bridge.blocks
        ln = lambda m: m.original_component  # noqa: E731  (the HF LayerNorm inside the bridge)
        hf_cfg = bridge.original_model.config
        act = hf_cfg.activation_function
        if act not in ("gelu_new", "gelu", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported GPT-2 activation {act!r}: attrpatch supports gelu_new and gelu")
        get = lambda name: getattr(bridge, name).detach().clone()  # noqa: E731
        w = Weights(
            W_E=get("W_E"), W_pos=get("W_pos"),
            ln1_w=torch.stack([ln(b.ln1).weight for b in blocks]).detach().clone(),
            ln1_b=torch.stack([ln(b.ln1).bias for b in blocks]).detach().clone(),
            W_Q=get("W_Q"), b_Q=get("b_Q"), W_K=get("W_K"), b_K=get("b_K"), W_V=get("W_V"), b_V=get("b_V"),
            W_O=get("W_O"), b_O=get("b_O"),
            ln2_w=torch.stack([ln(b.ln2).weight for b in blocks]).detach().clone(),
            ln2_b=torch.stack([ln(b.ln2).bias for b in blocks]).detach().clone(),
            W_in=get("W_in"), b_in=get("b_in"), W_out=get("W_out"), b_out=get("b_out"),
            lnf_w=ln(bridge.ln_final).weight.detach().clone(), lnf_b=ln(bridge.ln_final).bias.detach().clone(),
            W_U=get("W_U"), b_U=get("b_U"),
            eps=float(hf_cfg.layer_norm_epsilon),
            act="gelu" if act == "gelu" else "gelu_new",
        )
    _WEIGHTS[bridge] = w
    return w


def _ln(x: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def embed(w: Weights, tokens: Int[Tensor, "batch pos"], edit: Edit = _identity) -> Float[Tensor, "batch pos d_model"]:
    """Token + position embedding: the residual stream entering block 0."""
    tok = edit("embed", 0, w.W_E[tokens])
    pos = edit("pos_embed", 0, w.W_pos[: tokens.shape[1]].expand(tokens.shape[0], -1, -1))
    return tok + pos


def block(w: Weights, layer: int, resid: Float[Tensor, "batch pos d_model"], edit: Edit = _identity,
          split: bool = False) -> Float[Tensor, "batch pos d_model"]:
    """One transformer block. ``split`` gives every head its own q/k/v input and the MLP its own input,
    so gradients with respect to those inputs are per edge target (values are unchanged)."""
    L = layer
    resid = edit("resid_pre", L, resid)
    n_pos = resid.shape[1]
    if split:
        # A view of its own per site: an edit callback that keeps the tensor it is handed (to take its
        # gradient) then gets the gradient through that site only, not the q+k+v sum.
        q_in, k_in, v_in = (edit(k, L, resid[:, :, None, :].expand(-1, -1, w.n_heads, -1))
                            for k in ("head_q_in", "head_k_in", "head_v_in"))
        q_x, k_x, v_x = (_ln(x, w.ln1_w[L], w.ln1_b[L], w.eps) for x in (q_in, k_in, v_in))
        q = torch.einsum("bphd,hde->bphe", q_x, w.W_Q[L]) + w.b_Q[L]
        k = torch.einsum("bphd,hde->bphe", k_x, w.W_K[L]) + w.b_K[L]
        v = torch.einsum("bphd,hde->bphe", v_x, w.W_V[L]) + w.b_V[L]
    else:
        x = _ln(resid, w.ln1_w[L], w.ln1_b[L], w.eps)
        q = torch.einsum("bpd,hde->bphe", x, w.W_Q[L]) + w.b_Q[L]
        k = torch.einsum("bpd,hde->bphe", x, w.W_K[L]) + w.b_K[L]
        v = torch.einsum("bpd,hde->bphe", x, w.W_V[L]) + w.b_V[L]
    q, k, v = edit("head_q", L, q), edit("head_k", L, k), edit("head_v", L, v)
    scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(w.d_head)
    causal = torch.ones(n_pos, n_pos, dtype=torch.bool, device=scores.device).triu(1)
    scores = scores.masked_fill(causal, torch.finfo(scores.dtype).min)
    pattern = edit("head_pattern", L, scores.softmax(-1))
    z = edit("head_out", L, torch.einsum("bhqk,bkhe->bqhe", pattern, v))
    attn_out = edit("attn_out", L, torch.einsum("bqhe,hed->bqd", z, w.W_O[L]) + w.b_O[L])
    resid_mid = edit("resid_mid", L, resid + attn_out)
    mlp_in = edit("mlp_in", L, resid_mid.clone()) if split else resid_mid
    pre = _ln(mlp_in, w.ln2_w[L], w.ln2_b[L], w.eps) @ w.W_in[L] + w.b_in[L]
    post = F.gelu(pre, approximate="tanh" if w.act == "gelu_new" else "none")
    mlp_out = edit("mlp_out", L, post @ w.W_out[L] + w.b_out[L])
    return edit("resid_post", L, resid_mid + mlp_out)


def unembed(w: Weights, resid: Float[Tensor, "batch pos d_model"], answer_pos: Int[Tensor, " batch"],
            edit: Edit = _identity, split: bool = False) -> Float[Tensor, "batch vocab"]:
    """Logits at each row's answer position only (the metric never reads any other position)."""
    x = edit("logits", w.n_layers, resid.clone() if split else resid)
    rows = torch.arange(x.shape[0], device=x.device)
    final = x[rows, answer_pos.to(x.device)]
    return _ln(final, w.lnf_w, w.lnf_b, w.eps) @ w.W_U + w.b_U


def forward(w: Weights, tokens: Int[Tensor, "batch pos"] | None, answer_pos: Int[Tensor, " batch"],
            edit: Edit = _identity, split: bool = False, start: int = 0,
            resid: Float[Tensor, "batch pos d_model"] | None = None) -> Float[Tensor, "batch vocab"]:
    """Logits at the answer positions. With ``start=L`` and ``resid`` (the residual stream entering block
    L, e.g. from a cache) the forward restarts at block L and ``tokens`` is not used."""
    if start == 0 and resid is None:
        resid = embed(w, tokens, edit)
    elif resid is None:
        raise ValueError("forward(start=L) needs resid, the residual stream entering block L")
    for layer in range(start, w.n_layers):
        resid = block(w, layer, resid, edit, split)
    return unembed(w, resid, answer_pos, edit, split)


class Recorder:
    """An edit that keeps the tensors of the chosen kinds (all when ``kinds`` is None), keyed (kind, layer)."""

    def __init__(self, kinds: tuple[str, ...] | None = None, inner: Edit = _identity):
        self.kinds = None if kinds is None else frozenset(kinds)
        self.inner = inner
        self.acts: dict[tuple[str, int], Tensor] = {}

    def __call__(self, kind: str, layer: int, x: Tensor) -> Tensor:
        x = self.inner(kind, layer, x)
        if self.kinds is None or kind in self.kinds:
            self.acts[(kind, layer)] = x
        return x


def run_with_acts(w: Weights, tokens: Int[Tensor, "batch pos"], answer_pos: Int[Tensor, " batch"],
                  kinds: tuple[str, ...] | None = None, split: bool = False,
                  edit: Edit = _identity) -> tuple[Float[Tensor, "batch vocab"], dict[tuple[str, int], Tensor]]:
    """Answer-position logits and the activations of ``kinds`` (all sites when None)."""
    rec = Recorder(kinds, inner=edit)
    logits = forward(w, tokens, answer_pos, rec, split)
    return logits, rec.acts
