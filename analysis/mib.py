"""Export the edge scores of one (model, task, method) as an MIB circuit-track submission file.

    python -m analysis.mib ROOT --model gpt2-small --task ioi --method eap_ig --out ioi_gpt2/eap_ig.json

The format is the importance-score JSON of the MIB circuit-localization track (Mueller et al. 2025, "MIB: A
Mechanistic Interpretability Benchmark"), i.e. EAP-IG's ``Graph.to_json`` / ``Graph.from_json`` as used by
the track's evaluation code. Sources consulted: the track's README ("Submitting to the MIB Leaderboard": one
folder per task/model such as ``ioi_gpt2`` holding one .json or .pt file of floating-point importance scores
for every edge), its example ``circuits/ioi-eap-ig.json``, and ``EAP-IG/src/eap/graph.py`` (``to_json``,
``from_json``, ``from_model``) — all in github.com/yanivnik/MIB-shared-task, a copy of the MIB circuit-track
repository. The file is

    {"cfg": {"n_layers": L, "n_heads": H, "parallel_attn_mlp": false, "d_model": D},
     "nodes": {"input": {"in_graph": true}, "a0.h0": {...}, …, "m0": {...}, …, "logits": {...}},
     "edges": {"input->a0.h0<q>": {"score": s, "in_graph": b}, …, "a0.h1->m0": {...}, "m11->logits": {...}}}

Names: ``embed`` → ``input``; ``head_out`` (l, h) → ``a{l}.h{h}``; ``mlp_out`` / ``mlp_in`` (l) → ``m{l}``;
``logits`` → ``logits``; an edge into a head's q/k/v input is ``src->a{l}.h{h}<q|k|v>``. The edges are
exactly EAP-IG's GPT-2 graph (input → every target; a head → later layers' q/k/v, its own and later MLPs,
logits; an MLP → later layers and logits), which is also attrpatch's (``attrpatch.graph``).

Score of an edge, **in MIB's convention**: attrpatch's score summed over positions and averaged over prompts
(shards weighted by ``n_prompts``), oriented so that a positive score means the edge carries the behaviour,
as EAP-IG's ``attribute`` (which MIB's baselines use) writes it. EAP-IG contracts (corrupted − clean)
activations with the gradient of the *loss* −logit difference on the clean run and divides by the number of
prompts, i.e. −(1/N) × attrpatch's ``noise`` score; so ``noise`` scores are exported negated, and
``denoise`` scores (clean patched into the corrupted run, positive when the edge restores the behaviour) as
they are. ``--direction`` picks the scores (default ``noise`` when present, MIB's direction, else
``denoise``). MIB's CPR ranks edges by this *signed* score, so ``in_graph`` marks the top ``--top-percent``
by the signed score (``--ranking abs`` ranks by |score| instead, as MIB's CMD does) and the nodes they touch.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path

import duckdb
import numpy as np

from attrpatch.errors import AttrpatchError, ResultsError
from attrpatch.results import ResultsRoot

log = logging.getLogger(__name__)

QKV_LETTER = {"head_q": "q", "head_k": "k", "head_v": "v"}


SIGN = {"noise": -1.0, "denoise": 1.0}  # attrpatch score × SIGN = MIB's orientation (module docstring)


class ExportError(ResultsError):
    """Scores that cannot be written as an MIB graph; the message says what is wrong."""


def src_name(component: str, layer: int, head: int | None) -> str:
    if component == "embed":
        return "input"
    if component == "head_out":
        return f"a{layer}.h{head}"
    if component == "mlp_out":
        return f"m{layer}"
    raise ExportError(f"source component {component!r} has no MIB node: MIB sources are embed, head_out, mlp_out")


def dst_name(component: str, layer: int, head: int | None) -> str:
    if component in QKV_LETTER:
        return f"a{layer}.h{head}<{QKV_LETTER[component]}>"
    if component == "mlp_in":
        return f"m{layer}"
    if component == "logits":
        return "logits"
    raise ExportError(f"target component {component!r} has no MIB node: MIB targets are head_q/k/v, mlp_in, logits")


def mib_graph(n_layers: int, n_heads: int) -> tuple[list[str], list[str]]:
    """Node names and edge names of EAP-IG's GPT-2 graph (sequential attention and MLP), in its order."""
    nodes, edges, resid = ["input"], [], ["input"]
    for layer in range(n_layers):
        heads = [f"a{layer}.h{h}" for h in range(n_heads)]
        edges += [f"{s}->{a}<{q}>" for s in resid for a in heads for q in "qkv"]
        resid += heads
        edges += [f"{s}->m{layer}" for s in resid]
        resid.append(f"m{layer}")
        nodes += [*heads, f"m{layer}"]
    edges += [f"{s}->logits" for s in resid]
    return [*nodes, "logits"], edges


def edge_scores(root: str | Path | ResultsRoot, model: str, task: str, method: str,
                direction: str | None = None) -> tuple[dict[str, float], str, tuple[int, int]]:
    """{MIB edge name: attrpatch score} of one (model, task, method) — summed over positions, averaged over
    prompts, not yet in MIB's orientation — the direction used and (n_layers, n_heads) (n_layers = the layer
    of the ``logits`` target; n_heads = 1 + the largest head index).

    Step 1: per part file and prompt (shard-mean rows: per file), sum over positions.
    Step 2: average over prompts, weighting each group by its ``n_prompts``."""
    from analysis.query import open_root

    root = root if isinstance(root, ResultsRoot) else ResultsRoot(str(root))
    rel = f"edges/model={model}/task={task}/method={method}"
    files = [p for p in root.list_files(rel) if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith(".")]
    if not files:
        raise ExportError(f"no edge scores at {root.display(rel)}: check --model/--task/--method against the "
                          f"directories under {root.display('edges')}")
    con = open_root(root).con
    where = f"model = '{model}' AND task = '{task}' AND method = '{method}'"
    directions = [r[0] for r in con.execute(f"SELECT DISTINCT direction FROM edges WHERE {where} ORDER BY 1").fetchall()]
    if direction is None:
        direction = "noise" if "noise" in directions else directions[0]
    if direction not in directions:
        raise ExportError(f"no {direction!r} scores for {method} on {model}/{task}: present are {directions}")
    key = "src_component, src_layer, src_head, dst_component, dst_layer, dst_head"
    with tempfile.TemporaryDirectory() as tmp:
        if root.local:
            paths = [root.path(f) for f in files]
        else:  # each part is one shard: copy them here so the file name tells shards apart
            paths = []
            for i, f in enumerate(files):
                paths.append(os.path.join(tmp, f"part-{i:05d}.parquet"))
                with open(paths[-1], "wb") as fh:
                    fh.write(root.read_bytes(f))
        rows = con.execute(f"""
            WITH per_prompt AS (
                SELECT {key}, sum(score) AS score, any_value(n_prompts) AS weight
                FROM read_parquet({paths!r}, filename = true, hive_partitioning = false) WHERE direction = ?
                GROUP BY {key}, filename, prompt
            )
            SELECT {key}, sum(score * weight) / sum(weight) AS score FROM per_prompt GROUP BY {key}""",
                           [direction]).fetchall()
    scores = {f"{src_name(*r[0:3])}->{dst_name(*r[3:6])}": float(r[6]) for r in rows}
    n_layers, n_heads = con.execute(f"""
        SELECT max(CASE WHEN dst_component = 'logits' THEN dst_layer END),
               greatest(max(src_head), max(dst_head)) + 1 FROM edges WHERE {where}""").fetchone()
    if n_layers is None:
        raise ExportError(f"{method} on {model}/{task} has no edges into logits: MIB needs the full graph")
    return scores, direction, (int(n_layers), int(n_heads or 0))


def d_model_of(model: str, root: ResultsRoot) -> int | None:
    """d_model from the sweep manifest (it records every model's width), else the model's own config."""
    from analysis.query import model_sizes

    width = model_sizes(root, [model])[model][1]
    return None if math.isnan(width) else int(width)


def to_mib(scores: dict[str, float], n_layers: int, n_heads: int, d_model: int,
           top_percent: float = 100.0, ranking: str = "signed") -> dict:
    """Step 3: the MIB graph dict from scores already in MIB's orientation; every graph edge must have a
    score and no score may be off the graph. ``in_graph``: the top ``top_percent`` by signed score (or |score|)."""
    nodes, edges = mib_graph(n_layers, n_heads)
    missing = [e for e in edges if e not in scores]
    extra = sorted(set(scores) - set(edges))
    if missing or extra:
        raise ExportError(
            f"the scores do not cover MIB's {n_layers}-layer, {n_heads}-head graph: {len(missing)} edges missing "
            f"(e.g. {missing[:3]}), {len(extra)} not in the graph (e.g. {extra[:3]}). Export a method that scores "
            "every edge (edge_subset null)")
    values = np.array([scores[e] for e in edges])
    n_keep = int(math.floor(top_percent / 100 * len(edges) + 1e-9))
    if ranking not in ("signed", "abs"):
        raise ExportError(f"ranking must be signed or abs, got {ranking!r}")
    order = np.argsort(-(values if ranking == "signed" else np.abs(values)), kind="stable")
    keep = np.zeros(len(edges), dtype=bool)
    keep[order[:n_keep]] = True
    touched = {"input", "logits"} if n_keep == len(edges) else set()
    for e, k in zip(edges, keep, strict=True):
        if k:
            s, d = e.split("->")
            touched |= {s, d.split("<")[0]}
    return {
        "cfg": {"n_layers": n_layers, "n_heads": n_heads, "parallel_attn_mlp": False, "d_model": d_model},
        "nodes": {n: {"in_graph": n in touched or n == "logits"} for n in nodes},
        "edges": {e: {"score": float(v), "in_graph": bool(k)} for e, v, k in zip(edges, values, keep, strict=True)},
    }


def export(root: str | Path | ResultsRoot, model: str, task: str, method: str, out: str | Path,
           direction: str | None = None, d_model: int | None = None, top_percent: float = 100.0,
           ranking: str = "signed") -> Path:
    """Write the MIB JSON of one (model, task, method) to ``out``, scores in MIB's orientation; returns the path."""
    root = root if isinstance(root, ResultsRoot) else ResultsRoot(str(root))
    scores, direction, (n_layers, n_heads) = edge_scores(root, model, task, method, direction)
    d_model = d_model or d_model_of(model, root)
    if d_model is None:
        raise ExportError(f"d_model of {model!r} is unknown: pass --d-model (the residual width)")
    mib = {k: SIGN[direction] * v for k, v in scores.items()}
    graph = to_mib(mib, n_layers, n_heads, d_model, top_percent, ranking)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(graph))
    log.info("wrote %s: %d edges of %s/%s/%s (%s scores × %+g: MIB's orientation)", out, len(graph["edges"]), model,
             task, method, direction, SIGN[direction])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.mib", description="MIB circuit-track export")
    ap.add_argument("root")
    ap.add_argument("--model", required=True)
    ap.add_argument("--task", required=True)
    ap.add_argument("--method", required=True, help="an edge method, e.g. edge_attribution, eap_ig")
    ap.add_argument("--out", required=True, help="the .json file to write (MIB expects <task>_<model>/ folders)")
    ap.add_argument("--direction", default=None, choices=("denoise", "noise"))
    ap.add_argument("--d-model", type=int, default=None)
    ap.add_argument("--top-percent", type=float, default=100.0, help="edges marked in_graph (default all)")
    ap.add_argument("--ranking", default="signed", choices=("signed", "abs"),
                    help="in_graph by signed score (MIB's CPR, default) or by |score| (MIB's CMD)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        export(args.root, args.model, args.task, args.method, args.out, args.direction, args.d_model,
               args.top_percent, args.ranking)
    except (AttrpatchError, duckdb.Error) as e:
        sys.stderr.write(f"error: {str(e).splitlines()[0]}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
