"""The results contract, in one module: table schemas, key columns, partition paths and the results root.

    python -c "from attrpatch.results import ResultsRoot, NODE_SCHEMA; print(NODE_SCHEMA); print(ResultsRoot('results/demo').uri)"

A sweep writes one root (a local directory or any ``pyarrow.fs`` URI: ``s3://bucket/prefix``, ``gs://…``),
Hive-partitioned (README "Results"):

    ROOT/manifest.json                                     the launch: config, fingerprints, versions, status
    ROOT/prompts/model=M/task=T/part-00003.parquet         PROMPT_SCHEMA
    ROOT/nodes/model=M/task=T/method=X/part-00003.parquet  NODE_SCHEMA
    ROOT/edges/model=M/task=T/method=X/part-00003.parquet  EDGE_SCHEMA
    ROOT/<table>/model=M/task=T/method=X/part-*.parquet    extra tables a method returns (e.g. faithfulness)
    ROOT/_done/model=M/task=T/{prompts,method=X}/part-00003.json   completion records: rows, checksums, fingerprint

``part-NNNNN`` is the shard number. A part appears only when complete: it is serialised in memory, hashed
(SHA-256), written to a hidden temporary name and renamed (atomic on a POSIX file system; an object-store
PUT is all-or-nothing). The completion record is written last and carries each part's row count and
checksum, so a reader or a relaunch can verify a part against it (``verify_part``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from attrpatch.errors import ResultsError

# ------------------------------------------------------------------------------------------- columns

NODE_SCHEMA = pa.schema([
    ("direction", pa.string()), ("component", pa.string()), ("layer", pa.int16()), ("head", pa.int16()),
    ("pos", pa.int16()), ("src_pos", pa.int16()), ("prompt", pa.int32()), ("n_prompts", pa.int32()),
    ("score", pa.float32()),
])
EDGE_SCHEMA = pa.schema([
    ("direction", pa.string()), ("src_component", pa.string()), ("src_layer", pa.int16()),
    ("src_head", pa.int16()), ("dst_component", pa.string()), ("dst_layer", pa.int16()),
    ("dst_head", pa.int16()), ("pos", pa.int16()), ("prompt", pa.int32()), ("n_prompts", pa.int32()),
    ("score", pa.float32()),
])
PROMPT_SCHEMA = pa.schema([
    ("prompt", pa.int32()), ("clean", pa.string()), ("corrupt", pa.string()), ("answer", pa.string()),
    ("wrong_answer", pa.string()), ("template", pa.int32()), ("clean_metric", pa.float32()),
    ("corrupt_metric", pa.float32()),
])
SCHEMAS = {"nodes": NODE_SCHEMA, "edges": EDGE_SCHEMA, "prompts": PROMPT_SCHEMA}
CONTRACT_TABLES = ("nodes", "edges", "prompts")
# The columns that identify a score (with the partitions): two rows with the same key are the same score.
NODE_KEY = ("direction", "component", "layer", "head", "pos", "src_pos", "prompt")
EDGE_KEY = ("direction", "src_component", "src_layer", "src_head", "dst_component", "dst_layer", "dst_head",
            "pos", "prompt")
KEYS = {"nodes": NODE_KEY, "edges": EDGE_KEY, "prompts": ("prompt",)}
PARTITIONS = ("model", "task", "method")  # Hive partitions, as strings; prompts have no method
RESERVED = ("prompts", "nodes", "edges", "plots", "_done", "wandb")  # names an extra table may not take
NOT_TABLES = ("plots", "wandb")  # directories under ROOT that hold figures or W&B runs (and _* / .*: bookkeeping)


# ------------------------------------------------------------------------------------------- paths

def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def table_dir(table: str, model: str, task: str, method: str | None) -> str:
    """ROOT-relative directory of a table's parts for (model, task[, method]); prompts have no method."""
    base = f"{table}/model={model}/task={task}"
    return base if method is None else f"{base}/method={method}"


def part_path(table: str, model: str, task: str, method: str | None, shard: int) -> str:
    return f"{table_dir(table, model, task, method)}/{part_name(shard)}"


def record_path(model: str, task: str, method: str | None, shard: int) -> str:
    """ROOT-relative completion record of a cell (method None: the prompts cell of a shard)."""
    what = "prompts" if method is None else f"method={method}"
    return f"_done/model={model}/task={task}/{what}/part-{shard:05d}.json"


def parse_record_path(rel: str) -> tuple[str, str, str | None, int]:
    """(model, task, method or None, shard) of a completion record's path."""
    parts = rel.split("/")
    model, task = parts[1].split("=", 1)[1], parts[2].split("=", 1)[1]
    method = None if parts[3] == "prompts" else parts[3].split("=", 1)[1]
    return model, task, method, int(parts[4].removeprefix("part-").removesuffix(".json"))


# ------------------------------------------------------------------------------------------- the root

TMP_SUFFIX = ".tmp"


def _is_uri(root: str) -> bool:
    return "://" in root


@dataclass(frozen=True)
class Written:
    """What ``write_table`` wrote: the part's rows, size and SHA-256 (recorded in the completion record)."""

    rows: int
    bytes: int
    sha256: str


class ResultsRoot:
    """A results root on a local disk or any ``pyarrow.fs`` URI; picklable (workers rebuild the file system
    from the URI). ``s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http`` reaches any S3-compatible
    server; credentials come from the usual AWS environment."""

    def __init__(self, root: str):
        root = str(root)
        self.uri = root if _is_uri(root) else os.path.abspath(os.path.expanduser(root))
        try:
            self.fs, self.base = pafs.FileSystem.from_uri(self.uri)
        except (OSError, ValueError) as e:
            raise ResultsError(f"cannot open results root {root!r}: {e}") from None
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def __reduce__(self):
        return ResultsRoot, (self.uri,)

    def __repr__(self) -> str:
        return f"ResultsRoot({self.uri!r})"

    def path(self, rel: str = "") -> str:
        """The file system path of a ROOT-relative path."""
        return f"{self.base.rstrip('/')}/{rel}" if rel else self.base

    def display(self, rel: str = "") -> str:
        """A path a user can paste: local path, or the URI (without query) joined with ``rel``."""
        if self.local:
            return self.path(rel)
        return f"{self.uri.split('?', 1)[0].rstrip('/')}/{rel}" if rel else self.uri.split("?", 1)[0]

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def is_dir(self, rel: str = "") -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.Directory

    def _atomic(self, rel: str, write) -> None:
        final = self.path(rel)
        directory, name = final.rsplit("/", 1)
        self.fs.create_dir(directory, recursive=True)
        tmp = f"{directory}/.{name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
        try:
            write(tmp)
            self.fs.move(tmp, final)
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except OSError:
                pass
            raise

    def write_bytes(self, rel: str, data: bytes) -> None:
        def write(tmp: str) -> None:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)

        self._atomic(rel, write)

    def write_table(self, rel: str, table: pa.Table) -> Written:
        """Write one Parquet part atomically (zstd: scores compress ~3× at no measurable cost here) and
        return its row count and checksum."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        self.write_bytes(rel, data)
        return Written(table.num_rows, len(data), hashlib.sha256(data).hexdigest())

    def write_json(self, rel: str, obj) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_json(self, rel: str):
        return json.loads(self.read_bytes(rel))

    def read_table(self, rel: str) -> pa.Table:
        return pq.read_table(self.path(rel), filesystem=self.fs)

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.path(rel))
        except (FileNotFoundError, OSError):
            pass

    def list_files(self, rel: str = "") -> list[str]:
        """ROOT-relative paths of every file under ``rel`` (empty when it does not exist)."""
        if not self.exists(rel):
            return []
        sel = pafs.FileSelector(self.path(rel), recursive=True)
        prefix = self.base.rstrip("/") + "/"
        return [i.path[len(prefix):] for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File]

    def records(self) -> set[str]:
        """Completion records present (one listing of ``_done``, not one request per cell)."""
        return {p for p in self.list_files("_done") if p.endswith(".json")}

    def temp_files(self) -> list[str]:
        return [p for p in self.list_files("") if os.path.basename(p).startswith(".") and p.endswith(TMP_SUFFIX)]

    def clean_temp(self) -> int:
        """Delete temporary files left by a killed writer; returns how many."""
        stale = self.temp_files()
        for rel in stale:
            self.delete(rel)
        return len(stale)

    def tables(self) -> list[str]:
        """Names of the top-level directories that hold Parquet parts (contract tables first)."""
        found = set()
        for p in self.list_files(""):
            top = p.split("/", 1)[0]
            if p.endswith(".parquet") and "/" in p and top not in NOT_TABLES and top[0] not in "._" \
                    and not os.path.basename(p).startswith("."):
                found.add(top)
        return [t for t in CONTRACT_TABLES if t in found] + sorted(found - set(CONTRACT_TABLES))

    def verify_part(self, rel: str, rows: int, sha256: str) -> str | None:
        """None when the part at ``rel`` exists, parses, and has ``rows`` rows and checksum ``sha256``;
        otherwise what is wrong, in a few words."""
        try:
            data = self.read_bytes(rel)
        except FileNotFoundError:
            return "missing"
        except OSError as e:
            return f"unreadable ({e})"
        if hashlib.sha256(data).hexdigest() != sha256:
            return f"checksum mismatch ({len(data)} bytes)"
        try:
            n = pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
        except Exception as e:  # a file with the right hash but bad Parquet cannot happen unless the record lies
            return f"not Parquet ({e})"
        return None if n == rows else f"{n} rows, the record says {rows}"
