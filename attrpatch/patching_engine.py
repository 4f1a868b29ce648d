"""Patched forwards that restart at the patched layer and compute only the positions a patch can change.

    python -c "from attrpatch.patching_engine import suffix_metric; help(suffix_metric)"

Private helper of ``methods/activation.py``. GPT-2 attention is causal, so a patch at layer ``L`` and
position ``p0`` leaves every position ``< p0`` unchanged at every layer. A patched forward therefore

1. starts at block ``L`` from the cached residual stream of the unpatched run, positions ``p0 …`` only
   (the *suffix*; ``p0 = 0`` when a patch covers all positions);
2. in every block reads the keys and values of positions ``< p0`` from the unpatched run's cache and
   computes queries, keys, values, attention and MLP for the suffix only;
3. applies the patches through ``edit(site, x)`` at the sites of block ``L`` (same site names and order
   as ``engine.block``; positions in suffix coordinates);
4. in the last block (when it is not the patched one) computes the query, attention and MLP at each row's
   answer position only, because nothing else reaches the metric;
5. returns the logit difference directly: ``ln_final(x) · (W_U[:, answer] − W_U[:, wrong]) + Δb_U``, so the
   ``d_model × vocab`` unembedding is never formed.

Rows are independent patched runs (any mix of prompts and patches sharing ``L`` and ``p0``); row ``r``
belongs to prompt ``prompt[r]`` and reads that prompt's cache. The numbers equal ``engine.forward`` with the
same edits (``tests/test_activation.py`` checks against TransformerLens and a one-patch-per-forward loop).
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

from attrpatch.engine import Weights

SiteEdit = Callable[[str, Tensor], Tensor]


@dataclass(frozen=True, eq=False)
class Fused:
    """Weights rearranged for row-batched suffix forwards: one q/k/v matmul, one output matmul per block."""

    W_qkv: Float[Tensor, "layer d_model qkv"]  # qkv = 3 · head · d_head, ordered (q|k|v, head, d_head)
    b_qkv: Float[Tensor, "layer qkv"]
    W_O: Float[Tensor, "layer hd d_model"]  # hd = head · d_head


_FUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fused(w: Weights) -> Fused:
    """The fused layout of ``w``, built once per ``Weights``."""
    if w not in _FUSED:
        L, H, D, E = w.W_Q.shape
        W = torch.stack([w.W_Q, w.W_K, w.W_V], dim=1)  # [L 3 H D E]
        b = torch.stack([w.b_Q, w.b_K, w.b_V], dim=1)  # [L 3 H E]
        _FUSED[w] = Fused(
            W_qkv=W.permute(0, 3, 1, 2, 4).reshape(L, D, 3 * H * E).contiguous(),
            b_qkv=b.reshape(L, 3 * H * E).contiguous(),
            W_O=w.W_O.reshape(L, H * E, D).contiguous(),
        )
    return _FUSED[w]


@dataclass(frozen=True)
class RunCache:
    """What patched forwards read from the unpatched run: the residual stream entering each block and
    each block's keys and values (prompt-indexed)."""

    resid_pre: Float[Tensor, "layer prompt pos d_model"]
    k: Float[Tensor, "layer prompt pos head d_head"]
    v: Float[Tensor, "layer prompt pos head d_head"]


def _ln(x: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _mlp(w: Weights, layer: int, x: Tensor) -> Tensor:
    pre = _ln(x, w.ln2_w[layer], w.ln2_b[layer], w.eps) @ w.W_in[layer] + w.b_in[layer]
    post = F.gelu(pre, approximate="tanh" if w.act == "gelu_new" else "none")
    return post @ w.W_out[layer] + w.b_out[layer]


def _no_edit(site: str, x: Tensor) -> Tensor:
    return x


def _block(w: Weights, fw: Fused, cache: RunCache, L: int, p0: int, prompt: Tensor,
           resid: Float[Tensor, "row suffix d_model"], edit: SiteEdit | None) -> Float[Tensor, "row suffix d_model"]:
    """Steps 2–3: block ``L`` on positions ``p0 … p0 + S − 1`` (S = resid.shape[1]); keys and values of
    positions ``< p0`` from the run's cache; ``edit`` (if any) patches this block's sites."""
    R, S = resid.shape[:2]
    H, E = w.n_heads, w.d_head
    if edit is not None:
        resid = edit("resid_pre", resid)
    x = _ln(resid, w.ln1_w[L], w.ln1_b[L], w.eps)
    qkv = (x @ fw.W_qkv[L] + fw.b_qkv[L]).view(R, S, 3, H, E)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if edit is not None:
        q, k, v = edit("head_q", q), edit("head_k", k), edit("head_v", v)
    if p0 > 0:
        k = torch.cat([cache.k[L][prompt, :p0], k], dim=1)
        v = torch.cat([cache.v[L][prompt, :p0], v], dim=1)
    scores = torch.einsum("rqhe,rkhe->rhqk", q, k) / math.sqrt(E)
    scores = scores.masked_fill(_causal(p0, S, resid.device), torch.finfo(scores.dtype).min)
    pattern = scores.softmax(-1)
    if edit is not None:
        pattern = edit("head_pattern", pattern)
    z = torch.einsum("rhqk,rkhe->rqhe", pattern, v)
    if edit is not None:
        z = edit("head_out", z)
    attn = z.reshape(R, S, H * E) @ fw.W_O[L] + w.b_O[L]
    if edit is not None:
        attn = edit("attn_out", attn)
    resid = resid + attn
    if edit is not None:
        resid = edit("resid_mid", resid)
    mlp = _mlp(w, L, resid)
    if edit is not None:
        mlp = edit("mlp_out", mlp)
    return resid + mlp


def _causal(p0: int, S: int, device: torch.device) -> Tensor:
    """[S, p0 + S]: True where key position > query position (query i sits at p0 + i)."""
    keys = torch.arange(p0 + S, device=device)
    return keys[None, :] > (p0 + torch.arange(S, device=device))[:, None]


def suffix_metric(w: Weights, cache: RunCache, layer: int, p0: int, prompt: Int[Tensor, " row"],
                  answer_pos: Int[Tensor, " row"], unembed_dir: Float[Tensor, "row d_model"],
                  unembed_bias: Float[Tensor, " row"], n_suffix: int, edit: SiteEdit = _no_edit,
                  narrow: bool = False) -> Float[Tensor, " row"]:
    """Steps 1–5: the logit difference of each row's patched run (patches applied by ``edit`` in block
    ``layer``), computing positions ``p0 … p0 + n_suffix − 1`` only. ``answer_pos`` is absolute and must lie
    in the suffix. ``narrow``: the patches change block ``layer``'s output at ``p0`` only (a query, pattern
    row or cell, head output, attention/MLP output or mid residual at one position), so that block runs on
    position ``p0`` alone and the next block starts from the cached residual stream with ``p0`` replaced."""
    fw = fused(w)
    H, E = w.n_heads, w.d_head
    R, S = prompt.shape[0], n_suffix
    rows = torch.arange(R, device=prompt.device)
    ans = answer_pos - p0  # answer index inside the suffix
    last = w.n_layers - 1
    # Step 1: the unpatched residual stream entering the first block that must run, suffix positions only.
    if narrow and layer < last:
        at_p0 = _block(w, fw, cache, layer, p0, prompt, cache.resid_pre[layer][prompt, p0:p0 + 1], edit)
        resid = cache.resid_pre[layer + 1][prompt, p0:p0 + S]
        resid[:, :1] = at_p0
        first = layer + 1
    else:
        resid = cache.resid_pre[layer][prompt, p0:p0 + S]
        first = layer
    for L in range(first, w.n_layers):
        if L == last and L != layer:
            # Step 4: the last block at the answer position only (keys/values still over the whole suffix).
            x = _ln(resid, w.ln1_w[L], w.ln1_b[L], w.eps)
            kv = (x @ fw.W_qkv[L][:, H * E:] + fw.b_qkv[L][H * E:]).view(R, S, 2, H, E)
            k, v = kv[:, :, 0], kv[:, :, 1]
            if p0 > 0:
                k = torch.cat([cache.k[L][prompt, :p0], k], dim=1)
                v = torch.cat([cache.v[L][prompt, :p0], v], dim=1)
            q_a = (x[rows, ans] @ fw.W_qkv[L][:, :H * E] + fw.b_qkv[L][:H * E]).view(R, H, E)
            scores = torch.einsum("rhe,rkhe->rhk", q_a, k) / math.sqrt(E)
            scores = scores.masked_fill(_causal(p0, S, resid.device)[ans][:, None, :], torch.finfo(scores.dtype).min)
            z = torch.einsum("rhk,rkhe->rhe", scores.softmax(-1), v)
            mid = resid[rows, ans] + z.reshape(R, H * E) @ fw.W_O[L] + w.b_O[L]
            final = mid + _mlp(w, L, mid)
            break
        # Steps 2–3: a block on the suffix, patched when it is the patched block.
        resid = _block(w, fw, cache, L, p0, prompt, resid, edit if L == layer else None)
    else:
        final = resid[rows, ans]
    # Step 5: the logit difference without the full unembedding.
    return (_ln(final, w.lnf_w, w.lnf_b, w.eps) * unembed_dir).sum(-1) + unembed_bias
