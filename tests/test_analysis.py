"""Analysis over a hand-made results root whose correlations, recalls and sign agreements are known exactly.

The dataset (written in the contract layout with pyarrow, no model involved):

* nodes, ``head_out`` (layers 0 and 9, heads 0–9, shard means split over two part files whose weighted
  mean is the designed value): on gpt2-small ``attribution`` equals ``activation``; on gpt2-medium it is its
  negation (Pearson = Spearman = −1, |score| ranking identical so top-k recall = 1, sign agreement 0);
* nodes, ``mlp_out`` (per prompt and position, 20 rows): exact = 1…20, the approximation swaps ranks 10
  and 11 (top-10 recall 0.9, Spearman 1 − 12/7980);
* edges, ``head_out->logits``: a noisy approximation with ties, checked against scipy and numpy.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.stats import spearmanr

from analysis.compare import main as compare_main
from analysis.compare import run as compare_run
from analysis.query import ResultsError, open_results
from attrpatch.results import EDGE_SCHEMA, NODE_SCHEMA, PROMPT_SCHEMA

README = Path(__file__).resolve().parents[1] / "README.md"
MODELS = ("gpt2-small", "gpt2-medium")


def write_part(root: Path, table: str, pa_table: pa.Table, part: int = 0, **partitions: str) -> Path:
    d = root / table
    for k in ("model", "task", "method"):
        if k in partitions:
            d = d / f"{k}={partitions[k]}"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"part-{part:05d}.parquet"
    pq.write_table(pa_table, path)
    return path


def node_rows(component: str, layer, head, pos, prompt, score, n_prompts, direction="denoise") -> pa.Table:
    n = len(score)
    col = lambda v, t: pa.array(v if isinstance(v, list | np.ndarray) else [v] * n, t)  # noqa: E731
    return pa.Table.from_arrays([
        pa.array([direction] * n), pa.array([component] * n), col(layer, pa.int16()), col(head, pa.int16()),
        col(pos, pa.int16()), pa.nulls(n, pa.int16()), col(prompt, pa.int32()), col(n_prompts, pa.int32()),
        pa.array(np.asarray(score, np.float32)),
    ], schema=NODE_SCHEMA)


def edge_rows(exact: np.ndarray, src_layer: np.ndarray, src_head: np.ndarray) -> pa.Table:
    n = len(exact)
    return pa.Table.from_arrays([
        pa.array(["denoise"] * n), pa.array(["head_out"] * n), pa.array(src_layer, pa.int16()),
        pa.array(src_head, pa.int16()), pa.array(["logits"] * n), pa.array([12] * n, pa.int16()),
        pa.nulls(n, pa.int16()), pa.nulls(n, pa.int16()), pa.nulls(n, pa.int32()), pa.array([4] * n, pa.int32()),
        pa.array(np.asarray(exact, np.float32)),
    ], schema=EDGE_SCHEMA)


# Designed values (float32-exact: small integers and halves).
LAYERS = np.repeat([0, 9], 10)
HEADS = np.tile(np.arange(10), 2)
HEAD_EXACT = {"gpt2-small": np.arange(1, 21, dtype=np.float64) - 8.5,  # L9H9 = 11.5 is the largest |score|
              "gpt2-medium": np.arange(20, 0, -1, dtype=np.float64) - 2.5}  # L0H0 = 17.5 the largest; no zeros
MLP_EXACT = np.arange(1, 21, dtype=np.float64)
MLP_APPROX = MLP_EXACT.copy()
MLP_APPROX[[9, 10]] = MLP_APPROX[[10, 9]]  # swap ranks 10 and 11
RNG = np.random.default_rng(0)
EDGE_EXACT = np.round(RNG.normal(size=40) * 8) / 2  # halves: exact in float32
EDGE_APPROX = np.round(EDGE_EXACT + RNG.normal(size=40) * 2)  # integers: ties on purpose


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("results")
    (root / "manifest.json").write_text('{"models": {"tiny-x": {"n_params": 3500000, "d_model": 64}}}')
    for model in MODELS:
        exact = HEAD_EXACT[model]
        approx = exact if model == "gpt2-small" else -exact
        for method, values in (("activation", exact), ("attribution", approx)):
            part = dict(model=model, task="ioi", method=method)
            # two shards of 8 prompts: exact − 1 and exact + 1 pool to exact
            for i, delta in enumerate((-1.0, 1.0)):
                write_part(root, "nodes", node_rows("head_out", LAYERS, HEADS, None, None, values + delta, 8),
                           part=i, **part)
            mlp = MLP_EXACT if method == "activation" else MLP_APPROX
            write_part(root, "nodes", node_rows("mlp_out", np.arange(20) // 5, None, np.arange(20) % 5,
                                                np.arange(20) // 10, mlp, 1), part=2, **part)
        prompts = pa.Table.from_pydict({
            "prompt": np.arange(2, dtype=np.int32), "clean": ["a", "b"], "corrupt": ["c", "d"],
            "answer": [" Mary", " John"], "wrong_answer": [" John", " Mary"],
            "template": np.zeros(2, np.int32), "clean_metric": np.array([3.0, 2.0], np.float32),
            "corrupt_metric": np.array([0.5, -1.0], np.float32)}, schema=PROMPT_SCHEMA)
        write_part(root, "prompts", prompts, model=model, task="ioi")
    src_layer, src_head = np.arange(40) // 4, np.arange(40) % 4
    write_part(root, "edges", edge_rows(EDGE_EXACT, src_layer, src_head), model="gpt2-small", task="ioi",
               method="edge_activation")
    write_part(root, "edges", edge_rows(EDGE_APPROX, src_layer, src_head), model="gpt2-small", task="ioi",
               method="edge_attribution")
    return root


def _row(df, **where):
    sel = df
    for k, v in where.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, f"expected one row for {where}, got {len(sel)}"
    return sel.iloc[0]


def test_views_exist_only_for_tables_present(root):
    con = open_results(root)
    views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    assert {"nodes", "edges", "prompts", "node_pairs", "edge_pairs"} <= views
    assert "faithfulness" not in views and "faithfulness_curves" not in views
    models = con.sql("SELECT DISTINCT model FROM nodes ORDER BY model").fetchall()
    assert models == [("gpt2-medium",), ("gpt2-small",)]
    assert con.execute("SELECT typeof(model) FROM nodes LIMIT 1").fetchone()[0] == "VARCHAR"


def test_pairs_pool_shards_one_to_one(root):
    con = open_results(root)
    df = con.sql("SELECT * FROM node_pairs WHERE component = 'head_out' AND model = 'gpt2-small'").df()
    assert len(df) == 20  # two shards of prompt-null rows pooled, not joined 2 × 2
    assert (df["n_prompts"] == 16).all()
    np.testing.assert_array_equal(np.sort(df["exact"].to_numpy()), np.sort(HEAD_EXACT["gpt2-small"]))


def test_compare_known_answers(root, tmp_path):
    df, written = compare_run(root, out=tmp_path)
    small = _row(df, model="gpt2-small", kind="head_out", method="attribution")
    assert (small.n_scores, small.pearson, small.spearman, small.recall_top10, small.sign_agreement) == \
        (20, pytest.approx(1.0), pytest.approx(1.0), 1.0, 1.0)
    assert small.n_params_m == pytest.approx(124.44, abs=0.01) and small.d_model == 768
    medium = _row(df, model="gpt2-medium", kind="head_out", method="attribution")
    assert medium.pearson == pytest.approx(-1.0) and medium.spearman == pytest.approx(-1.0)
    assert medium.recall_top10 == 1.0 and medium.recall_top5pct == 1.0  # |score| ranks agree
    assert medium.sign_agreement == 0.0

    mlp = _row(df, model="gpt2-small", kind="mlp_out", method="attribution")
    assert mlp.recall_top10 == pytest.approx(0.9)
    assert mlp.recall_top5pct == 1.0  # k = ceil(0.05 · 20) = 1: the top element is unchanged
    assert mlp.spearman == pytest.approx(1 - 6 * 2 / (20 * 399))
    assert mlp.pearson == pytest.approx(np.corrcoef(MLP_EXACT, MLP_APPROX)[0, 1])

    edge = _row(df, level="edges", kind="head_out->logits", method="edge_attribution")
    assert edge.n_scores == 40
    assert edge.pearson == pytest.approx(np.corrcoef(EDGE_EXACT, EDGE_APPROX)[0, 1], rel=1e-6)
    assert edge.spearman == pytest.approx(spearmanr(EDGE_EXACT, EDGE_APPROX).statistic, rel=1e-6)  # ties
    assert edge.sign_agreement == pytest.approx(np.mean(np.sign(EDGE_EXACT) == np.sign(EDGE_APPROX)))
    top = lambda x, k: set(np.argsort(-np.abs(x), kind="stable")[:k])  # noqa: E731
    a_sorted = np.sort(np.abs(EDGE_APPROX))[::-1]
    e_sorted = np.sort(np.abs(EDGE_EXACT))[::-1]
    for k, col in ((10, "recall_top10"), (2, "recall_top5pct")):
        if a_sorted[k - 1] != a_sorted[k] and e_sorted[k - 1] != e_sorted[k]:  # no tie at the boundary
            assert edge[col] == pytest.approx(len(top(EDGE_APPROX, k) & top(EDGE_EXACT, k)) / k)

    names = {p.name for p in written}
    assert {"compare.md", "compare.csv", "correlation_by_size.png"} <= names
    assert "scatter_edges_gpt2-small_ioi_edge_attribution_edge_activation_mean_denoise.png" in names
    for p in written:
        assert p.stat().st_size > 0
    md = (tmp_path / "compare.md").read_text()
    assert md.count("\n") == len(df) + 2 and "| gpt2-medium |" in md


def test_compare_cli_prints_table(root, tmp_path, capsys):
    compare_main([str(root), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "gpt2-medium" in out and "head_out->logits" in out
    assert (tmp_path / "compare.csv").exists()


def test_bad_root_says_what_to_do(tmp_path):
    with pytest.raises(ResultsError, match="not a directory"):
        open_results(tmp_path / "missing")
    with pytest.raises(ResultsError, match="no Parquet files"):
        open_results(tmp_path)


def _readme_queries() -> list[str]:
    text = README.read_text()
    section = text[text.index("<!-- section:analysis -->"):text.index("<!-- /section:analysis -->")]
    return re.findall(r"```sql\n(.*?)```", section, flags=re.S)


def test_readme_queries_run_and_answer(root):
    queries = _readme_queries()
    assert len(queries) == 3, "the README's analysis section shows three example queries"
    con = open_results(root)
    top, corr, head = (con.sql(q).df() for q in queries)
    # 1. top heads per model: L9H9 leads gpt2-small, L0H0 leads gpt2-medium
    first = top.groupby("model").head(1).set_index("model")
    assert (first.loc["gpt2-small", "layer"], first.loc["gpt2-small", "head"]) == (9, 9)
    assert (first.loc["gpt2-medium", "layer"], first.loc["gpt2-medium", "head"]) == (0, 0)
    # 2. correlation per component kind
    c = corr.set_index(["model", "component", "method"])
    assert c.loc[("gpt2-medium", "head_out", "attribution"), "pearson"] == pytest.approx(-1)
    assert c.loc[("gpt2-small", "head_out", "attribution"), "pearson"] == pytest.approx(1)
    # 3. one head (L9H9) across models, every method
    h = head.set_index(["model", "method"])
    assert h.loc[("gpt2-small", "activation"), "score"] == pytest.approx(HEAD_EXACT["gpt2-small"][19])
    assert h.loc[("gpt2-medium", "attribution"), "score"] == pytest.approx(-HEAD_EXACT["gpt2-medium"][19])
    assert not math.isnan(h.loc[("gpt2-small", "activation"), "n_params_m"])


def test_wandb_offline_logging(root, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    df, written = compare_run(root, out=tmp_path, use_wandb=True)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert any(runs[0].rglob("*.wandb"))


def _faith_rows(metric, full, empty, n_prompts, ks=(10.0, 50.0, 100.0)) -> pa.Table:
    from attrpatch.methods.faithfulness import FAITHFULNESS_SCHEMA

    n = len(ks)
    f = (np.array(metric) - empty) / (full - empty)
    return pa.Table.from_pydict({
        "direction": ["denoise"] * n, "ranking": ["edge_attribution"] * n, "level": ["edge"] * n,
        "ablation": ["patch"] * n, "k_percent": np.array(ks, np.float32), "n_kept": np.array([1, 5, 10], np.int32),
        "n_total": np.full(n, 10, np.int32), "n_edges_kept": np.array([1, 5, 10], np.int32),
        "metric": np.array(metric, np.float32), "metric_full": np.full(n, full, np.float32),
        "metric_empty": np.full(n, empty, np.float32), "faithfulness": f.astype(np.float32),
        "cpr": np.full(n, np.nan, np.float32), "cmd": np.full(n, np.nan, np.float32),
        "n_prompts": np.full(n, n_prompts, np.int32)}, schema=FAITHFULNESS_SCHEMA)


def test_faithfulness_curves_pool_shards(root, tmp_path):
    """Two shards (2 and 6 prompts) pool to metric means weighted by prompts; f, CPR, CMD recomputed."""
    from attrpatch.methods.faithfulness import areas

    faith = tmp_path / "faith_root"
    part = dict(model="gpt2-small", task="ioi", method="faithfulness")
    write_part(faith, "faithfulness", _faith_rows([1, 2, 3], 3, 0, 2), part=0, **part)
    write_part(faith, "faithfulness", _faith_rows([0, 1, 5], 5, 1, 6), part=1, **part)
    con = open_results(faith)
    df = con.sql("SELECT * FROM faithfulness_curves ORDER BY k_percent").df()
    assert df["metric"].tolist() == pytest.approx([0.25, 1.25, 4.5])
    assert df["metric_full"].iloc[0] == pytest.approx(4.5) and df["metric_empty"].iloc[0] == pytest.approx(0.75)
    f = [(0.25 - 0.75) / 3.75, (1.25 - 0.75) / 3.75, 1.0]
    assert df["faithfulness"].tolist() == pytest.approx(f)
    assert (df["n_prompts"] == 8).all()
    cpr, cmd = areas([10, 50, 100], f)
    assert df["cpr"].tolist() == pytest.approx([cpr] * 3) and cpr == pytest.approx(0.5 * (f[1] + 1) / 2)
    assert df["cmd"].tolist() == pytest.approx([cmd] * 3)
    assert cmd == pytest.approx(0.4 * (1 - f[0] + 1 - f[1]) / 2 + 0.5 * (1 - f[1]) / 2)


def test_model_sizes_from_sweep_manifest(tmp_path, tiny_dir):
    """A sweep's manifest maps local model names to checkpoint directories; their size is estimated."""
    from attrpatch.models import model_shape, resolve_spec

    root = tmp_path / "local"
    (tmp_path / "local").mkdir()
    manifest = {"models": {"local-x": {"source": str(tiny_dir)}, "gone": {"source": "/nonexistent/dir"},
                           "named": {"source": "x", "n_params": 3_500_000, "d_model": 32}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    for model in ("local-x", "gone", "named", "gpt2-xl"):
        write_part(root, "nodes", node_rows("mlp_out", 0, None, None, None, [1.0], 1), model=model, task="ioi",
                   method="activation")
    rows = open_results(root).execute("SELECT model, n_params_m, d_model FROM models").fetchall()
    sizes = {m: (n, d) for m, n, d in rows}
    shape = model_shape(resolve_spec(tiny_dir))
    assert sizes["local-x"] == (pytest.approx(shape.n_params / 1e6), shape.d_model)
    assert sizes["named"] == (3.5, 32)
    assert sizes["gpt2-xl"] == (pytest.approx(1557.6, abs=0.1), 1600) and sizes["gone"] == (None, None)  # NULL
