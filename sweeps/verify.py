"""Check a results root end to end: one line per problem, exit status 1 when there is any (2: not a root).

    python -m sweeps.verify results/default

1. Every completion record's parts exist, parse as Parquet, and have the recorded rows and SHA-256.
2. Every part has a record (an orphan part is data no record vouches for).
3. No score is written twice: per table, no two rows share the partitions and the key columns.
4. The prompts agree with the fingerprint: each (model, task) holds prompts 0 … n − 1 exactly once, n the
   generated prompt count recorded in the manifest (or the recorded options' ``n_prompts``).
5. Cells of one (model, task, method) share one fingerprint.
"""

from __future__ import annotations

import argparse
import sys

import duckdb

from attrpatch.errors import AttrpatchError, ResultsError
from attrpatch.results import KEYS, ResultsRoot, parse_record_path


def problems(root: ResultsRoot) -> list[str]:
    """Every problem found, one line each (empty: the root is sound)."""
    if not root.is_dir():
        raise ResultsError(f"{root.display()} is not a results root (no such directory)")
    out: list[str] = []
    files = set(root.list_files())
    vouched: set[str] = set()
    fingerprints: dict[tuple, set] = {}
    n_prompts: dict[tuple, int] = {}
    for rel in sorted(p for p in files if p.startswith("_done/") and p.endswith(".json")):
        try:
            rec = root.read_json(rel)
        except (OSError, ValueError) as e:
            out.append(f"{rel}: unreadable completion record ({type(e).__name__})")
            continue
        model, task, method, shard = parse_record_path(rel)
        fingerprints.setdefault((model, task, method), set()).add(rec.get("fingerprint"))
        if method is None and rec.get("options"):
            n_prompts[(model, task)] = rec["options"]["task"]["n_prompts"]
        parts = rec.get("parts")
        if not parts:
            out.append(f"{rel}: no part checksums in the record (written by an older attrpatch)")
            continue
        for part in parts.values():  # step 1
            vouched.add(part["path"])
            problem = root.verify_part(part["path"], part["rows"], part["sha256"])
            if problem:
                out.append(f"{part['path']}: {problem}")
    for rel in sorted(files):  # step 2
        name = rel.rsplit("/", 1)[-1]
        if rel.endswith(".parquet") and not name.startswith(".") and rel.split("/", 1)[0] not in ("plots", "wandb") \
                and rel not in vouched:
            out.append(f"{rel}: a part with no completion record")
    for (model, task, method), fps in sorted(fingerprints.items(), key=str):  # step 5
        if len(fps) > 1:
            out.append(f"{model}/{task}/{method or 'prompts'}: cells computed with {len(fps)} different fingerprints")
    if out:
        return out
    from analysis.query import open_root

    try:
        res = open_root(root, exact=set())
    except ResultsError:
        return out
    con: duckdb.DuckDBPyConnection = res.con
    for table in res.tables:  # step 3
        key = KEYS.get(table)
        if key is None:
            continue
        cols = ", ".join(("model", "task", *(("method",) if table != "prompts" else ()), *key))
        dupes = con.execute(f"SELECT count(*) - count(DISTINCT ({cols})) FROM {table}").fetchone()[0]
        if dupes:
            out.append(f"{table}: {dupes:,} rows repeat the key of another row ({cols})")
    if "prompts" in res.tables:  # step 4
        for model, task, n, lo, hi, distinct in con.execute(
                "SELECT model, task, count(*), min(prompt), max(prompt), count(DISTINCT prompt) FROM prompts "
                "GROUP BY ALL ORDER BY ALL").fetchall():
            want = n_prompts.get((model, task))
            if (lo, hi + 1, distinct) != (0, n, n):
                out.append(f"prompts of {model}/{task}: ids {lo}…{hi} for {n} rows ({distinct} distinct): not 0 … n − 1")
            elif want is not None and n > want:
                out.append(f"prompts of {model}/{task}: {n} prompts, the fingerprint asks for {want}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sweeps.verify", description=__doc__.split("\n\n")[0])
    ap.add_argument("root", help="a results root (directory or pyarrow.fs URI)")
    args = ap.parse_args(argv)
    try:
        found = problems(ResultsRoot(args.root))
    except AttrpatchError as e:
        sys.stderr.write(f"error: {str(e).splitlines()[0]}\n")
        return 2
    for line in found:
        sys.stdout.write(f"{line}\n")
    if not found:
        sys.stdout.write(f"{args.root}: every part matches its record; no duplicate keys; prompts complete\n")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
