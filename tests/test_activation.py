"""Activation patching equals TransformerLens 4.3 ``patching`` and a one-patch-per-forward loop, on two shapes.

    .venv/bin/python -m pytest -q tests/test_activation.py            # ~2 min here, TL full grids included

Oracles: (1) TransformerLens ``patching.get_act_patch_*`` run on the bridge, per prompt (``reduce="none"``),
on a sample of cells of every granularity, and on the full grids of every granularity, composites included
(~25 s per shape and direction: TL needs ~0.1 s per patched forward here); (2) ``_reference``, a literal
loop with one patch per ``engine.forward`` over every cell of every granularity. Plus chunking, padding and config rules.
"""

from __future__ import annotations

import itertools

import pandas as pd
import pytest
import torch
from transformer_lens import patching

from attrpatch import make_batch
from attrpatch.components import hook_name
from attrpatch.engine import forward, run_with_acts, weights
from attrpatch.methods import METHODS, MethodError, load_builtin_methods, method_config, run_method
from attrpatch.methods.activation import (
    COMPOSITES,
    GRANULARITIES,
    POS_KINDS,
    Granularity,
    granularity_of,
    select_granularities,
)
from attrpatch.metrics import final_logit_diff, logit_diff

ALL = tuple(GRANULARITIES)
DIRECTIONS = ("denoise", "noise")
# TL function and the order of its index axes (TL names head/head_index/dest_pos are ours head/head/pos).
TL = {name: (getattr(patching, f"get_act_patch_{name}"),
             {"resid_pre": ("layer", "pos"), "resid_mid": ("layer", "pos"), "attn_out": ("layer", "pos"),
              "mlp_out": ("layer", "pos")}.get(name)
             or (("layer", "pos", "head") if name.endswith("_by_pos") and "pattern" not in name else None)
             or (("layer", "head") if name.endswith("_all_pos") else None)
             or {"attn_head_pattern_by_pos": ("layer", "head", "pos"),
                 "attn_head_pattern_dest_src_pos": ("layer", "head", "pos", "src_pos")}[name])
      for name in ALL if hasattr(patching, f"get_act_patch_{name}")}


def _runs(batch, direction):
    """(tokens of the run that is patched, tokens of the patch source)."""
    return ((batch.corrupt_tokens, batch.clean_tokens) if direction == "denoise"
            else (batch.clean_tokens, batch.corrupt_tokens))


def _ours(model, batch, direction, names=ALL, max_rows=256, per_prompt=True):
    cfg = method_config("activation", directions=(direction,), max_rows=max_rows, per_prompt=per_prompt,
                        granularities=names)
    return {granularity_of(n): n for n in run_method("activation", model, batch, cfg).nodes}


def _reference(model, batch, direction, g: Granularity) -> torch.Tensor:
    """The slow literal reference: one patched engine forward (whole batch) per cell, as TL does."""
    w = weights(model)
    run, src = _runs(batch, direction)
    with torch.no_grad():
        _, src_acts = run_with_acts(w, src, batch.answer_pos, kinds=(g.kind,))
        base = final_logit_diff(forward(w, run, batch.answer_pos), batch)
        P, n_heads = run.shape[1], w.n_heads
        sizes = {"layer": w.n_layers, "head": n_heads, "pos": P, "src_pos": P}
        out = torch.zeros(len(batch), *(sizes[a] for a in g.axes[1:]))
        for cell in itertools.product(*(range(sizes[a]) for a in g.axes[1:])):
            c = dict(zip(g.axes[1:], cell, strict=True))
            if c.get("src_pos", 0) > c.get("pos", 0):
                continue  # a masked pattern cell: the patch copies 0 over 0 (asserted exactly 0 in the test)

            def edit(kind, layer, x, c=c):
                if kind != g.kind or layer != c["layer"]:
                    return x
                x, s = x.clone(), src_acts[(kind, layer)]
                if g.kind in POS_KINDS:
                    sel = (slice(None), c.get("pos", slice(None)))
                elif g.kind != "head_pattern":
                    sel = (slice(None), c.get("pos", slice(None)), c["head"])
                else:
                    sel = (slice(None), c["head"], c.get("pos", slice(None)), c.get("src_pos", slice(None)))
                x[sel] = s[sel]
                return x

            logits = forward(w, run, batch.answer_pos, edit)
            out[(slice(None), *cell)] = final_logit_diff(logits, batch) - base
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one thread is ~30x faster than two on this shared 2-core box; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def batch(tokenizer):
    return make_batch("factual", tokenizer, n_prompts=4, seed=0)  # lengths 10–12: padding in the batch


@pytest.fixture(scope="module")
def ours(tiny, batch):
    """Our scores for every granularity and both directions, computed once per shape."""
    return {d: _ours(tiny, batch, d) for d in DIRECTIONS}


@pytest.fixture(scope="module")
def ours_on(on_device, batch):
    """The same on every device present (the GPU-relevant comparisons take it)."""
    return {d: _ours(on_device, batch, d) for d in DIRECTIONS}


def test_registered():
    load_builtin_methods()
    info = METHODS["activation"]
    assert info.exact and info.produces == "nodes"


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_equals_slow_reference_every_cell(tiny, batch, ours, direction):
    """Every cell of every granularity (TL's and the layer all_pos extension) equals the literal loop."""
    biggest = 0.0
    for name, g in GRANULARITIES.items():
        got = ours[direction][name]
        assert got.axes == g.axes and got.direction == direction and got.component == g.kind
        ref = _reference(tiny, batch, direction, g)
        torch.testing.assert_close(got.scores, ref, atol=1e-5, rtol=1e-4, msg=name)
        biggest = max(biggest, float(ref.abs().max()))
        if g.scope == "dest_src":
            assert (got.scores.tril().ne(got.scores)).sum() == 0  # cells with src > dest: exactly 0
    assert biggest > 1e-2  # the patches move the metric 1000x more than the tolerance


def _tl_full(fn, model, batch, direction):
    run, src = _runs(batch, direction)
    with torch.no_grad():
        _, src_cache = model.bridge.run_with_cache(src)
        res = fn(model.bridge, run, src_cache, lambda logits: logit_diff(logits, batch), reduce="none",
                 baseline=True)
    return res.effect()  # [*tl axes, prompt]


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_equals_transformer_lens_on_sampled_cells(on_device, batch, ours_on, direction, device):
    """Every TL granularity, per prompt, on 8 cells each: the 4 largest effects and 4 random cells (every
    device present)."""
    tiny, ours = on_device, ours_on
    run, src = (t.to(device) for t in _runs(batch, direction))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        _, src_cache = tiny.bridge.run_with_cache(src)
    for name, (fn, tl_axes) in TL.items():
        got = ours[direction][name]
        g = GRANULARITIES[name]
        flat = got.scores.abs().sum(0).flatten()
        cells = torch.cat([flat.topk(4).indices, torch.randint(0, flat.numel(), (4,), generator=gen)])
        coords = torch.stack(torch.unravel_index(cells, got.scores.shape[1:]), 1)  # our axis order
        ours_axes = g.axes[1:]
        df = pd.DataFrame(coords[:, [ours_axes.index(a) for a in tl_axes]].numpy(), columns=list(tl_axes))
        with torch.no_grad():
            res = fn(tiny.bridge, run, src_cache, lambda logits: logit_diff(logits, batch), index_axis_names=None,
                     index_df=df, reduce="none", baseline=True)
        expected = res.effect().T.cpu()  # [prompt, cell]
        actual = got.scores[(slice(None), *coords.T)]
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_equals_transformer_lens_full_grids(tiny, batch, ours, direction):
    """Every cell of every TL granularity, and TL's three composites, per prompt."""
    for name, (fn, tl_axes) in TL.items():
        g = GRANULARITIES[name]
        tl = _tl_full(fn, tiny, batch, direction)
        perm = [tl_axes.index(a) for a in g.axes[1:]]
        expected = tl.permute(-1, *perm)
        torch.testing.assert_close(ours[direction][name].scores, expected, atol=1e-4, rtol=1e-4, msg=name)
    for comp in COMPOSITES:
        tl = _tl_full(getattr(patching, f"get_act_patch_{comp}"), tiny, batch, direction)  # [type, ..., prompt]
        parts = [ours[direction][name].scores for name in COMPOSITES[comp]]
        if comp == "attn_head_by_pos_every":  # TL stacks pattern as [layer pos head] too
            parts = [p.transpose(-1, -2) for p in parts]
        elif comp == "block_every":
            pass
        expected = tl.permute(-1, *range(tl.dim() - 1))
        torch.testing.assert_close(torch.stack(parts, 1), expected, atol=1e-4, rtol=1e-4, msg=comp)


def test_composites_are_unions(tiny, batch, ours):
    got = _ours(tiny, batch, "denoise", names=("block_every", "attn_head_all_pos_every"))
    assert sorted(got) == sorted([*COMPOSITES["block_every"], *COMPOSITES["attn_head_all_pos_every"]])
    for name, ns in got.items():
        torch.testing.assert_close(ns.scores, ours["denoise"][name].scores, atol=1e-6, rtol=0)


@pytest.mark.parametrize("max_rows", [1, 7])
def test_chunking_gives_the_same_scores(on_device, batch, ours_on, max_rows):
    names = ("attn_head_pattern_dest_src_pos", "attn_head_v_by_pos", "resid_pre", "attn_head_q_all_pos")
    got = _ours(on_device, batch, "noise", names=names, max_rows=max_rows)
    for name in names:
        torch.testing.assert_close(got[name].scores, ours_on["noise"][name].scores, atol=1e-6, rtol=1e-5, msg=name)


def test_padding_prompt_alone_equals_prompt_in_batch(tiny, batch, ours):
    lengths = batch.lengths.tolist()
    assert len(set(lengths)) > 1  # the batch really mixes lengths
    for i, n_pos in enumerate(lengths):
        alone = _ours(tiny, batch.select([i]), "denoise")
        for name, ns in alone.items():
            g = GRANULARITIES[name]
            full = ours["denoise"][name].scores[i]
            pos_dims = [d for d, a in enumerate(g.axes[1:]) if a in ("pos", "src_pos")]
            sel = tuple(slice(0, n_pos) if d in pos_dims else slice(None) for d in range(full.dim()))
            torch.testing.assert_close(ns.scores[0], full[sel], atol=2e-5, rtol=1e-4, msg=name)
            rest = full.clone()
            rest[sel] = 0
            assert rest.abs().max() == 0  # positions after the answer: exactly zero


def test_mean_over_prompts(tiny, batch, ours):
    got = _ours(tiny, batch, "denoise", names=("attn_head_out_by_pos",), per_prompt=False)
    ns = got["attn_head_out_by_pos"]
    assert ns.axes == ("layer", "head", "pos")
    torch.testing.assert_close(ns.scores, ours["denoise"]["attn_head_out_by_pos"].scores.mean(0))


def test_default_selection_follows_kinds_and_per_position():
    by_pos = select_granularities(method_config("activation", kinds=("head_pattern", "mlp_out")))
    assert [g.name for g in by_pos] == ["mlp_out", "attn_head_pattern_by_pos", "attn_head_pattern_dest_src_pos"]
    all_pos = select_granularities(method_config("activation", kinds=("head_q",), per_position=False))
    assert [g.name for g in all_pos] == ["attn_head_q_all_pos"]
    assert len(select_granularities(method_config("activation"))) == 4 + 5 + 1


@pytest.mark.parametrize("fields, words", [
    (dict(kinds=("embed",)), r"scores the kinds \['resid_pre'.*got kinds=\['embed'\]"),
    (dict(granularities=("attn_head_z_by_pos",)), "unknown activation-patching granularities"),
    (dict(granularity=("resid_pre",)), r"takes no option \['granularity'\]: its own options are \['granularities'\]"),
    (dict(kinds=("head_q",), granularities=("block_every",)), "outside kinds"),
    (dict(granularities=()), "is empty"),
])
def test_bad_config_raises_one_clear_error(fields, words):
    with pytest.raises(MethodError, match=words):
        method_config("activation", **fields)


def test_hook_names_match_tl_act_names(tiny):
    """The TL act names our oracle relies on are the hooks components.py names."""
    from transformer_lens import utilities as utils

    for kind, tl in [("head_out", "z"), ("head_q", "q"), ("head_pattern", "pattern"), ("resid_mid", "resid_mid")]:
        assert utils.get_act_name(tl, 1) == hook_name(kind, 1)
