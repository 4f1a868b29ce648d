"""Dense scores → contract rows: every kept row maps back to its tensor cell; padding and masked cells dropped."""

import duckdb
import pyarrow.parquet as pq
import pytest
import torch

from attrpatch import make_batch
from attrpatch.components import Node
from attrpatch.scores import (
    EDGE_SCHEMA,
    NODE_SCHEMA,
    EdgeIndex,
    EdgeScores,
    NodeScores,
    edge_table,
    node_table,
    prompt_table,
)


def test_node_table_rows_and_padding(tokenizer):
    batch = make_batch("ioi", tokenizer, n_prompts=5, seed=4)
    n, L, H, P = len(batch), 2, 3, batch.n_pos
    scores = torch.randn(n, L, H, P, P)
    t = node_table(NodeScores("head_pattern", "denoise", scores, ("prompt", "layer", "head", "pos", "src_pos")), batch)
    assert t.schema == NODE_SCHEMA
    lengths = batch.lengths
    expected = sum(L * H * int(k) * (int(k) + 1) // 2 for k in lengths)
    assert t.num_rows == expected
    row = t.slice(7, 1).to_pylist()[0]
    i = int((batch.prompt_ids == row["prompt"]).nonzero())
    assert row["score"] == pytest.approx(float(scores[i, row["layer"], row["head"], row["pos"], row["src_pos"]]))
    assert row["n_prompts"] == 1 and row["direction"] == "denoise"


def test_node_table_mean_and_no_layer(tokenizer):
    batch = make_batch("pronoun", tokenizer, n_prompts=3)
    t = node_table(NodeScores("embed", "noise", torch.randn(batch.n_pos), ("pos",)), batch)
    assert t.num_rows == batch.n_pos
    assert t.column("prompt").null_count == t.num_rows
    assert set(t.column("n_prompts").to_pylist()) == {3}
    assert set(t.column("layer").to_pylist()) == {0}
    assert t.column("head").null_count == t.num_rows


def test_bad_axes():
    with pytest.raises(ValueError, match="ordered subset"):
        NodeScores("attn_out", "denoise", torch.zeros(2, 3), ("pos", "layer"))
    with pytest.raises(ValueError, match="dims"):
        NodeScores("attn_out", "denoise", torch.zeros(2, 3), ("layer",))


def test_edge_table_valid_only_and_parquet_roundtrip(tokenizer, tmp_path):
    batch = make_batch("ioi_seed8", tokenizer, n_prompts=2)
    src = (Node("embed", 0), Node("head_out", 0, 1), Node("mlp_out", 0))
    dst = (Node("head_q", 1, 0), Node("mlp_in", 0), Node("logits", 2))
    valid = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 0, 1]], dtype=torch.bool)
    scores = torch.randn(2, 3, 3)
    t = edge_table(EdgeScores("denoise", EdgeIndex(src, dst, valid), scores, ("prompt", "src", "dst")), batch)
    assert t.schema == EDGE_SCHEMA and t.num_rows == 2 * 8
    pq.write_table(t, tmp_path / "e.parquet")
    got = duckdb.sql(f"select score from read_parquet('{tmp_path}/e.parquet') where prompt = 1 and "
                     "src_component = 'mlp_out' and dst_component = 'logits'").fetchall()[0][0]
    assert got == pytest.approx(float(scores[1, 2, 2]))
    heads = duckdb.sql(f"select count(*) from read_parquet('{tmp_path}/e.parquet') where src_head is null").fetchall()[0][0]
    assert heads == 2 * 5


def test_prompt_table(tokenizer):
    batch = make_batch("factual", tokenizer, n_prompts=4)
    t = prompt_table(batch, torch.ones(4), torch.zeros(4))
    assert t.column("answer").to_pylist()[0] == " Paris" and t.column("wrong_answer").to_pylist()[0] == " Rome"
