"""Edge attribution patching against oracles we did not write: TransformerLens 4.3's edge attribution, a literal
ACDC++-style loop over bridge caches, node AtP by autograd, and the Attribution Patching Demo's head paths."""

from __future__ import annotations

import pytest
import torch
from transformer_lens.tools.analysis.attribution_patching import (
    EdgeAttributionConfig,
    _edge_hook_flags,
    _edge_hook_names,
    _writer_hook_names,
    attribution_patch,
    cache_activation_and_gradient,
)
from transformer_lens.tools.analysis.attribution_patching import Node as TLNode

from attrpatch import make_batch
from attrpatch.components import Node
from attrpatch.engine import forward, weights
from attrpatch.graph import EdgeGraph, head_path_view
from attrpatch.methods import MethodConfig, run_method
from attrpatch.methods.core import budget_scale, edge_scores
from attrpatch.scores import EdgeScores, edge_table
from attrpatch.testing import grad_through, rel_close

# --- helpers shared by the oracle tests ---------------------------------------------------------------

def tl_to_ours(node: TLNode, graph: EdgeGraph) -> Node:
    kind = {"embed": "embed", "attn_head_out": "head_out", "mlp_out": "mlp_out", "q_input": "head_q",
            "k_input": "head_k", "v_input": "head_v", "mlp_in": "mlp_in", "logits": "logits"}[node.kind]
    layer = graph.n_layers if kind == "logits" else (node.layer or 0)
    return Node(kind, layer, node.head)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_eap_matches_transformer_lens_edge_attribution(tiny64_on, tokenizer, direction, device):
    """TL 4.3 ``attribution_patch(granularity="edge")``: per prompt and position, every edge, to 1e-5 (every
    device present)."""
    tiny64 = tiny64_on
    batch = make_batch("ioi", tokenizer, n_prompts=3, seed=5)
    w = weights(tiny64)
    graph = EdgeGraph.of(w)
    ours = edge_scores(w, batch, directions=(direction,), per_prompt=True, per_position=True)[direction]
    si = {n: i for i, n in enumerate(graph.src)}
    di = {n: i for i, n in enumerate(graph.dst)}
    clean, corrupt = batch.clean_tokens.to(device), batch.corrupt_tokens.to(device)
    if direction == "noise":  # TL's gradient is on its `corrupt` argument: the run input
        clean, corrupt = corrupt, clean
    for i in range(len(batch)):
        ap, a, wr = int(batch.answer_pos[i]), int(batch.answer_ids[i]), int(batch.wrong_ids[i])
        with grad_through(tiny64):
            res = attribution_patch(tiny64.bridge, clean[i:i + 1], corrupt[i:i + 1],
                                    lambda lg, ap=ap, a=a, wr=wr: lg[0, ap, a] - lg[0, ap, wr],
                                    EdgeAttributionConfig(granularity="edge"))
        ref = torch.zeros_like(ours[i].cpu())
        seen = torch.zeros_like(ref, dtype=torch.bool)
        for (u, v), value in res.edge_scores.items():
            cell = (u.position, si[tl_to_ours(u, graph)], di[tl_to_ours(v, graph)])
            ref[cell], seen[cell] = value, True
        assert int(seen.sum()) == graph.n_edges * batch.n_pos  # the same edges, every position
        assert torch.equal(seen[0], graph.valid)
        rel_close(ours[i].cpu(), ref)


def acdcpp_loop(model, batch, graph: EdgeGraph) -> torch.Tensor:
    """A literal port of the ACDC++ notebook's nested loops, over the bridge's own caches (clean and
    corrupted activations, corrupted-run gradients at every reader's input): one dot product per edge."""
    n_layers, n_heads = graph.n_layers, graph.n_heads

    def metric(logits):
        rows = torch.arange(len(batch))
        final = logits[rows, batch.answer_pos]
        return (final[rows, batch.answer_ids] - final[rows, batch.wrong_ids]).sum()

    names = _edge_hook_names(n_layers) + _writer_hook_names(n_layers)
    with grad_through(model), _edge_hook_flags(model.bridge):
        clean = cache_activation_and_gradient(model.bridge, batch.clean_tokens, metric, names, compute_gradient=False)
        corrupt = cache_activation_and_gradient(model.bridge, batch.corrupt_tokens, metric, names)
    act_c, act_x, grad = clean.activations, corrupt.activations, corrupt.gradients

    def diff(name):
        return act_c[name] - act_x[name]

    def reader_grad(kind, layer, head=None):
        node = TLNode(kind=kind, position=0, layer=layer, head=head)
        g = grad[node.hook_name]
        return g if head is None else g[:, :, head]

    scores = torch.zeros(graph.n_src, graph.n_dst, dtype=act_c['hook_embed'].dtype)
    si = {n: i for i, n in enumerate(graph.src)}
    di = {n: i for i, n in enumerate(graph.dst)}
    head_res = {layer: diff(_writer_hook_names(n_layers)[1 + 2 * layer]) for layer in range(n_layers)}
    # The five-deep loop of head → head edges, one dot product at a time.
    for up_layer in range(n_layers):
        for up_head in range(n_heads):
            for down_layer in range(up_layer + 1, n_layers):
                for down_head in range(n_heads):
                    for letter in "qkv":
                        g = reader_grad(f"{letter}_input", down_layer, down_head)
                        value = (head_res[up_layer][:, :, up_head] * g).sum()
                        scores[si[Node("head_out", up_layer, up_head)], di[Node(f"head_{letter}", down_layer, down_head)]] = value
    # The remaining edges, written out the same way.
    writers = [(Node("embed", 0), -1, diff("hook_embed"))]
    for layer in range(n_layers):
        writers += [(Node("head_out", layer, h), layer, head_res[layer][:, :, h]) for h in range(n_heads)]
        writers.append((Node("mlp_out", layer), layer + 0.5, diff(_writer_hook_names(n_layers)[2 + 2 * layer])))
    for src, at, d in writers:
        for layer in range(n_layers):
            if src.component != "head_out" and at < layer:  # embed and earlier MLPs into q/k/v
                for h in range(n_heads):
                    for letter in "qkv":
                        value = (d * reader_grad(f"{letter}_input", layer, h)).sum()
                        scores[si[src], di[Node(f"head_{letter}", layer, h)]] = value
            if at < layer + 0.5:  # into this layer's MLP
                scores[si[src], di[Node("mlp_in", layer)]] = (d * reader_grad("mlp_in", layer)).sum()
        scores[si[src], di[Node("logits", n_layers)]] = (d * reader_grad("logits", n_layers - 1)).sum()
    return scores / len(batch)


def test_eap_matches_acdcpp_loop(tiny64, tokenizer):
    batch = make_batch("ioi", tokenizer, n_prompts=4, seed=2)
    w = weights(tiny64)
    graph = EdgeGraph.of(w)
    ours = edge_scores(w, batch, directions=("denoise",), per_prompt=False, per_position=False)["denoise"]
    ref = acdcpp_loop(tiny64, batch, graph)
    assert torch.equal(ref != 0, graph.valid & (ours != 0))  # the loop fills exactly the valid edges
    rel_close(ours, ref)


def test_outgoing_sum_equals_node_atp(tiny64, tokenizer):
    """Σ_dst score(src → dst) = node AtP of src, per prompt and position, for every source.

    Every reader of a source's write is an edge target (later q/k/v inputs, MLP inputs, logits), and the
    residual stream is a sum, so Σ_dst ∂metric/∂(input of dst) = ∂metric/∂(write of src); a head's write is
    z·W_O, linear in z, so Δwrite · ∂m/∂write = Δz · ∂m/∂z, the node AtP score of head_out."""
    batch = make_batch("ioi", tokenizer, n_prompts=3, seed=7)
    w = weights(tiny64)
    graph = EdgeGraph.of(w)
    eap = edge_scores(w, batch, directions=("denoise",), per_prompt=True, per_position=True)["denoise"]
    kinds = ("embed", "head_out", "mlp_out")

    def run(tokens, grad):
        acts = {}

        def edit(kind, layer, x):
            if kind == "embed" and grad:
                x = x.detach().requires_grad_(True)
            if kind in kinds:
                acts[(kind, layer)] = x
            return x

        with torch.enable_grad():
            logits = forward(w, tokens, batch.answer_pos, edit)
            rows = torch.arange(len(batch))
            m = (logits[rows, batch.answer_ids] - logits[rows, batch.wrong_ids]).sum()
            grads = torch.autograd.grad(m, list(acts.values())) if grad else [None] * len(acts)
        return {k: (v.detach(), g) for (k, v), g in zip(acts.items(), grads, strict=True)}

    clean, corrupt = run(batch.clean_tokens, False), run(batch.corrupt_tokens, True)
    node = {}
    for key, (a_x, g) in corrupt.items():
        d = clean[key][0] - a_x
        node[key] = (d * g).sum(-1)  # [batch, pos] or [batch, pos, head]
    total = eap.sum(-1)  # [batch, pos, src]
    for i, n in enumerate(graph.src):
        ref = node[(n.component, n.layer)]
        ref = ref[..., n.head] if n.head is not None else ref
        rel_close(total[..., i], ref, rtol=1e-9)  # an identity: float64 rounding only


def test_head_path_view_is_the_demo_head_path(tiny64, tokenizer):
    """The Demo's head-path tensor (einsum of head-result changes with q/k/v input gradients, wrong-order
    paths zeroed) equals the view of the EAP scores, per position, summed over prompts as the Demo sums."""
    batch = make_batch("ioi", tokenizer, n_prompts=3, seed=1)
    w = weights(tiny64)
    graph = EdgeGraph.of(w)
    L, H = graph.n_layers, graph.n_heads
    scores = edge_scores(w, batch, directions=("denoise",), per_prompt=True, per_position=True)["denoise"]
    view = head_path_view(EdgeScores("denoise", graph.index(), scores.sum(0), ("pos", "src", "dst")))
    assert view.shape == (batch.n_pos, 3, L, H, L, H)

    def metric(logits):
        rows = torch.arange(len(batch))
        final = logits[rows, batch.answer_pos]
        return (final[rows, batch.answer_ids] - final[rows, batch.wrong_ids]).sum()

    names = _edge_hook_names(L)
    with grad_through(tiny64), _edge_hook_flags(tiny64.bridge):
        clean = cache_activation_and_gradient(tiny64.bridge, batch.clean_tokens, metric, names + _writer_hook_names(L),
                                              compute_gradient=False)
        corrupt = cache_activation_and_gradient(tiny64.bridge, batch.corrupt_tokens, metric,
                                                names + _writer_hook_names(L))
    result = [_writer_hook_names(L)[1 + 2 * layer] for layer in range(L)]
    diff = torch.stack([clean.activations[n] - corrupt.activations[n] for n in result])  # layer b p head d
    grads = torch.stack([torch.stack([corrupt.gradients[TLNode(kind=f"{q}_input", position=0, layer=layer, head=0).hook_name]
                                      for layer in range(L)]) for q in "qkv"])  # qkv layer b p head d
    demo = torch.einsum("qlbphd,mbpgd->pqlhmg", grads, diff)
    order = torch.arange(L)[:, None, None] > torch.arange(L)[None, None, :]  # layer_end > layer_start
    demo = torch.where(order[None, None, :, :, :, None], demo, torch.zeros((), dtype=demo.dtype))
    rel_close(view, demo)
    assert view[:, :, 0].abs().sum() == 0  # nothing reaches layer 0's heads from a head


def test_method_result_and_table(tiny, tokenizer):
    batch = make_batch("pronoun", tokenizer, n_prompts=3)
    cfg = MethodConfig(directions=("denoise", "noise"), per_prompt=False, per_position=False)
    res = run_method("edge_attribution", tiny, batch, cfg)
    graph = EdgeGraph.of(weights(tiny))
    assert [e.direction for e in res.edges] == ["denoise", "noise"] and not res.nodes
    for e in res.edges:
        assert e.axes == ("src", "dst") and e.scores.shape == (graph.n_src, graph.n_dst)
        assert e.scores[~graph.valid].abs().sum() == 0 and e.scores[graph.valid].abs().sum() > 0
        t = edge_table(e, batch)
        assert t.num_rows == graph.n_edges and set(t.column("n_prompts").to_pylist()) == {3}
    # Chunking the prompts (one per pass) changes nothing; the mean equals the per-prompt mean.
    w = weights(tiny)
    one = edge_scores(w, batch, directions=("noise",), per_prompt=True, per_position=False, max_rows=1)["noise"]
    torch.testing.assert_close(one.mean(0), res.edges[1].scores, rtol=1e-5, atol=1e-7)
    with budget_scale(1e-30):  # a budget of ~0 bytes: one prompt per pass
        tiny_budget = edge_scores(w, batch, directions=("noise",), per_prompt=True, per_position=True)["noise"]
    torch.testing.assert_close(tiny_budget.sum(1), one, rtol=1e-5, atol=1e-7)
