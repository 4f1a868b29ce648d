"""The one GPT-2 forward of attrpatch: the bridge's own weights, an edit callback at every component site,
and the modes every method needs.

    python -c "from attrpatch.engine import weights; from attrpatch import load_model; print(weights(load_model('ioi-tiny')).n_layers)"

Why not the bridge's hooks: the methods need things the hook path makes slow or impossible — a forward
that restarts at block L from a cached residual stream, that computes only the positions from p0 on
(earlier keys and values come from a cache: attention is causal), many patched copies of a prompt along the
batch axis, per-head q/k/v inputs for edge gradients, the last block at the answer position only, and a
logit-difference readout that never forms the vocabulary-sized logits. The engine computes what the
bridge computes (``tests/test_engine.py`` checks logits and every activation against the bridge's
``run_with_cache``, in every mode), from the bridge's own parameter tensors: no copy of the weights is made.

Modes (combine freely):

* ``forward(w, tokens, answer_pos)``: logits at each row's answer position (``[row, vocab]``).
* ``split=True``: every head gets its own q/k/v input and the MLP and unembedding their own input, so a
  gradient with respect to those inputs is per edge target (values are unchanged).
* ``start=Start(layer, resid, p0, past, prompt)``: restart at block ``layer`` from ``resid`` (the
  residual stream entering it at positions ``p0 …``); keys and values of positions ``< p0`` come from
  ``past`` (a ``KV`` cache of the unpatched run, row ``r`` reading prompt ``prompt[r]``).
* ``answer_only=True``: the last block computes its query, attention and MLP at each row's answer position
  only (keys and values still at every position), unless it is the block the forward starts at and an edit
  (anything but ``identity``) could act in it at other positions.
* ``diff=(answer_ids, wrong_ids)``: return the logit difference ``ln_final(x) · (W_U[:, a] − W_U[:, b]) +
  b_U[a] − b_U[b]`` (``[row]``) instead of logits.
* ``rules=frozenset({"ln", "gelu", "ah"})`` (any subset of ``LRP_RULES``): the LRP rules of RelP
  (``methods/relp.py``). Forward values are bit-identical (the same kernels run); only the backward of
  the named ops changes, so a gradient taken through the forward is the LRP propagation coefficient:
  ``"ln"`` — every LayerNorm (ln1, ln2, ln_final) with its scale σ treated as a constant
  (``ĝ_x = (w⊙ĝ_y − mean(w⊙ĝ_y)) / σ``, Ali et al. 2022's LN-rule); ``"gelu"`` — the MLP activation with
  the identity rule (``ĝ_x = ĝ_y · GELU(x) / x̃``, ``x̃ = x + 1e-6·(sign(x) or 1)``); ``"ah"`` — the
  attention pattern with no gradient into the scores (AH-rule: q and k get zero gradient; ``∂/∂pattern``
  itself is unchanged).

Sites, in the order ``edit(kind, layer, x)`` sees them (shapes in ``components.py``): ``embed, pos_embed``
(layer 0), then per layer ``resid_pre``, [``head_q_in, head_k_in, head_v_in`` when split], ``head_q,
head_k, head_v, head_pattern, head_out`` (z), ``attn_out, resid_mid``, [``mlp_in`` when split],
``mlp_out, resid_post``; last ``logits`` (layer n_layers, the input of ``ln_final``). An edit returns the
tensor to use from then on: itself to observe, another tensor to patch. Keys and values passed to an edit
cover the computed positions only (not the cached ``< p0``).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import einsum
from jaxtyping import Float, Int
from torch import Tensor

from attrpatch.components import QKV_INPUT_SITES

Edit = Callable[[str, int, Tensor], Tensor]


def identity(kind: str, layer: int, x: Tensor) -> Tensor:
    """The edit that changes nothing."""
    return x


@dataclass(frozen=True, eq=False)
class Layer:
    """One block's parameters, as the Hugging Face GPT-2 stores them (``Conv1D``: ``x @ W``); no copies."""

    ln1_w: Float[Tensor, " d_model"]
    ln1_b: Float[Tensor, " d_model"]
    W_qkv: Float[Tensor, "d_model qkv"]  # qkv = 3 · head · d_head, ordered (q|k|v, head, d_head)
    b_qkv: Float[Tensor, " qkv"]
    W_O: Float[Tensor, "hd d_model"]  # hd = head · d_head
    b_O: Float[Tensor, " d_model"]
    ln2_w: Float[Tensor, " d_model"]
    ln2_b: Float[Tensor, " d_model"]
    W_in: Float[Tensor, "d_model d_mlp"]
    b_in: Float[Tensor, " d_mlp"]
    W_out: Float[Tensor, "d_mlp d_model"]
    b_out: Float[Tensor, " d_model"]


@dataclass(frozen=True, eq=False)
class Weights:
    """GPT-2 parameters: per-layer views of the bridge's own tensors (``layers[L]``), never trained."""

    W_E: Float[Tensor, "vocab d_model"]
    W_pos: Float[Tensor, "n_ctx d_model"]
    layers: tuple[Layer, ...]
    lnf_w: Float[Tensor, " d_model"]
    lnf_b: Float[Tensor, " d_model"]
    W_U: Float[Tensor, "d_model vocab"]
    b_U: Float[Tensor, " vocab"]
    n_heads: int
    eps: float
    act: str  # "gelu_new" (tanh approximation) or "gelu"

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.W_E.shape[1]

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_mlp(self) -> int:
        return self.layers[0].W_in.shape[1]

    @property
    def device(self) -> torch.device:
        return self.W_E.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype: every matmul runs in it."""
        return self.W_E.dtype

    @property
    def resid_dtype(self) -> torch.dtype:
        """The residual stream's dtype: float32 under lower-precision weights (the stream is a long sum of
        component writes; keeping it, LayerNorm, softmax and the readout in float32 keeps bfloat16 scores
        within rounding of float32 ones), else the weights' own."""
        return torch.float32 if self.dtype in (torch.bfloat16, torch.float16) else self.dtype

    # Head-shaped views in TransformerLens' layout, for methods that contract per head.
    def qkv_heads(self, layer: int, which: int) -> Float[Tensor, "head d_model d_head"]:
        """W_Q (0), W_K (1) or W_V (2) of a layer as ``[head, d_model, d_head]`` (a view)."""
        D, H, E = self.d_model, self.n_heads, self.d_head
        return self.layers[layer].W_qkv.view(D, 3, H, E)[:, which].permute(1, 0, 2)

    def qkv_bias(self, layer: int, which: int) -> Float[Tensor, "head d_head"]:
        return self.layers[layer].b_qkv.view(3, self.n_heads, self.d_head)[which]

    def W_O_heads(self, layer: int) -> Float[Tensor, "head d_head d_model"]:
        return self.layers[layer].W_O.view(self.n_heads, self.d_head, self.d_model)

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> Weights:
        """A copy with ``fn`` applied to every parameter tensor (e.g. ``Tensor.double``; tests use it)."""
        layers = tuple(dataclasses.replace(lyr, **{f: fn(getattr(lyr, f)) for f in Layer.__dataclass_fields__})
                       for lyr in self.layers)
        top = {f: fn(getattr(self, f)) for f in ("W_E", "W_pos", "lnf_w", "lnf_b", "W_U", "b_U")}
        return dataclasses.replace(self, layers=layers, **top)

    def param_bytes(self) -> int:
        """Bytes of distinct parameter storage the engine reads (the bridge's own tensors)."""
        tensors = [self.W_E, self.W_pos, self.lnf_w, self.lnf_b, self.W_U, self.b_U]
        tensors += [getattr(lyr, f) for lyr in self.layers for f in Layer.__dataclass_fields__]
        seen: dict[int, int] = {}
        for t in tensors:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return sum(seen.values())


_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def weights(model) -> Weights:
    """The weights of a ``LoadedModel`` or ``TransformerBridge`` (GPT-2), made once per bridge.

    Every tensor is the Hugging Face model's own parameter (or a view of it): the engine holds no copy, so a
    worker's weight memory is the model's."""
    bridge = getattr(model, "bridge", model)
    if bridge in _WEIGHTS:
        return _WEIGHTS[bridge]
    hf = bridge.original_model
    cfg = hf.config
    act = cfg.activation_function
    if act not in ("gelu_new", "gelu", "gelu_pytorch_tanh"):
        raise ValueError(f"unsupported GPT-2 activation {act!r}: attrpatch supports gelu_new and gelu")
    t = hf.transformer
    p = lambda x: x.detach()  # noqa: E731  (same storage, no autograd history)
    layers = tuple(
        Layer(ln1_w=p(h.ln_1.weight), ln1_b=p(h.ln_1.bias), W_qkv=p(h.attn.c_attn.weight), b_qkv=p(h.attn.c_attn.bias),
              W_O=p(h.attn.c_proj.weight), b_O=p(h.attn.c_proj.bias), ln2_w=p(h.ln_2.weight), ln2_b=p(h.ln_2.bias),
              W_in=p(h.mlp.c_fc.weight), b_in=p(h.mlp.c_fc.bias), W_out=p(h.mlp.c_proj.weight),
              b_out=p(h.mlp.c_proj.bias))
        for h in t.h)
    head = hf.lm_head
    W_U = p(head.weight).T  # tied to W_E in GPT-2: a transposed view
    b_U = p(head.bias) if head.bias is not None else torch.zeros(W_U.shape[1], dtype=W_U.dtype, device=W_U.device)
    w = Weights(W_E=p(t.wte.weight), W_pos=p(t.wpe.weight), layers=layers, lnf_w=p(t.ln_f.weight),
                lnf_b=p(t.ln_f.bias), W_U=W_U, b_U=b_U, n_heads=int(cfg.n_head), eps=float(cfg.layer_norm_epsilon),
                act="gelu" if act == "gelu" else "gelu_new")
    _WEIGHTS[bridge] = w
    return w


def random_weights(shape, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   std: float = 0.02) -> Weights:
    """Weights of a random GPT-2 of ``shape`` (a ``models.ModelShape``), made directly in the engine's layout
    (no Hugging Face model, no second copy of the tied embedding): for benches and the plan's calibration."""
    gen = torch.Generator().manual_seed(seed)
    D, F = shape.d_model, shape.d_mlp

    def r(*size: int) -> Tensor:
        return torch.randn(*size, generator=gen).mul_(std).to(device=device, dtype=dtype)

    def const(value: float, n: int) -> Tensor:
        return torch.full((n,), value, device=device, dtype=dtype)

    layers = tuple(Layer(const(1, D), const(0, D), r(D, 3 * D), const(0, 3 * D), r(D, D), const(0, D),
                         const(1, D), const(0, D), r(D, F), const(0, F), r(F, D), const(0, D))
                   for _ in range(shape.n_layers))
    W_E = r(shape.vocab, D)
    return Weights(W_E=W_E, W_pos=r(shape.n_ctx, D), layers=layers, lnf_w=const(1, D), lnf_b=const(0, D), W_U=W_E.T,
                   b_U=const(0, shape.vocab), n_heads=shape.n_heads, eps=1e-5, act="gelu_new")


def layer_norm(x: Tensor, w: Tensor, b: Tensor, eps: float, rules: frozenset[str] = frozenset()) -> Tensor:
    """LayerNorm in ``x``'s dtype (the residual stream's); ``"ln" in rules``: σ constant in the backward."""
    if "ln" in rules:
        return _LayerNormRule.apply(x, w.to(x.dtype), b.to(x.dtype), eps)
    return F.layer_norm(x, (x.shape[-1],), w.to(x.dtype), b.to(x.dtype), eps)


def gelu(w: Weights, x: Tensor, rules: frozenset[str] = frozenset()) -> Tensor:
    approximate = "tanh" if w.act == "gelu_new" else "none"
    if "gelu" in rules:
        return _GeluIdentityRule.apply(x, approximate)
    return F.gelu(x, approximate=approximate)


# --------------------------------------------------------------------------------------- LRP rules (RelP)
# Each is the engine's own op in the forward (same kernel, same values) with the backward of the rule.

LRP_RULES = ("ln", "gelu", "ah")
GELU_STABILISER = 1e-6  # RelP's ``stabilize``: x̃ = x + 1e-6·(sign(x), or 1 where x = 0)


def check_rules(rules) -> frozenset[str]:
    """``rules`` as a frozenset (None: no rule), or a ValueError naming the unknown ones."""
    rules = frozenset(rules or ())
    if bad := sorted(rules - set(LRP_RULES)):
        raise ValueError(f"unknown LRP rule(s) {bad}: use a subset of {list(LRP_RULES)}")
    return rules


class _LayerNormRule(torch.autograd.Function):
    """LayerNorm forward; backward with σ constant (LN-rule): ĝ_x = (w⊙ĝ_y − mean(w⊙ĝ_y)) / σ."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.eps = eps
        return F.layer_norm(x, (x.shape[-1],), w, b, eps)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        sigma = (x.var(-1, unbiased=False, keepdim=True) + ctx.eps).sqrt()
        gw = g * w
        return (gw - gw.mean(-1, keepdim=True)) / sigma, None, None, None


class _GeluIdentityRule(torch.autograd.Function):
    """GELU forward; backward ĝ_x = ĝ_y · GELU(x) / x̃ (identity rule: x·ĝ_x = y·ĝ_y up to the stabiliser)."""

    @staticmethod
    def forward(ctx, x: Tensor, approximate: str) -> Tensor:
        y = F.gelu(x, approximate=approximate)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        x, y = ctx.saved_tensors
        xw = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        stable = xw + ((xw == 0).to(xw.dtype) + xw.sign()) * GELU_STABILISER
        return g * (y.to(xw.dtype) / stable).to(g.dtype), None


class _SoftmaxAHRule(torch.autograd.Function):
    """Softmax forward; no gradient to the scores (AH-rule: the pattern is a constant of the backward)."""

    @staticmethod
    def forward(ctx, scores: Tensor) -> Tensor:
        return scores.softmax(-1)

    @staticmethod
    def backward(ctx, g: Tensor):
        return torch.zeros_like(g)


@dataclass(frozen=True)
class KV:
    """Keys and values of every block of an unpatched run, prompt-indexed (a restart's ``past``)."""

    k: Float[Tensor, "layer prompt pos head d_head"]
    v: Float[Tensor, "layer prompt pos head d_head"]

    def before(self, layer: int, p0: int, prompt: Int[Tensor, " row"] | None = None) -> tuple[Tensor, Tensor] | None:
        """Keys and values of positions ``< p0`` at ``layer``, one row per ``prompt`` (None: every prompt)."""
        if p0 == 0:
            return None
        rows = prompt if prompt is not None else slice(None)
        return self.k[layer][rows, :p0], self.v[layer][rows, :p0]


@dataclass(frozen=True)
class Start:
    """Where a forward starts instead of the embeddings: block ``layer``, from ``resid`` (the residual
    stream entering it at positions ``p0 … p0 + S − 1``); keys and values of positions ``< p0`` come from
    ``past`` (row ``r`` reads prompt ``prompt[r]``; ``prompt`` None: row r is prompt r)."""

    layer: int
    resid: Float[Tensor, "row suffix d_model"]
    p0: int = 0
    past: KV | None = None
    prompt: Int[Tensor, " row"] | None = None

    def __post_init__(self) -> None:
        if self.p0 > 0 and self.past is None:
            raise ValueError("Start(p0 > 0) needs past, the cached keys and values of positions < p0")

    def past_kv(self, layer: int) -> tuple[Tensor, Tensor] | None:
        """The cached keys and values of positions ``< p0`` at ``layer``, one row per forward row."""
        return None if self.p0 == 0 else self.past.before(layer, self.p0, self.prompt)


def embed(w: Weights, tokens: Int[Tensor, "row pos"], edit: Edit = identity) -> Float[Tensor, "row pos d_model"]:
    """Token + position embedding: the residual stream entering block 0."""
    rd = w.resid_dtype
    tok = edit("embed", 0, w.W_E[tokens].to(rd))
    pos = edit("pos_embed", 0, w.W_pos[: tokens.shape[1]].to(rd).expand(tokens.shape[0], -1, -1))
    return tok + pos


def causal_mask(queries: Tensor, n_keys: int) -> Tensor:
    """``[q, key]`` bool, True where a key lies after its query (absolute query positions ``queries``)."""
    keys = torch.arange(n_keys, device=queries.device)
    return keys[None, :] > queries[:, None]


def block(w: Weights, layer: int, resid: Float[Tensor, "row suffix d_model"], edit: Edit = identity,
          split: bool = False, past: tuple[Tensor, Tensor] | None = None,
          query: Int[Tensor, " row"] | None = None, rules: frozenset[str] = frozenset(),
          ) -> Float[Tensor, "row out d_model"]:
    """One transformer block on positions ``p0 … p0 + S − 1`` (``p0`` = the length of ``past``'s keys).

    ``split``: per-head q/k/v inputs and an MLP input of its own (see the module docstring). ``past``:
    keys and values ``[row, p0, head, d_head]`` of the earlier positions. ``query``: compute the attention
    query and everything after it at one suffix index per row only (the output has one position).
    ``rules``: the LRP rules whose backward replaces the ops' own (module docstring; values unchanged)."""
    lyr = w.layers[layer]
    L, H, E = layer, w.n_heads, w.d_head
    R, S = resid.shape[:2]
    cd, rd = w.dtype, w.resid_dtype  # matmuls in the weights' dtype; stream, softmax and LayerNorm in rd
    p0 = 0 if past is None else past[0].shape[1]
    resid = edit("resid_pre", L, resid)
    if split:
        # A view of its own per site: an edit that keeps the tensor it is handed (to take its gradient)
        # then gets the gradient through that site only, not the q+k+v sum.
        ins = [edit(site, L, resid[:, :, None, :].expand(-1, -1, H, -1)) for site in QKV_INPUT_SITES]
        q, k, v = (einsum(layer_norm(x, lyr.ln1_w, lyr.ln1_b, w.eps, rules).to(cd), w.qkv_heads(L, i),
                          "row pos head d_model, head d_model d_head -> row pos head d_head")
                   + w.qkv_bias(L, i) for i, x in enumerate(ins))
        if query is not None:
            q = q[torch.arange(R, device=q.device), query][:, None]
    else:
        x = layer_norm(resid, lyr.ln1_w, lyr.ln1_b, w.eps, rules).to(cd)
        if query is None:
            qkv = (x @ lyr.W_qkv + lyr.b_qkv).view(R, S, 3, H, E)
            q, k, v = qkv.unbind(2)
        else:  # keys and values everywhere, the query at one position per row
            kv = (x @ lyr.W_qkv[:, H * E:] + lyr.b_qkv[H * E:]).view(R, S, 2, H, E)
            k, v = kv.unbind(2)
            xq = x[torch.arange(R, device=x.device), query]
            q = (xq @ lyr.W_qkv[:, :H * E] + lyr.b_qkv[:H * E]).view(R, 1, H, E)
    q, k, v = edit("head_q", L, q), edit("head_k", L, k), edit("head_v", L, v)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)
    scores = einsum(q, k, "row dest head d_head, row src head d_head -> row head dest src").to(rd) / math.sqrt(E)
    if query is None:
        mask = causal_mask(p0 + torch.arange(S, device=resid.device), p0 + S)[None, None]
    else:
        mask = causal_mask(p0 + query, p0 + S)[:, None, None, :]
    scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
    pattern = edit("head_pattern", L, _SoftmaxAHRule.apply(scores) if "ah" in rules else scores.softmax(-1))
    z = edit("head_out", L, einsum(pattern.to(cd), v, "row head dest src, row src head d_head -> row dest head d_head"))
    attn_out = edit("attn_out", L, (z.flatten(-2) @ lyr.W_O + lyr.b_O).to(rd))
    if query is not None:
        resid = resid[torch.arange(R, device=resid.device), query][:, None]
    resid_mid = edit("resid_mid", L, resid + attn_out)
    mlp_in = edit("mlp_in", L, resid_mid.clone()) if split else resid_mid
    pre = layer_norm(mlp_in, lyr.ln2_w, lyr.ln2_b, w.eps, rules).to(cd) @ lyr.W_in + lyr.b_in
    mlp_out = edit("mlp_out", L, (gelu(w, pre, rules) @ lyr.W_out + lyr.b_out).to(rd))
    return edit("resid_post", L, resid_mid + mlp_out)


def unembed_direction(w: Weights, answer_ids: Int[Tensor, " row"], wrong_ids: Int[Tensor, " row"]
                      ) -> tuple[Float[Tensor, "row d_model"], Float[Tensor, " row"]]:
    """``W_U[:, answer] − W_U[:, wrong]`` and ``b_U[answer] − b_U[wrong]``: the logit difference is linear
    in ``ln_final``'s output along this direction."""
    a, b = answer_ids.to(w.device), wrong_ids.to(w.device)
    return (w.W_U[:, a] - w.W_U[:, b]).T, w.b_U[a] - w.b_U[b]


def unembed(w: Weights, x: Float[Tensor, "row pos d_model"], answer_pos: Int[Tensor, " row"] | None,
            edit: Edit = identity, split: bool = False, diff: tuple[Tensor, Tensor] | None = None,
            rules: frozenset[str] = frozenset()) -> Tensor:
    """Logits (or, with ``diff``, the logit difference) at each row's answer position. ``answer_pos`` None:
    ``x`` already holds one position per row. ``rules``: ``"ln"`` applies to ``ln_final``."""
    x = edit("logits", w.n_layers, x.clone() if split else x)
    rows = torch.arange(x.shape[0], device=x.device)
    final = x[:, 0] if answer_pos is None else x[rows, answer_pos.to(x.device)]
    normed = layer_norm(final, w.lnf_w, w.lnf_b, w.eps, rules)
    if diff is None:
        return (normed.to(w.dtype) @ w.W_U + w.b_U).to(normed.dtype)
    reps = x.shape[0] // diff[0].shape[0]
    u, bias = unembed_direction(w, diff[0].repeat(reps), diff[1].repeat(reps))
    return (normed * u.to(normed.dtype)).sum(-1) + bias.to(normed.dtype)


def forward(w: Weights, tokens: Int[Tensor, "row pos"] | None, answer_pos: Int[Tensor, " row"],
            edit: Edit = identity, split: bool = False, start: Start | None = None, answer_only: bool = False,
            diff: tuple[Tensor, Tensor] | None = None, rules: frozenset[str] | None = None) -> Tensor:
    """Logits ``[row, vocab]`` at the answer positions (or, with ``diff``, the logit difference ``[row]``).

    ``answer_pos`` is absolute (with ``start.p0 > 0`` it must lie in the computed suffix). With ``start``,
    ``tokens`` is not used. ``diff`` holds the answer and wrong ids of one batch; rows may be k copies of it,
    copy-major. ``rules``: LRP rules for the backward (None: none). See the module docstring for the modes."""
    answer_pos = answer_pos.to(w.device)
    rules = check_rules(rules)
    if start is None:
        resid, first, p0 = embed(w, tokens, edit), 0, 0
    else:
        resid, first, p0 = start.resid, start.layer, start.p0
    last = w.n_layers - 1
    at = answer_pos - p0  # the answer's index in the computed positions
    for L in range(first, w.n_layers):
        past = start.past_kv(L) if start is not None else None
        query = at if answer_only and L == last and (L != first or edit is identity) else None
        resid = block(w, L, resid, edit, split, past, query, rules)
        if query is not None:
            return unembed(w, resid, None, edit, split, diff, rules)
    return unembed(w, resid, at, edit, split, diff, rules)


class Recorder:
    """An edit that keeps the tensors of the chosen kinds (all when ``kinds`` is None), keyed (kind, layer).

    ``leaves=True`` makes the token and position embeddings autograd leaves, so that a backward reaches
    every recorded site even though the weights are frozen."""

    def __init__(self, kinds: tuple[str, ...] | None = None, inner: Edit = identity, leaves: bool = False):
        self.kinds = None if kinds is None else frozenset(kinds)
        self.inner = inner
        self.leaves = leaves
        self.acts: dict[tuple[str, int], Tensor] = {}

    def __call__(self, kind: str, layer: int, x: Tensor) -> Tensor:
        x = self.inner(kind, layer, x)
        if self.leaves and kind in ("embed", "pos_embed"):
            x = x.detach().clone().requires_grad_(True)
        if self.kinds is None or kind in self.kinds:
            self.acts[(kind, layer)] = x
        return x

    def stack(self, kind: str) -> Tensor:
        """The recorded sites of one kind stacked along a leading layer axis (embeddings: no layer axis)."""
        if kind in ("embed", "pos_embed"):
            return self.acts[(kind, 0)]
        layers = sorted(layer for k, layer in self.acts if k == kind)
        return torch.stack([self.acts[(kind, layer)] for layer in layers])


def run_with_acts(w: Weights, tokens: Int[Tensor, "row pos"], answer_pos: Int[Tensor, " row"],
                  kinds: tuple[str, ...] | None = None, split: bool = False,
                  edit: Edit = identity) -> tuple[Float[Tensor, "row vocab"], dict[tuple[str, int], Tensor]]:
    """Answer-position logits and the activations of ``kinds`` (all sites when None)."""
    rec = Recorder(kinds, inner=edit)
    logits = forward(w, tokens, answer_pos, rec, split)
    return logits, rec.acts


def cache_kv(acts: dict[tuple[str, int], Tensor], n_layers: int) -> KV:
    """The ``KV`` of a run recorded with ``head_k`` and ``head_v``."""
    return KV(torch.stack([acts[("head_k", layer)] for layer in range(n_layers)]),
              torch.stack([acts[("head_v", layer)] for layer in range(n_layers)]))
