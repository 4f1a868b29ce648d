"""MIB export: the edge set is EAP-IG's GPT-2 graph, and the scores round-trip (positions summed, prompts averaged)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis.mib import SIGN, ExportError, export, main, mib_graph
from attrpatch.components import Node
from attrpatch.results import EDGE_SCHEMA

N_LAYERS, N_HEADS, N_POS = 2, 3, 3
QKV = ("head_q", "head_k", "head_v")


def upstream(s: Node, d: Node) -> bool:
    if s.component == "embed" or d.component == "logits":
        return True
    if s.component == "head_out":
        return d.layer > s.layer if d.component in QKV else d.layer >= s.layer
    return d.layer > s.layer


def attrpatch_edges(n_layers: int, n_heads: int) -> list[tuple[Node, Node]]:
    src = [Node("embed", 0)] + [Node("head_out", lyr, h) for lyr in range(n_layers) for h in range(n_heads)] \
        + [Node("mlp_out", lyr) for lyr in range(n_layers)]
    dst = [Node(k, lyr, h) for k in QKV for lyr in range(n_layers) for h in range(n_heads)] \
        + [Node("mlp_in", lyr) for lyr in range(n_layers)] + [Node("logits", n_layers)]
    return [(s, d) for s in src for d in dst if upstream(s, d)]


MIB_NAME = {"embed": lambda n: "input", "head_out": lambda n: f"a{n.layer}.h{n.head}",
            "mlp_out": lambda n: f"m{n.layer}", "mlp_in": lambda n: f"m{n.layer}", "logits": lambda n: "logits",
            **{k: (lambda n, q=k[-1]: f"a{n.layer}.h{n.head}<{q}>") for k in QKV}}


def name(s: Node, d: Node) -> str:
    return f"{MIB_NAME[s.component](s)}->{MIB_NAME[d.component](d)}"


def rows(edges, scores: np.ndarray, prompts: np.ndarray, direction: str) -> pa.Table:
    """scores [prompt, pos, edge] → per-prompt, per-position rows."""
    P, T, E = scores.shape
    pi, ti, ei = (g.ravel() for g in np.meshgrid(np.arange(P), np.arange(T), np.arange(E), indexing="ij"))
    s = [edges[i][0] for i in ei]
    d = [edges[i][1] for i in ei]
    head = lambda nodes: pa.array([-1 if n.head is None else n.head for n in nodes], pa.int16(),  # noqa: E731
                                  mask=np.array([n.head is None for n in nodes]))
    return pa.Table.from_arrays([
        pa.array([direction] * len(ei)), pa.array([n.component for n in s]), pa.array([n.layer for n in s], pa.int16()),
        head(s), pa.array([n.component for n in d]), pa.array([n.layer for n in d], pa.int16()), head(d),
        pa.array(ti, pa.int16()), pa.array(prompts[pi], pa.int32()), pa.array(np.ones(len(ei), np.int32)),
        pa.array(scores.ravel().astype(np.float32)),
    ], schema=EDGE_SCHEMA)


@pytest.fixture(scope="module")
def root_and_expected(tmp_path_factory):
    root = tmp_path_factory.mktemp("mib")
    edges = attrpatch_edges(N_LAYERS, N_HEADS)
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(4, N_POS, len(edges))).astype(np.float32)
    denoise = rng.normal(size=(4, N_POS, len(edges))).astype(np.float32)
    d = root / "edges" / "model=gpt2-small" / "task=ioi" / "method=eap_ig"
    d.mkdir(parents=True)
    for part, sl in enumerate((slice(0, 2), slice(2, 4))):
        prompts = np.arange(4)[sl]
        table = pa.concat_tables([rows(edges, noise[sl], prompts, "noise"), rows(edges, denoise[sl], prompts, "denoise")])
        pq.write_table(table, d / f"part-{part:05d}.parquet")
    expected = {"noise": noise.astype(np.float64).sum(1).mean(0), "denoise": denoise.astype(np.float64).sum(1).mean(0)}
    return root, edges, expected


def test_mib_graph_is_eap_ig_gpt2():
    nodes, edges = mib_graph(12, 12)
    assert len(edges) == 32491 and len(set(edges)) == len(edges)  # GPT-2 small's edge count
    assert nodes[0] == "input" and nodes[-1] == "logits" and len(nodes) == 1 + 12 * 13 + 1
    # the same set as attrpatch's edge rules, named the MIB way
    assert set(mib_graph(N_LAYERS, N_HEADS)[1]) == {name(s, d) for s, d in attrpatch_edges(N_LAYERS, N_HEADS)}
    assert "input->a0.h1<q>" in edges and "a0.h1->m0" in edges and "m11->logits" in edges
    assert "a1.h0->a1.h2<k>" not in edges and "m1->m1" not in edges


@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_export_round_trips_scores(root_and_expected, tmp_path, direction):
    root, edges, expected = root_and_expected
    out = export(root, "gpt2-small", "ioi", "eap_ig", tmp_path / "ioi_gpt2" / "eap_ig.json",
                 direction=None if direction == "noise" else direction)  # noise is the default when present
    graph = json.loads(out.read_text())
    assert graph["cfg"] == {"n_layers": N_LAYERS, "n_heads": N_HEADS, "parallel_attn_mlp": False, "d_model": 768}
    assert set(graph["nodes"]) == set(mib_graph(N_LAYERS, N_HEADS)[0])
    got = np.array([graph["edges"][name(s, d)]["score"] for s, d in edges])
    # MIB's orientation: noise scores negated (EAP-IG: −(1/N) Σ (corrupt − clean)·∂LD/∂a), denoise as they are
    np.testing.assert_allclose(got, SIGN[direction] * expected[direction], rtol=1e-5, atol=1e-6)
    assert SIGN == {"noise": -1.0, "denoise": 1.0}
    assert all(e["in_graph"] for e in graph["edges"].values()) and all(n["in_graph"] for n in graph["nodes"].values())


@pytest.mark.parametrize("ranking", ["signed", "abs"])
def test_top_percent_marks_largest_edges(root_and_expected, tmp_path, ranking):
    """in_graph follows MIB's signed ranking (CPR): the edges whose *noising* hurts the metric most, i.e. the
    most negative attrpatch noise scores; by |score| with --ranking abs."""
    root, edges, expected = root_and_expected
    graph = json.loads(export(root, "gpt2-small", "ioi", "eap_ig", tmp_path / "g.json", top_percent=10,
                              ranking=ranking).read_text())
    kept = {k for k, e in graph["edges"].items() if e["in_graph"]}
    n = int(0.1 * len(edges))
    assert len(kept) == n
    ours = expected["noise"]
    order = np.argsort(ours if ranking == "signed" else -np.abs(ours), kind="stable")
    assert kept == {name(*edges[i]) for i in order[:n]}
    if ranking == "signed":  # read back: the kept edges are those attrpatch scores most negative (noise)
        assert max(graph["edges"][k]["score"] for k in set(graph["edges"]) - kept) <= \
            min(graph["edges"][k]["score"] for k in kept)
        assert all(ours[i] < 0 for i in order[:n])
    touched = {p for k in kept for p in (k.split("->")[0], k.split("->")[1].split("<")[0])}
    assert {k for k, v in graph["nodes"].items() if v["in_graph"]} == touched | {"logits"}


def test_export_errors_and_cli(root_and_expected, tmp_path):
    root, edges, _ = root_and_expected
    with pytest.raises(ExportError, match="no edge scores"):
        export(root, "gpt2-small", "ioi", "edge_attribution", tmp_path / "x.json")
    with pytest.raises(ExportError, match="d_model of 'mystery'"):
        d = root / "edges" / "model=mystery" / "task=ioi" / "method=eap_ig"
        d.mkdir(parents=True)
        src = next((root / "edges" / "model=gpt2-small" / "task=ioi" / "method=eap_ig").glob("*.parquet"))
        (d / src.name).write_bytes(src.read_bytes())
        export(root, "mystery", "ioi", "eap_ig", tmp_path / "x.json")
    partial = tmp_path / "partial"
    d = partial / "edges" / "model=gpt2-small" / "task=ioi" / "method=eap_ig"
    d.mkdir(parents=True)
    t = pq.read_table(src)
    pq.write_table(t.filter(pa.compute.not_equal(t["src_component"], "mlp_out")), d / "part-00000.parquet")
    with pytest.raises(ExportError, match="edges missing"):
        export(partial, "gpt2-small", "ioi", "eap_ig", tmp_path / "x.json")
    assert main([str(root), "--model", "gpt2-small", "--task", "ioi", "--method", "eap_ig", "--out",
                 str(tmp_path / "c.json"), "--direction", "denoise"]) == 0
    assert len(json.loads((tmp_path / "c.json").read_text())["edges"]) == len(edges)
