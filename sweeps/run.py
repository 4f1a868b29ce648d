"""The sweep's entry point (Hydra): one command for models × tasks × methods × prompt shards.

    python -m sweeps.run                                                   # the default sweep (README)
    python -m sweeps.run models=[ioi-tiny,gpt2-small] methods=[attribution,activation,edge_attribution]
    python -m sweeps.run -m task=ioi,pronoun name=two-tasks               # Hydra multirun: one job each
    python -m sweeps.run --cfg job                                         # print the resolved config

Before Hydra runs anything, every job's overrides are composed against the structured schema, converted
once to the frozen ``SweepConfig`` and checked against the model / task / method registries: a typo or a
bad value ends the command with one line naming it (exit code 2), before Ray starts; so does every other
``AttrpatchError`` (a checkpoint, the results root, a failed cell: one line, the traceback only in the log
file ``results/.hydra/<name>/<time>/run.log``). Ctrl-C or SIGTERM stops the workers and deletes temporary
files (exit code 130 / 143, manifest ``interrupted``); the same command resumes.
"""

from __future__ import annotations

import difflib
import logging
import signal
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from attrpatch.errors import AttrpatchError
from sweeps.config import SweepConfig, from_dictconfig, register_schema, validate

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("sweeps")


def _hydra_job(cfg: DictConfig) -> None:
    """One Hydra job: convert the config once, run the sweep, print the summary table and the paths."""
    from rich.console import Console

    from sweeps.driver import run_sweep
    from sweeps.summary import render

    console = Console(width=None if sys.stdout.isatty() else 160)  # a log file gets the full table
    try:
        sweep = from_dictconfig(cfg)
        report = run_sweep(sweep, console)
    except AttrpatchError as e:
        log.debug("the error in full", exc_info=True)  # the log file only
        sys.stderr.write(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}\n")
        raise SystemExit(2) from None
    except KeyboardInterrupt as e:
        log.error("interrupted: finished part files are kept and no partial file remains; "
                  "run the same command again to resume")
        raise SystemExit(143 if isinstance(e, Terminated) or _sigterm["seen"] else 130) from None
    if not sweep.plan:
        render(report, console)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (a scheduler's stop or `kill`)."""


_sigterm = {"seen": False}  # a library may turn our exception into a plain KeyboardInterrupt on its way up


def _on_sigterm(signum, frame) -> None:
    _sigterm["seen"] = True
    raise Terminated()


hydra_main = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(_hydra_job)


def _job_overrides(args: list[str]) -> list[list[str]] | None:
    """The overrides of every job this command would run (multirun sweeps expanded), or None when the
    arguments are Hydra flags we leave to Hydra (--help, --cfg, …)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    multirun = any(a in ("-m", "--multirun") for a in args)
    rest = [a for a in args if a not in ("-m", "--multirun")]
    if any(a.startswith("-") for a in rest):
        return None
    rest = [a for a in rest if not a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    if not multirun:
        return [rest]
    parsed = OverridesParser.create().parse_overrides(rest)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def check(overrides: list[str]) -> SweepConfig:
    """Compose, convert and validate one job's config (no Ray, no model loads)."""
    from hydra import compose, initialize_config_dir

    register_schema()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    sweep = from_dictconfig(cfg)
    validate(sweep)
    return sweep


def one_line(e: BaseException) -> str:
    """A config error as one line: Hydra's / OmegaConf's message, the key, and a close match if any."""
    from hydra.errors import MissingConfigException

    for x in _chain(e):
        if isinstance(x, MissingConfigException) and x.options:
            return f"{str(x).splitlines()[0].rstrip('.')}: use one of {', '.join(sorted(x.options))}"
    parts, seen = [], set()
    cur: BaseException | None = e
    while cur is not None:
        for line in str(cur).splitlines():
            line = line.strip()
            if line and line not in seen and "$VALUE" not in line and not line.startswith(
                    ("object_type=", "reference_type=", "full_key:", "To append to your config")):
                seen.add(line)
                parts.append(line.rstrip("."))
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
    text = ": ".join(parts) or type(e).__name__
    full_key = next((k for k in (getattr(x, "full_key", None) for x in _chain(e)) if k), None)
    if full_key and ("not in struct" in text or "not in '" in text):
        hint = _did_you_mean(str(full_key))
        if hint:
            text += f" (did you mean {hint}?)"
    return text


def _chain(e: BaseException):
    while e is not None:
        yield e
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)


def _did_you_mean(full_key: str) -> str | None:
    from omegaconf import OmegaConf

    from sweeps.config import schema_node

    parent, _, leaf = full_key.rpartition(".")
    node = schema_node()
    node = OmegaConf.select(node, parent) if parent else node
    if node is None or not hasattr(node, "keys"):
        return None
    close = difflib.get_close_matches(leaf, [str(k) for k in node.keys()], n=1)
    return f"{parent + '.' if parent else ''}{close[0]}" if close else None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else argv
    register_schema()
    try:
        jobs = _job_overrides(argv)
        for overrides in jobs or []:
            check(overrides)
    except Exception as e:  # Hydra, OmegaConf and our own config errors: one line, no traceback
        sys.stderr.write(f"error: {one_line(e)}\n")
        return 2
    sys.argv = [sys.argv[0], *argv]
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        hydra_main()
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
