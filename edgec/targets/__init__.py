"""Target profiles as data: what each device computes, how fast, and through which backends.

One TOML file per device in `profiles/`; users add theirs as a .toml path or an `edgec.targets` plugin.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from edgec.errors import UserError
from edgec.plugins import Registry

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

__all__ = [
    "ARCHS",
    "PRECISIONS",
    "TARGETS",
    "UNIT_KINDS",
    "ComputeUnit",
    "Target",
    "get_target",
    "load_target_file",
    "target_names",
]

# Listed widest first; this order is also how precisions are reported.
PRECISIONS = ("fp32", "bf16", "fp16", "int16", "int8", "int4")
UNIT_KINDS = ("cpu", "gpu", "npu")
ARCHS = ("aarch64", "x86_64")
PROFILES_DIR = Path(__file__).parent / "profiles"
_KEBAB = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")


def _positive(value: Any) -> bool:
    # bool is an int in Python; `fp32 = true` in a profile is a mistake, not 1 op/s.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _one_of(values: Iterable[str]) -> str:
    return f"choose one of: {', '.join(values)}"


def _is_onnx_op(op_type: str) -> bool:
    import onnx.defs  # deferred: only validation and op queries need the schema registry

    return onnx.defs.has(op_type)


@dataclass(frozen=True)
class ComputeUnit:
    """One processor of a target (CPU cluster, GPU, NPU) as the backends can use it.

    `peak_ops` maps precision -> peak ops/s; a precision absent there is unsupported on the unit, and
    `precisions` is derived from it when not given. `ops=None` means any standard ONNX op (a CPU
    unit, reached through onnxruntime, whose CPU kernels cover the default domain).
    """

    name: str
    kind: str
    description: str
    # Excluded from the hash so that units and targets stay hashable (usable as cache keys).
    peak_ops: dict[str, float] = field(hash=False)
    precisions: tuple[str, ...] = ()
    ops: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        where = f"unit {self.name!r}"
        if not isinstance(self.name, str) or not _KEBAB.fullmatch(self.name):
            raise UserError(f"unit name {self.name!r} is not kebab-case", "use e.g. 'cpu', 'npu'")
        if self.kind not in UNIT_KINDS:
            raise UserError(f"{where}: kind {self.kind!r} is unknown", _one_of(UNIT_KINDS))
        if not isinstance(self.peak_ops, dict) or not self.peak_ops:
            raise UserError(f"{where}: peak_ops is empty", "give the peak ops/s for at least one precision")
        for precision, peak in self.peak_ops.items():
            if precision not in PRECISIONS:
                raise UserError(f"{where}: peak_ops.{precision} is not a known precision", _one_of(PRECISIONS))
            if not _positive(peak):
                raise UserError(f"{where}: peak_ops.{precision} must be a positive number of ops/s, got {peak!r}")
        derived = tuple(p for p in PRECISIONS if p in self.peak_ops)
        if self.precisions and set(self.precisions) != set(derived):
            raise UserError(
                f"{where}: precisions {list(self.precisions)} disagree with peak_ops keys {list(derived)}",
                "a precision is supported exactly when it has a peak in peak_ops",
            )
        object.__setattr__(self, "peak_ops", {p: float(self.peak_ops[p]) for p in derived})
        object.__setattr__(self, "precisions", derived)
        if self.ops is not None:
            ops = tuple(self.ops)
            unknown = [op for op in ops if not _is_onnx_op(op)]
            if unknown:
                raise UserError(
                    f"{where}: ops lists {', '.join(unknown)}, not ONNX operators",
                    "check the spelling (ONNX op types are CamelCase)",
                )
            object.__setattr__(self, "ops", ops)

    def supports_op(self, op_type: str) -> bool:
        return op_type in self.ops if self.ops is not None else _is_onnx_op(op_type)


@dataclass(frozen=True)
class Target:
    """A device edgec compiles for. Peaks are upper bounds for roofline estimates, not measurements."""

    name: str
    description: str
    arch: str
    units: tuple[ComputeUnit, ...]
    memory_bandwidth: float  # bytes/s, shared by all units
    memory_size: int  # bytes
    backends: tuple[str, ...]  # in order of preference
    default_pipeline: str
    cpu_features: tuple[str, ...] = ()
    # The chip's part number where vendors' ahead-of-time NPU compilers name it (Qualcomm's "SM8650").
    soc: str = ""
    source_path: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        where = f"target {self.name!r}"
        if not isinstance(self.name, str) or not _KEBAB.fullmatch(self.name):
            raise UserError(f"target name {self.name!r} is not kebab-case", "use e.g. 'my-board'")
        if self.arch not in ARCHS:
            raise UserError(f"{where}: arch {self.arch!r} is unknown", _one_of(ARCHS))
        units = tuple(self.units)
        if not units or not all(isinstance(u, ComputeUnit) for u in units):
            raise UserError(f"{where}: units must be a non-empty list of compute units")
        names = [u.name for u in units]
        if len(set(names)) != len(names):
            raise UserError(f"{where}: unit names repeat ({', '.join(names)})", "give each unit its own name")
        if not _positive(self.memory_bandwidth):
            raise UserError(f"{where}: memory_bandwidth must be a positive number (bytes/s), got {self.memory_bandwidth!r}")
        if not (_positive(self.memory_size) and isinstance(self.memory_size, int)):
            raise UserError(f"{where}: memory_size must be a positive whole number (bytes), got {self.memory_size!r}")
        backends = tuple(self.backends)
        if not backends or not all(isinstance(b, str) and b for b in backends):
            raise UserError(f"{where}: backends must be a non-empty list of backend names")
        if not isinstance(self.default_pipeline, str) or not self.default_pipeline.strip():
            raise UserError(f"{where}: default_pipeline is empty", "give a pass pipeline, e.g. \"cleanup\"")
        object.__setattr__(self, "units", units)
        object.__setattr__(self, "backends", backends)
        object.__setattr__(self, "cpu_features", tuple(self.cpu_features))
        object.__setattr__(self, "memory_bandwidth", float(self.memory_bandwidth))

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(p for p in PRECISIONS if any(p in u.peak_ops for u in self.units))

    def unit(self, name: str) -> ComputeUnit:
        for u in self.units:
            if u.name == name:
                return u
        raise UserError(f"target {self.name!r} has no unit {name!r}", _one_of(u.name for u in self.units))

    def unsupported_ops(self, op_types: Iterable[str]) -> dict[str, tuple[str, ...]]:
        """Ops that no unit can run, each with one "unit: reason" per unit.

        An op that only some units run is supported: partitioning places it on one that does.
        """
        def why(unit: ComputeUnit) -> str:
            reason = "not a standard ONNX operator" if unit.ops is None else "not in the ops this unit runs"
            return f"{unit.name}: {reason}"

        ops = dict.fromkeys(op_types)  # dedupe, keep first-seen order
        return {op: tuple(map(why, self.units)) for op in ops if not any(u.supports_op(op) for u in self.units)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "arch": self.arch,
            "memory_bandwidth": self.memory_bandwidth,
            "memory_size": self.memory_size,
            "backends": list(self.backends),
            "default_pipeline": self.default_pipeline,
            "precisions": list(self.precisions),
            "cpu_features": list(self.cpu_features),
            "soc": self.soc,
            "source_path": self.source_path,
            "units": [
                {
                    "name": u.name,
                    "kind": u.kind,
                    "description": u.description,
                    "peak_ops": dict(u.peak_ops),
                    "precisions": list(u.precisions),
                    "ops": None if u.ops is None else list(u.ops),
                }
                for u in self.units
            ],
        }


# --- loading TOML profiles -------------------------------------------------------------------

_EXAMPLE = "see the profiles shipped in edgec/targets/profiles/ for a complete example"
_TYPE_WORDS = {str: "a string", int: "a whole number", (int, float): "a number", list: "a list", dict: "a table"}


def _take(table: dict, key: str, types: type | tuple, where: str, required: bool = True) -> Any:
    """table[key] checked against `types`; `where` is the dotted key path of `table` in the file."""
    path = f"{where}.{key}" if where else key
    if key not in table:
        if required:
            raise UserError(f"missing key {path!r}", f"add it; {_EXAMPLE}")
        return None
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, types):
        raise UserError(f"key {path!r} must be {_TYPE_WORDS[types]}, got {value!r}", _EXAMPLE)
    return value


def _strings(table: dict, key: str, where: str, required: bool = True) -> tuple[str, ...] | None:
    value = _take(table, key, list, where, required)
    if value is not None and not all(isinstance(v, str) for v in value):
        path = f"{where}.{key}" if where else key
        raise UserError(f"key {path!r} must be a list of strings, got {value!r}", _EXAMPLE)
    return None if value is None else tuple(value)


def _reject_unknown(table: dict, allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        path = f"{where}.{unknown[0]}" if where else unknown[0]
        raise UserError(f"unknown key {path!r}", _one_of(sorted(allowed)))


_TARGET_KEYS = ("name", "description", "arch", "backends", "default_pipeline", "cpu_features", "memory_bandwidth",
                "memory_size", "soc", "units")
_UNIT_KEYS = ("name", "kind", "description", "peak_ops", "ops")


def _unit_from_table(table: Any, where: str) -> ComputeUnit:
    if not isinstance(table, dict):
        raise UserError(f"{where} must be a table (write each unit as [[units]])", _EXAMPLE)
    _reject_unknown(table, _UNIT_KEYS, where)
    peak_ops = _take(table, "peak_ops", dict, where)
    for precision in peak_ops:
        _take(peak_ops, precision, (int, float), f"{where}.peak_ops")
    return ComputeUnit(
        name=_take(table, "name", str, where),
        kind=_take(table, "kind", str, where),
        description=_take(table, "description", str, where),
        peak_ops=peak_ops,
        ops=_strings(table, "ops", where, required=False),
    )


def _target_from_table(data: dict, source_path: str | None) -> Target:
    _reject_unknown(data, _TARGET_KEYS, "")
    units = _take(data, "units", list, "")
    return Target(
        name=_take(data, "name", str, ""),
        description=_take(data, "description", str, ""),
        arch=_take(data, "arch", str, ""),
        units=tuple(_unit_from_table(u, f"units[{i}]") for i, u in enumerate(units)),
        memory_bandwidth=_take(data, "memory_bandwidth", (int, float), ""),
        memory_size=_take(data, "memory_size", int, ""),
        backends=_strings(data, "backends", ""),
        default_pipeline=_take(data, "default_pipeline", str, ""),
        cpu_features=_strings(data, "cpu_features", "", required=False) or (),
        soc=_take(data, "soc", str, "", required=False) or "",
        source_path=source_path,
    )


def load_target_file(path: str | os.PathLike) -> Target:
    """A profile from a TOML file; any problem is a UserError naming the file (and key)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"target file {str(path)!r} not found", "check the path") from None
    except OSError as exc:
        raise UserError(f"cannot read target file {str(path)!r}: {exc.strerror}", "check the path") from None
    try:
        data = tomllib.loads(text)
        return _target_from_table(data, str(path))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML: {exc}", "fix the syntax there") from None
    except UserError as exc:
        raise UserError(f"{path}: {exc.problem}", exc.fix) from None


# --- the registry ----------------------------------------------------------------------------


def _builtin_targets() -> dict[str, Target]:
    return {t.name: t for t in map(load_target_file, sorted(PROFILES_DIR.glob("*.toml")))}


def _as_target(item: Any, name: str, origin: str) -> Target:
    """A plugin's entry point may give a Target, a path to a TOML profile, or a callable returning either."""
    if not isinstance(item, (Target, str, os.PathLike)) and callable(item):
        try:
            item = item()
        except UserError:
            raise
        except Exception as exc:  # name the plugin, as Registry does for a failed import
            problem = f"target plugin {origin} failed: {type(exc).__name__}: {exc}"
            raise UserError(problem, "fix or uninstall that package") from exc
    if isinstance(item, (str, os.PathLike)):
        item = load_target_file(item)
    if not isinstance(item, Target):
        raise UserError(
            f"target plugin {origin} gave a {type(item).__name__}, not a Target",
            "point the entry point at a Target, a function returning one, or a path to a .toml profile",
        )
    if item.name != name:
        problem = f"target plugin {origin} is registered as {name!r} but its target is named {item.name!r}"
        raise UserError(problem, "give both the same name")
    return item


class _TargetRegistry(Registry[Target]):
    def register(self, name: str, item: Any, origin: str = "edgec") -> Target:
        return super().register(name, _as_target(item, name, origin), origin)


TARGETS: Registry[Target] = _TargetRegistry("target", "edgec.targets", _builtin_targets)
"""All known targets by name: built-in profiles, then `edgec.targets` plugins (loaded on first need)."""


def get_target(name: str | os.PathLike | Target) -> Target:
    """A target by registered name, or loaded from a path ending in .toml."""
    if isinstance(name, Target):
        return name
    if isinstance(name, os.PathLike) or str(name).endswith(".toml"):
        return load_target_file(name)
    if name not in TARGETS:
        names = TARGETS.names()
        raise UserError(f"unknown target {name!r}", f"{_one_of(names)}, or give a path to a .toml profile")
    return TARGETS.get(name)


def target_names() -> list[str]:
    return TARGETS.names()
