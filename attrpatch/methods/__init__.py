"""One signature, one registry: every method is ``fn(model, batch, cfg) -> MethodResult``.

    python -c "from attrpatch.methods import METHODS, load_builtin_methods; load_builtin_methods(); print(sorted(METHODS))"

A method module opens with its algorithm in numbered steps and registers itself with ``@register``;
registering a name twice raises. Options shared by every method live in ``MethodConfig``; a method's own
options are a frozen dataclass (``Options`` subclass, ``Literal`` fields for names) registered with it, so
``method_config(name, **fields)`` rejects an unknown field, a bad name or a bad value before any work.
``run_method(name, model, batch, cfg)`` is what the sweep calls. Shared machinery is in
``attrpatch.methods.core``; methods import it and this registry, never each other.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from attrpatch.components import DIRECTIONS
from attrpatch.errors import ConfigError
from attrpatch.models import LoadedModel
from attrpatch.scores import MethodResult
from attrpatch.tasks import PromptBatch


class MethodError(ConfigError):
    """An unknown method or an option it cannot take; the message says how to fix it."""


@dataclass(frozen=True)
class Options:
    """Base of every method's own options: ``Literal`` fields (and tuples of them) are checked on creation."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            if isinstance(value, list):
                object.__setattr__(self, f.name, value := tuple(value))
            allowed = _literal_values(hint)
            if allowed is None:
                continue
            values = value if isinstance(value, tuple) else (value,)
            bad = [v for v in values if v not in allowed]
            if bad:
                raise MethodError(f"{type(self).__name__}.{f.name}: {bad} not allowed; use "
                                  f"{' / '.join(map(repr, allowed))}")


def _literal_values(hint) -> tuple | None:
    """The allowed values of ``Literal[...]``, ``tuple[Literal[...], ...]`` or ``... | None`` of them."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return typing.get_args(hint)
    for arg in typing.get_args(hint):
        if arg is not type(None) and (found := _literal_values(arg)) is not None:
            return found
    return None


@dataclass(frozen=True)
class NoOptions(Options):
    """A method with no options of its own."""


@dataclass(frozen=True)
class MethodConfig:
    """Options shared by the methods (each reads the ones it documents) and the method's own ``options``."""

    directions: tuple[Literal["denoise", "noise"], ...] = ("denoise",)  # denoise = TL `patching`'s direction
    kinds: tuple[str, ...] | None = None  # node kinds to score; None = every kind the method supports
    per_prompt: bool = True  # one row per prompt; False = mean over the shard (prompt null, n_prompts = N)
    per_position: bool = True  # keep the pos axis; False = summed over positions (pos null)
    max_rows: int = 256  # rows per pass at most (patched copies, prompts): with the memory budget, bounds memory
    seed: int = 0  # random choices inside a method (edge subset sampling)
    options: Any = None  # the method's own Options dataclass; None = its defaults (run_method fills it in)

    def __post_init__(self) -> None:
        for name in ("directions", "kinds"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        bad = [d for d in self.directions if d not in DIRECTIONS]
        if bad or not self.directions or len(set(self.directions)) != len(self.directions):
            raise MethodError(f"directions must be a non-empty subset of {list(DIRECTIONS)}, got {list(self.directions)}")
        if self.max_rows < 1:
            raise MethodError(f"max_rows must be at least 1, got {self.max_rows}")


SHARED_FIELDS = tuple(f.name for f in dataclasses.fields(MethodConfig) if f.name != "options")
MethodFn = Callable[[LoadedModel, PromptBatch, MethodConfig], MethodResult]


@dataclass(frozen=True)
class MethodInfo:
    name: str
    fn: MethodFn
    produces: str  # "nodes", "edges", "both" or "tables" (extra Parquet tables, e.g. faithfulness)
    exact: bool  # True for ground-truth interventions (activation / edge patching)
    summary: str
    options: type[Options]  # the method's own options
    kinds: tuple[str, ...] | None  # node kinds it can score (cfg.kinds is checked against them); None: not read
    directions: tuple[str, ...] | None  # the direction labels it writes; None: cfg.directions
    cost: Callable | None = field(default=None, compare=False)  # (shape, lengths, cfg) -> core.Cost, for plans


METHODS: dict[str, MethodInfo] = {}


def register(name: str, produces: str, exact: bool = False, options: type[Options] = NoOptions,
             kinds: tuple[str, ...] | None = None, directions: tuple[str, ...] | None = None,
             ) -> Callable[[MethodFn], MethodFn]:
    """Register a method under ``name``; registering a name twice raises.

    ``produces`` says which parts of the ``MethodResult`` it fills: ``"nodes"``, ``"edges"``, ``"both"``, or
    ``"tables"`` (named extra tables such as faithfulness curves, written beside nodes and edges).
    ``exact`` marks a ground-truth intervention (activation or edge patching) that approximations are
    compared against. ``options`` is its own options dataclass; ``kinds`` the node kinds it can score;
    ``directions`` the fixed direction label(s) it writes when it does not read ``cfg.directions``
    (e.g. ``("clean",)`` for DLA)."""
    if produces not in ("nodes", "edges", "both", "tables"):
        raise ValueError(f"method {name!r}: produces must be nodes, edges, both or tables, got {produces!r}")
    if not (isinstance(options, type) and issubclass(options, Options)):
        raise ValueError(f"method {name!r}: options must be a subclass of attrpatch.methods.Options")

    def wrap(fn: MethodFn) -> MethodFn:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        summary = (fn.__doc__ or "").strip().split("\n")[0]
        METHODS[name] = MethodInfo(name, fn, produces, exact, summary, options, kinds, directions)
        return fn

    return wrap


def register_cost(name: str) -> Callable:
    """Attach the cost model (``fn(shape, lengths, cfg) -> core.Cost``) of a registered method."""

    def wrap(fn: Callable) -> Callable:
        METHODS[name] = dataclasses.replace(METHODS[name], cost=fn)
        return fn

    return wrap


def load_builtin_methods() -> None:
    """Import the method modules (registration happens on import; nothing else is done at import)."""
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "core":
            importlib.import_module(f"{__name__}.{mod.name}")


def get_method(name: str) -> MethodInfo:
    load_builtin_methods()
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}: use one of {sorted(METHODS)}")
    return METHODS[name]


def method_config(name: str, **fields) -> MethodConfig:
    """A checked ``MethodConfig`` for method ``name`` from flat fields: the shared ones (``SHARED_FIELDS``)
    and the method's own options. An unknown field, a bad name or a bad value raises ``MethodError``."""
    info = get_method(name)
    own = {f.name for f in dataclasses.fields(info.options)}
    unknown = sorted(set(fields) - set(SHARED_FIELDS) - own)
    if unknown:
        mine = f"its own options are {sorted(own)}" if own else "it has no options of its own"
        raise MethodError(f"method {name!r} takes no option {unknown}: {mine}; shared options are {list(SHARED_FIELDS)}")
    try:
        opts = info.options(**{k: v for k, v in fields.items() if k in own})
        cfg = MethodConfig(**{k: v for k, v in fields.items() if k in SHARED_FIELDS}, options=opts)
    except TypeError as e:
        raise MethodError(f"method {name!r}: {e}") from None
    return check_config(info, cfg)


def check_config(info: MethodInfo, cfg: MethodConfig) -> MethodConfig:
    """``cfg`` with the method's default options filled in, its kinds and options checked."""
    if cfg.options is None:
        cfg = dataclasses.replace(cfg, options=info.options())
    if not isinstance(cfg.options, info.options):
        raise MethodError(f"method {info.name!r} takes {info.options.__name__} as options, got "
                          f"{type(cfg.options).__name__}")
    if cfg.kinds is not None:
        allowed = info.kinds or ()
        bad = [k for k in cfg.kinds if k not in allowed]
        if bad or not cfg.kinds:
            what = f"the kinds {list(allowed)}" if allowed else "no node kinds (leave kinds unset)"
            raise MethodError(f"method {info.name!r} scores {what}; got kinds={list(cfg.kinds)}")
    check = getattr(cfg.options, "check", None)
    if check is not None:
        check(cfg)
    return cfg


def run_method(name: str, model: LoadedModel, batch: PromptBatch, cfg: MethodConfig | None = None) -> MethodResult:
    """Run a registered method on a batch."""
    info = get_method(name)
    return info.fn(model, batch, check_config(info, cfg or MethodConfig()))
