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


def suffix_metric(w: Weights, cache: RunCache, layer: int, p0: int, prompt: Int[Tensor, " row"],
                  answer_pos: Int[Tensor, " row"], unembed_dir: Float[Tensor, "row d_model"],
                  unembed_bias: Float[Tensor, " row"], n_suffix: int,
                  edit: SiteEdit = _no_edit) -> Float[Tensor, " row"]:
    """Steps 1–5: the logit difference of each row's patched run (patches applied by ``edit`` in block
    ``layer``), computing positions ``p0 … p0 + n_suffix − 1`` only. ``answer_pos`` is absolute and must lie
    in the suffix."""
    fw = fused(w)
    H, E = w.n_heads, w.d_head
    R, S = prompt.shape[0], n_suffix
    rows = torch.arange(R, device=prompt.device)
    ans = answer_pos - p0  # answer index inside the suffix
    # Step 1: the unpatched residual stream entering block `layer`, suffix positions only.
    resid = cache.resid_pre[layer][prompt, p0:p0 + S]
    keys_pos = torch.arange(p0 + S, device=prompt.device)
    causal = keys_pos[None, :] > (p0 + torch.arange(S, device=prompt.device))[:, None]  # [S, p0+S]
    scale = math.sqrt(E)
    for L in range(layer, w.n_layers):
        here = L == layer
        if here:  # Step 3: patches at this block's sites
            resid = edit("resid_pre", resid)
        x = _ln(resid, w.ln1_w[L], w.ln1_b[L], w.eps)
        qkv = (x @ fw.W_qkv[L] + fw.b_qkv[L]).view(R, S, 3, H, E)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if here:
            q, k, v = edit("head_q", q), edit("head_k", k), edit("head_v", v)
        # Step 2: keys and values of the unchanged prefix come from the run's cache.
        if p0 > 0:
            k = torch.cat([cache.k[L][prompt, :p0], k], dim=1)
            v = torch.cat([cache.v[L][prompt, :p0], v], dim=1)
        if L == w.n_layers - 1 and not here:
            # Step 4: the last block at the answer position only.
            q_a = q[rows, ans]  # [R H E]
            scores = torch.einsum("rhe,rkhe->rhk", q_a, k) / scale
            scores = scores.masked_fill(causal[ans][:, None, :], torch.finfo(scores.dtype).min)
            z = torch.einsum("rhk,rkhe->rhe", scores.softmax(-1), v)
            mid = resid[rows, ans] + z.reshape(R, H * E) @ fw.W_O[L] + w.b_O[L]
            final = mid + _mlp(w, L, mid)
            break
        scores = torch.einsum("rqhe,rkhe->rhqk", q, k) / scale
        scores = scores.masked_fill(causal, torch.finfo(scores.dtype).min)
        pattern = scores.softmax(-1)
        if here:
            pattern = edit("head_pattern", pattern)
        z = torch.einsum("rhqk,rkhe->rqhe", pattern, v)
        if here:
            z = edit("head_out", z)
        attn = z.reshape(R, S, H * E) @ fw.W_O[L] + w.b_O[L]
        if here:
            attn = edit("attn_out", attn)
        resid = resid + attn
        if here:
            resid = edit("resid_mid", resid)
        mlp = _mlp(w, L, resid)
        if here:
            mlp = edit("mlp_out", mlp)
        resid = resid + mlp
    else:
        final = resid[rows, ans]
    # Step 5: the logit difference without the full unembedding.
    return (_ln(final, w.lnf_w, w.lnf_b, w.eps) * unembed_dir).sum(-1) + unembed_bias
