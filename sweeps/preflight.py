"""Everything that can be checked before Ray starts, in one pass: one line and exit code 2 on the first
problem, and nothing written.

    python -c "from sweeps.preflight import preflight; from sweeps.config import SweepConfig; print(preflight(SweepConfig()).cells[:3])"

1. Names and options against the registries (``config.validate``), every method's typed options included.
2. Models: a local checkpoint has a GPT-2 config, weight files, and complete safetensors headers; a hub model
   is cached or the hub is reachable. ``model.device=cuda`` on a driver without CUDA (a local sweep).
3. The results root is writable (a probe file is created and removed; a root made for the probe is removed).
4. ``wandb.mode=online``: an API key is present and the login is verified within a timeout.
5. Size: a task's prompts must fit a worker (``limits.max_prompts``); the prompts are then generated and
   tokenized, the grid expanded, the fingerprints computed and the plan made and checked (``sweeps.plan``).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

from attrpatch.errors import ConfigError, ModelError, ResultsError
from attrpatch.models import checkpoint_files
from attrpatch.results import ResultsRoot
from attrpatch.tasks import PromptBatch
from sweeps.config import SweepConfig, validate
from sweeps.fingerprint import Fingerprints, fingerprints
from sweeps.grid import Cell, ModelEntry, expand, model_entries
from sweeps.plan import task_batches

WANDB_TIMEOUT_S = 15  # a login check that cannot reach the server in this time fails


@dataclass
class Prepared:
    """A checked launch: its models, cells, prompts, fingerprints and root."""

    cfg: SweepConfig
    entries: list[ModelEntry]
    cells: list[Cell]
    batches: dict[str, PromptBatch]
    fingerprints: Fingerprints
    root: ResultsRoot


def check_models(cfg: SweepConfig, entries: list[ModelEntry]) -> None:
    for e in entries:
        try:
            checkpoint_files(e.spec)
        except ModelError as e2:
            if cfg.plan and not (e.spec.embedded or os.path.isdir(e.spec.source)):
                continue  # a plan needs the shape only: a hub model need not be downloaded yet
            raise ConfigError(f"models: {e2}") from None
    if cfg.model.device == "cuda" and cfg.cluster.address is None:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("model.device=cuda but this machine has no usable CUDA device (a local sweep runs "
                              "here): use model.device=auto, or cluster=join to reach machines with GPUs")


def check_root(root: ResultsRoot) -> None:
    """Create and remove a probe file (and the directories made for it) to prove the root is writable."""
    made: list[str] = []
    if root.local:
        path = root.path()
        while path and not os.path.exists(path):
            made.append(path)
            path = os.path.dirname(path)
        if path and not os.path.isdir(path):
            raise ResultsError(f"output.root {root.display()} cannot be created: {path} is a file, not a directory")
    probe = f".probe-{uuid.uuid4().hex[:8]}"
    try:
        root.write_bytes(probe, b"attrpatch write probe")
        root.delete(probe)
    except OSError as e:
        raise ResultsError(f"output.root {root.display()} is not writable ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else 'permission denied'}): choose another "
                           "output.root") from None
    finally:
        for d in made:  # deepest first: leave nothing behind
            try:
                os.rmdir(d)
            except OSError:
                break


def check_wandb(cfg: SweepConfig) -> None:
    if cfg.wandb.mode != "online":
        return
    import wandb

    key = os.environ.get("WANDB_API_KEY") or _netrc_key()
    if not key:
        raise ConfigError("wandb.mode=online but no W&B API key (WANDB_API_KEY or `wandb login`): log in, or use "
                          "wandb=offline and `wandb sync` the runs later")
    try:
        ok = wandb.login(key=key, verify=True, timeout=WANDB_TIMEOUT_S, relogin=True)
    except Exception as e:
        raise ConfigError(f"wandb.mode=online but the W&B login failed ({str(e).splitlines()[0][:120]}): check the "
                          "key and the network, or use wandb=offline and `wandb sync` later") from None
    if not ok:
        raise ConfigError("wandb.mode=online but the W&B login was refused: check the key, or use wandb=offline")


def _netrc_key() -> str | None:
    import netrc

    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (OSError, netrc.NetrcParseError):
        return None
    return auth[2] if auth else None


def preflight(cfg: SweepConfig) -> Prepared:
    """Steps 1–5 of the module docstring (the plan's guard rails run in the driver, which knows the cluster)."""
    validate(cfg)
    entries = model_entries(cfg)
    check_models(cfg, entries)
    root = ResultsRoot(cfg.output.root)
    check_root(root)
    check_wandb(cfg)
    batches = task_batches(cfg)
    cells = expand(cfg, entries, {task: len(b) for task, b in batches.items()})
    return Prepared(cfg, entries, cells, batches, fingerprints(cfg, entries, allow_missing=cfg.plan), root)
