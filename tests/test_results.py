"""The results contract module: atomic, checksummed parts; paths and their parsing; one root on any file system."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from attrpatch.errors import ResultsError
from attrpatch.results import (
    EDGE_KEY,
    EDGE_SCHEMA,
    NODE_KEY,
    NODE_SCHEMA,
    ResultsRoot,
    parse_record_path,
    part_path,
    record_path,
)


def test_part_files_are_atomic_and_temp_files_cleanable(tmp_path):
    root = ResultsRoot(str(tmp_path / "r"))
    table = pa.table({"x": [1, 2, 3]})
    root.write_table("nodes/model=m/part-00000.parquet", table)
    assert root.read_table("nodes/model=m/part-00000.parquet").equals(table)

    class Boom(Exception):
        pass

    def failing(tmp):  # a writer killed half-way: its temporary file exists, the part does not
        with root.fs.open_output_stream(tmp) as f:
            f.write(b"PAR1 half a file")
        raise Boom

    with pytest.raises(Boom):
        root._atomic("nodes/model=m/part-00001.parquet", failing)
    assert not root.exists("nodes/model=m/part-00001.parquet")
    assert root.temp_files() == []  # the writer removes its own temporary file on failure
    stale = tmp_path / "r/nodes/model=m/.part-00002.parquet.dead.tmp"
    stale.write_bytes(b"left by a SIGKILL")
    assert root.temp_files() == ["nodes/model=m/.part-00002.parquet.dead.tmp"]
    assert root.clean_temp() == 1 and not stale.exists()
    assert sorted(os.listdir(tmp_path / "r/nodes/model=m")) == ["part-00000.parquet"]


def test_written_parts_carry_a_checksum_that_verifies(tmp_path):
    root = ResultsRoot(str(tmp_path / "r"))
    table = pa.table({"x": list(range(100))})
    written = root.write_table("t/part-00000.parquet", table)
    assert written.rows == 100 and written.bytes == os.path.getsize(tmp_path / "r/t/part-00000.parquet")
    assert root.verify_part("t/part-00000.parquet", 100, written.sha256) is None
    assert "rows" in root.verify_part("t/part-00000.parquet", 99, written.sha256)
    path = tmp_path / "r/t/part-00000.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    assert root.verify_part("t/part-00000.parquet", 100, written.sha256).startswith("checksum mismatch")
    path.write_bytes(bytes(data[:10]))
    assert root.verify_part("t/part-00000.parquet", 100, written.sha256).startswith("checksum mismatch")
    assert root.verify_part("t/part-00009.parquet", 1, "0" * 64) == "missing"


def test_paths_and_their_parsing():
    assert part_path("nodes", "m", "ioi", "attribution", 3) == "nodes/model=m/task=ioi/method=attribution/part-00003.parquet"
    assert part_path("prompts", "m", "ioi", None, 0) == "prompts/model=m/task=ioi/part-00000.parquet"
    for method in ("attribution", None):
        rel = record_path("gpt2-small", "ioi", method, 12)
        assert parse_record_path(rel) == ("gpt2-small", "ioi", method, 12)
    assert NODE_KEY == tuple(f.name for f in NODE_SCHEMA if f.name not in ("n_prompts", "score"))
    assert EDGE_KEY == tuple(f.name for f in EDGE_SCHEMA if f.name not in ("n_prompts", "score"))


def test_tables_lists_parquet_directories_only(tmp_path):
    root = ResultsRoot(str(tmp_path))
    root.write_table("nodes/model=m/task=t/method=x/part-00000.parquet", pa.table({"x": [1]}))
    root.write_table("faithfulness/model=m/task=t/method=f/part-00000.parquet", pa.table({"x": [1]}))
    root.write_table("plots/x.parquet", pa.table({"x": [1]}))
    root.write_json("_done/model=m/task=t/prompts/part-00000.json", {})
    assert root.tables() == ["nodes", "faithfulness"]


def test_a_bad_uri_is_one_error():
    with pytest.raises(ResultsError, match="cannot open results root"):
        ResultsRoot("nosuchscheme://bucket/x")
