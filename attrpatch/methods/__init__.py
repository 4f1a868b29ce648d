"""One signature, one registry: every method is ``fn(model, batch, cfg) -> MethodResult``.

    python -c "from attrpatch.methods import METHODS, load_builtin_methods; load_builtin_methods(); print(sorted(METHODS))"

A method module opens with its algorithm in numbered steps and registers itself with ``@register``;
registering a name twice raises. ``run_method(name, model, batch, cfg)`` is what the sweep calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from attrpatch.components import DIRECTIONS
from attrpatch.errors import AttrpatchError
from attrpatch.models import LoadedModel
from attrpatch.scores import MethodResult
from attrpatch.tasks import PromptBatch


class MethodError(AttrpatchError):
    """An unknown method or an option it cannot take; the message says how to fix it."""


@dataclass(frozen=True)
class MethodConfig:
    """Options shared by the methods; each method reads the ones it documents."""

    directions: tuple[str, ...] = ("denoise",)  # denoise = the TL `patching` direction; add "noise" for S1
    kinds: tuple[str, ...] | None = None  # node kinds to score; None = every kind the method supports
    per_prompt: bool = True  # one row per prompt; False = mean over the shard (prompt null, n_prompts = N)
    per_position: bool = True  # keep the pos axis; False = summed over positions (pos null)
    ig_steps: int = 5  # EAP-IG interpolation steps (Hanna et al. use 5 on IOI)
    max_rows: int = 256  # patched copies per forward: bounds memory of activation/edge patching
    edge_subset: float | None = None  # exact edge patching: fraction of edges (top by EAP + random); None = all
    seed: int = 0  # random choices inside a method (edge subset sampling)
    extra: dict = field(default_factory=dict, hash=False)  # method-specific options, documented per method

    def __post_init__(self) -> None:
        bad = [d for d in self.directions if d not in DIRECTIONS]
        if bad or not self.directions:
            raise MethodError(f"directions must be a non-empty subset of {list(DIRECTIONS)}, got {list(self.directions)}")
        if self.ig_steps < 1:
            raise MethodError(f"ig_steps must be at least 1, got {self.ig_steps}")
        if self.max_rows < 1:
            raise MethodError(f"max_rows must be at least 1, got {self.max_rows}")
        if self.edge_subset is not None and not 0 < self.edge_subset <= 1:
            raise MethodError(f"edge_subset must be in (0, 1] or None, got {self.edge_subset}")


MethodFn = Callable[[LoadedModel, PromptBatch, MethodConfig], MethodResult]


@dataclass(frozen=True)
class MethodInfo:
    name: str
    fn: MethodFn
    produces: str  # "nodes", "edges", "both" or "tables" (extra Parquet tables, e.g. faithfulness)
    exact: bool  # True for ground-truth interventions (activation / edge patching)
    summary: str


METHODS: dict[str, MethodInfo] = {}


def register(name: str, produces: str, exact: bool = False) -> Callable[[MethodFn], MethodFn]:
    """Register a method under ``name``; registering a name twice raises.

    ``produces`` says which parts of the ``MethodResult`` it fills: ``"nodes"``, ``"edges"``, ``"both"``, or
    ``"tables"`` (named extra tables such as faithfulness curves, written beside nodes and edges).
    ``exact`` marks a ground-truth intervention (activation or edge patching) that approximations are
    compared against."""
    if produces not in ("nodes", "edges", "both", "tables"):
        raise ValueError(f"method {name!r}: produces must be nodes, edges, both or tables, got {produces!r}")

    def wrap(fn: MethodFn) -> MethodFn:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        METHODS[name] = MethodInfo(name, fn, produces, exact, (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return wrap


def load_builtin_methods() -> None:
    """Import the method modules (registration happens on import; nothing else is done at import)."""
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")


def get_method(name: str) -> MethodInfo:
    load_builtin_methods()
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}: use one of {sorted(METHODS)}")
    return METHODS[name]


def run_method(name: str, model: LoadedModel, batch: PromptBatch, cfg: MethodConfig | None = None) -> MethodResult:
    """Run a registered method on a batch."""
    return get_method(name).fn(model, batch, cfg or MethodConfig())
