"""What determines a cell's scores, hashed: the fingerprint in every completion record and in the manifest.

    python -c "from sweeps.fingerprint import versions; print(versions())"

A cell's fingerprint is the SHA-256 of a canonical JSON of its *options*:

* ``model``: the source (registered name or directory), a SHA-256 of its weight files (cached per file by
  path, size and modification time, so a relaunch does not re-read gigabytes), and the dtype;
* ``task``: the task name and every prompt option (count, seed, corruption with its default resolved, split,
  shard size);
* ``method`` (method cells only): the resolved ``MethodConfig`` with the method's own options, except
  ``max_rows``, which only sets the chunk size (the tests show chunking changes no score);
* ``versions``: the packages that compute scores (attrpatch, torch, transformers, transformer-lens).

What does not touch scores — W&B, progress, cluster, workers, device — is not in it and may change freely
between launches (scores agree across devices up to float rounding).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
from pathlib import Path

from attrpatch.errors import ModelError
from attrpatch.models import checkpoint_files
from attrpatch.tasks import CORRUPTIONS, _load_builtin_tasks
from sweeps.config import SweepConfig
from sweeps.grid import ModelEntry

SCORING_PACKAGES = ("attrpatch", "torch", "transformers", "transformer-lens")
_CACHE = Path(os.environ.get("ATTRPATCH_CACHE", Path.home() / ".cache" / "attrpatch")) / "file-hashes.json"


def versions(packages: tuple[str, ...] = SCORING_PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``packages`` (None: not installed)."""
    out = {}
    for pkg in packages:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, cached by (path, size, mtime) in ``~/.cache/attrpatch/file-hashes.json``."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        cache = json.loads(_CACHE.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    cache[key] = h.hexdigest()
    try:
        _CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = _CACHE.with_name(f"{_CACHE.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        tmp.replace(_CACHE)
    except OSError:  # a read-only home: hash again next time
        pass
    return cache[key]


def model_options(entry: ModelEntry, dtype: str, allow_missing: bool = False) -> dict:
    """The model part: source, weights hash (None for a hub model not yet downloaded), dtype."""
    try:
        files = checkpoint_files(entry.spec)
    except ModelError:
        if not allow_missing:
            raise
        files = []
    digest = None
    if files:
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0" + file_sha256(f).encode())
        digest = h.hexdigest()
    return {"source": entry.source, "weights_sha256": digest, "dtype": dtype}


def task_options(cfg: SweepConfig, task: str) -> dict:
    _load_builtin_tasks()
    t = cfg.task
    return {"name": task, "n_prompts": t.n_prompts, "seed": t.seed,
            "corruption": t.corruption or CORRUPTIONS[task][0], "split": t.split, "shard_size": t.shard_size}


def method_options(cfg: SweepConfig, method: str) -> dict:
    mc = cfg.method.for_method(method)
    out = {f.name: getattr(mc, f.name) for f in dataclasses.fields(mc) if f.name not in ("max_rows", "options")}
    out["options"] = dataclasses.asdict(mc.options)
    return {"name": method, **json.loads(json.dumps(out, default=list))}


def digest(options: dict) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def changed_keys(old: dict | None, new: dict) -> list[str]:
    """The dotted option keys whose values differ, as ``key old → new`` (all of ``new`` when ``old`` is None)."""
    if old is None:
        return ["(no fingerprint: written by an older attrpatch)"]
    a, b = flatten(old), flatten(new)
    return [f"{k} {a.get(k)!r} → {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


@dataclasses.dataclass(frozen=True)
class Fingerprints:
    """The options of every (model, task, method) of a launch; ``cell(model, task, method)`` → (options, sha)."""

    models: dict[str, dict]
    tasks: dict[str, dict]
    methods: dict[str, dict]
    versions: dict[str, str | None]

    def options(self, model: str, task: str, method: str | None) -> dict:
        out = {"model": self.models[model], "task": self.tasks[task], "versions": self.versions}
        if method is not None:
            out["method"] = self.methods[method]
        return out

    def of(self, model: str, task: str, method: str | None) -> str:
        return digest(self.options(model, task, method))


def fingerprints(cfg: SweepConfig, entries: list[ModelEntry], allow_missing: bool = False) -> Fingerprints:
    return Fingerprints(
        models={e.name: model_options(e, cfg.model.dtype, allow_missing) for e in entries},
        tasks={t: task_options(cfg, t) for t in cfg.tasks},
        methods={m: method_options(cfg, m) for m in cfg.methods},
        versions=versions(),
    )
