"""Dense score tensors behind a small index, and their Arrow tables (the schemas of ``attrpatch.results``).

    python -c "import attrpatch.scores as s; print(s.NodeScores.__doc__)"

Methods return ``NodeScores`` / ``EdgeScores``: one dense tensor each plus the names of its axes. Rows
are a view made only when writing: ``node_table`` / ``edge_table`` flatten the tensor, attach the prompt
numbers, and drop positions past each prompt's length (padding) and pattern cells above the diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from torch import Tensor

from attrpatch.components import Node
from attrpatch.results import EDGE_SCHEMA, NODE_SCHEMA, PROMPT_SCHEMA
from attrpatch.tasks import PromptBatch

NODE_AXES = ("prompt", "layer", "head", "pos", "src_pos")
EDGE_AXES = ("prompt", "pos", "src", "dst")

@dataclass(frozen=True)
class NodeScores:
    """Scores of one component kind: ``scores`` has the named ``axes`` (an ordered subset of NODE_AXES).

    Without a ``prompt`` axis the scores are a mean over the batch (rows get ``prompt`` null and
    ``n_prompts`` = batch size). Without ``layer`` (``embed``/``pos_embed``) the layer column is 0.
    """

    component: str
    direction: str
    scores: Tensor
    axes: tuple[str, ...]

    def __post_init__(self) -> None:
        if tuple(a for a in NODE_AXES if a in self.axes) != self.axes:
            raise ValueError(f"axes {self.axes} must be an ordered subset of {NODE_AXES}")
        if self.scores.dim() != len(self.axes):
            raise ValueError(f"scores have {self.scores.dim()} dims but axes are {self.axes}")


@dataclass(frozen=True)
class EdgeIndex:
    """Sources and targets of an edge graph; ``valid[s, d]`` marks the edges that exist (s before d)."""

    src: tuple[Node, ...]
    dst: tuple[Node, ...]
    valid: Tensor = field(repr=False)  # bool [src, dst]

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())


@dataclass(frozen=True)
class EdgeScores:
    """Edge scores ``[prompt?, pos?, src, dst]`` over an ``EdgeIndex``; invalid cells are ignored."""

    direction: str
    index: EdgeIndex
    scores: Tensor
    axes: tuple[str, ...]

    def __post_init__(self) -> None:
        if tuple(a for a in EDGE_AXES if a in self.axes) != self.axes or self.axes[-2:] != ("src", "dst"):
            raise ValueError(f"axes {self.axes} must be an ordered subset of {EDGE_AXES} ending in src, dst")
        if self.scores.dim() != len(self.axes):
            raise ValueError(f"scores have {self.scores.dim()} dims but axes are {self.axes}")


@dataclass
class MethodResult:
    """What a method returns: node and/or edge scores, and any extra tables (e.g. ``faithfulness``) that
    the sweep writes to ``ROOT/<name>/model=M/task=T/method=X/part-*.parquet``."""

    nodes: list[NodeScores] = field(default_factory=list)
    edges: list[EdgeScores] = field(default_factory=list)
    tables: dict[str, pa.Table] = field(default_factory=dict)


def _grid(shape: tuple[int, ...]) -> list[np.ndarray]:
    return [g.ravel() for g in np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")]


def node_table(ns: NodeScores, batch: PromptBatch) -> pa.Table:
    """Rows of one NodeScores; padded positions and masked pattern cells are dropped."""
    values = ns.scores.detach().float().cpu().numpy()
    coords = dict(zip(ns.axes, _grid(values.shape), strict=True))
    keep = np.ones(values.size, dtype=bool)
    n = len(batch)
    lengths = batch.lengths.numpy()
    if "pos" in coords:
        limit = lengths[coords["prompt"]] if "prompt" in coords else lengths.max()
        keep &= coords["pos"] < limit
        if "src_pos" in coords:
            keep &= coords["src_pos"] <= coords["pos"]
    elif "src_pos" in coords:
        raise ValueError("src_pos without pos")

    def col(axis: str, dtype) -> pa.Array:
        if axis not in coords:
            return pa.nulls(int(keep.sum()), dtype)
        return pa.array(coords[axis][keep].astype(dtype.to_pandas_dtype()), dtype)

    rows = int(keep.sum())
    if "prompt" in coords:
        prompt = pa.array(batch.prompt_ids.numpy()[coords["prompt"][keep]].astype(np.int32), pa.int32())
        n_prompts = pa.array(np.ones(rows, np.int32), pa.int32())
    else:
        prompt = pa.nulls(rows, pa.int32())
        n_prompts = pa.array(np.full(rows, n, np.int32), pa.int32())
    layer = col("layer", pa.int16()) if "layer" in coords else pa.array(np.zeros(rows, np.int16), pa.int16())
    return pa.Table.from_arrays([
        pa.array([ns.direction] * rows, pa.string()), pa.array([ns.component] * rows, pa.string()),
        layer, col("head", pa.int16()), col("pos", pa.int16()), col("src_pos", pa.int16()),
        prompt, n_prompts, pa.array(values.ravel()[keep].astype(np.float32), pa.float32()),
    ], schema=NODE_SCHEMA)


def edge_table(es: EdgeScores, batch: PromptBatch) -> pa.Table:
    """Rows of one EdgeScores: only valid edges, only real (unpadded) positions."""
    values = es.scores.detach().float().cpu().numpy()
    coords = dict(zip(es.axes, _grid(values.shape), strict=True))
    keep = es.index.valid.cpu().numpy()[coords["src"], coords["dst"]]
    if "pos" in coords:
        lengths = batch.lengths.numpy()
        limit = lengths[coords["prompt"]] if "prompt" in coords else lengths.max()
        keep &= coords["pos"] < limit
    rows = int(keep.sum())
    s, d = coords["src"][keep], coords["dst"][keep]

    def node_cols(nodes: tuple[Node, ...], idx: np.ndarray) -> list[pa.Array]:
        comp = np.array([x.component for x in nodes], dtype=object)[idx]
        layer = np.array([x.layer for x in nodes], np.int16)[idx]
        head = np.array([-1 if x.head is None else x.head for x in nodes], np.int16)[idx]
        return [pa.array(comp, pa.string()), pa.array(layer, pa.int16()),
                pa.array(head, pa.int16(), mask=head < 0)]

    if "prompt" in coords:
        prompt = pa.array(batch.prompt_ids.numpy()[coords["prompt"][keep]].astype(np.int32), pa.int32())
        n_prompts = pa.array(np.ones(rows, np.int32), pa.int32())
    else:
        prompt = pa.nulls(rows, pa.int32())
        n_prompts = pa.array(np.full(rows, len(batch), np.int32), pa.int32())
    pos = (pa.array(coords["pos"][keep].astype(np.int16), pa.int16()) if "pos" in coords
           else pa.nulls(rows, pa.int16()))
    return pa.Table.from_arrays([
        pa.array([es.direction] * rows, pa.string()), *node_cols(es.index.src, s), *node_cols(es.index.dst, d),
        pos, prompt, n_prompts, pa.array(values.ravel()[keep].astype(np.float32), pa.float32()),
    ], schema=EDGE_SCHEMA)


def prompt_table(batch: PromptBatch, clean_metric: Tensor, corrupt_metric: Tensor) -> pa.Table:
    """The prompts table: texts, the two compared tokens and the metric baselines."""
    return pa.Table.from_pydict({
        "prompt": batch.prompt_ids.numpy().astype(np.int32),
        "clean": [p.clean for p in batch.prompts], "corrupt": [p.corrupt for p in batch.prompts],
        "answer": [p.answer for p in batch.prompts], "wrong_answer": [p.wrong for p in batch.prompts],
        "template": np.array([p.template for p in batch.prompts], np.int32),
        "clean_metric": clean_metric.detach().float().cpu().numpy(),
        "corrupt_metric": corrupt_metric.detach().float().cpu().numpy(),
    }, schema=PROMPT_SCHEMA)


def concat(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    return pa.concat_tables(tables) if tables else schema.empty_table()
