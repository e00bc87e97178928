"""The pass contract: Pass, its options, PassResult and the PassContext a pass runs in."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_ir as ir

from edgec.errors import UserError

if typing.TYPE_CHECKING:
    from edgec.analysis import AnalysisCache
    from edgec.targets import Target


@dataclass
class NoOptions:
    """For passes that take no options."""


@dataclass
class PassResult:
    model: ir.Model
    modified: bool
    stats: dict[str, int | float] = field(default_factory=dict)


class DebugCounter:
    """Stops passes after N rewrites, so a numeric regression can be bisected down to one rewrite.

    Limits come from `--debug-counter fold-constants=3,cse=0`; a pass asks `allow(self.name)` before
    each rewrite and skips the rewrite when the answer is False.
    """

    def __init__(self, limits: dict[str, int] | None = None):
        self.limits = dict(limits or {})
        self.seen: dict[str, int] = {}

    @classmethod
    def parse(cls, text: str | None) -> "DebugCounter":
        limits: dict[str, int] = {}
        for item in filter(None, (text or "").split(",")):
            name, sep, count = item.partition("=")
            if not sep or not count.strip().isdigit():
                raise UserError(f"bad debug counter {item!r}", "write it as PASS=N, e.g. fold-constants=3")
            limits[name.strip()] = int(count)
        return cls(limits)

    def allow(self, pass_name: str) -> bool:
        n = self.seen.get(pass_name, 0)
        self.seen[pass_name] = n + 1
        limit = self.limits.get(pass_name)
        return limit is None or n < limit


@dataclass
class PassContext:
    """What a pass may consult: the target (explicit, never global), compile options, the analysis
    cache, the debug counter, and the instruments that wrap each pass."""

    target: "Target | None" = None
    options: dict[str, Any] = field(default_factory=dict)
    analyses: "AnalysisCache | None" = None
    counter: DebugCounter = field(default_factory=DebugCounter)
    instruments: list[Any] = field(default_factory=list)

    def __post_init__(self):
        if self.analyses is None:
            from edgec.analysis import AnalysisCache

            self.analyses = AnalysisCache()

    def allow(self, pass_name: str) -> bool:
        return self.counter.allow(pass_name)


class Pass:
    """A graph rewrite with a kebab-case `name` and an `Options` dataclass.

    Subclasses implement `run(model, ctx)`, mutate `model` in place and return
    `PassResult(model, modified, stats)`. `requires` names analyses the pass reads (computed on
    demand through `ctx.analyses`); `preserves` names analyses still valid after a modifying run
    ("*" for all). A second run on its own output must report modified=False.
    """

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    requires: ClassVar[tuple[str, ...]] = ()
    preserves: ClassVar[tuple[str, ...]] = ()
    # True for a pass that changes what the model computes on purpose (sliding-window attention, say):
    # a compile that runs one measures the error on calibration data and refuses what breaks the budget.
    approximate: ClassVar[bool] = False

    def __init__(self, options: Any = None, **kwargs: Any):
        if options is None:
            options = make_options(self.Options, kwargs, self.name)
        elif kwargs:
            raise TypeError("pass either an options object or keyword options, not both")
        self.options = options

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __call__(self, model: ir.Model, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx or PassContext()
        result = self.run(model, ctx)
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {self.name} returned {type(result).__name__}, not PassResult")
        if result.modified:  # whoever calls the pass, analyses it did not preserve are stale now
            ctx.analyses.invalidate(self.preserves)
        return result

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def spec(self) -> str:
        """This pass with its non-default options, as pipeline text."""
        changed = []
        default = self.Options()
        for f in dataclasses.fields(self.options):
            value = getattr(self.options, f.name)
            if value != getattr(default, f.name):
                changed.append(f"{f.name}={_format(value)}")
        return f"{self.name}{{{','.join(changed)}}}" if changed else self.name


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ":".join(_format(v) for v in value)
    return str(value)


def make_options(options_cls: type, values: dict[str, Any], pass_name: str) -> Any:
    """Builds an options dataclass from text or Python values; unknown keys and bad values are UserErrors."""
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    hints = typing.get_type_hints(options_cls)
    kwargs = {}
    for key, raw in values.items():
        if key not in fields:
            valid = ", ".join(sorted(fields)) or "none (this pass takes no options)"
            raise UserError(f"pass {pass_name!r} has no option {key!r}", f"valid options: {valid}")
        kwargs[key] = _coerce(raw, hints[key], pass_name, key)
    return options_cls(**kwargs)


def _coerce(raw: Any, hint: Any, pass_name: str, key: str) -> Any:
    if not isinstance(raw, str):
        return raw
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if hint is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
        if origin in (tuple, list):
            item = args[0] if args else str
            items = [_coerce(x, item, pass_name, key) for x in raw.split(":") if x]
            return tuple(items) if origin is tuple else items
        if origin is typing.Literal:
            if raw not in args:
                raise ValueError(raw)
            return raw
    except (ValueError, StopIteration):
        expected = getattr(hint, "__name__", str(hint))
        if origin is typing.Literal:
            expected = "one of " + ", ".join(map(str, args))
        raise UserError(
            f"option {key}={raw!r} of pass {pass_name!r} is not valid", f"expected {expected}"
        ) from None
    return raw
