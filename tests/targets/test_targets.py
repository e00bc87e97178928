"""Target profiles: every shipped profile is valid and sourced; loading, lookup, plugins and the roofline."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import onnx.defs
import pytest

import edgec.plugins
from edgec.errors import UserError
from edgec.targets import (
    PRECISIONS,
    PROFILES_DIR,
    ComputeUnit,
    Target,
    _builtin_targets,
    _TargetRegistry,
    get_target,
    load_target_file,
    target_names,
)
from edgec.targets.cost import best_unit, estimate_model_seconds, estimate_node_seconds

PROFILE_FILES = sorted(PROFILES_DIR.glob("*.toml"))
SHIPPED = ["apple-a17", "jetson-orin-nano", "raspberry-pi-5", "snapdragon-8", "x86-64", "x86-64-avx2"]

# A line that assigns a number (`fp32 = 1.5e11`, `memory_size = 8_589_934_592`).
NUMBER_LINE = re.compile(r"^\s*[A-Za-z0-9_\"-]+\s*=\s*[+-]?(\d|\.\d|inf|nan)")
# What counts as a source: a link, an honest "estimate", or a derivation ending in "= result".
SOURCE = re.compile(r"https?://|\bestimate\b|=")

MINIMAL = """\
name = "my-board"
description = "a test board"
arch = "aarch64"
backends = ["onnxruntime"]
default_pipeline = "cleanup"
memory_bandwidth = 1e10  # test value
memory_size = 1_000_000  # test value

[[units]]
name = "cpu"
kind = "cpu"
description = "one core"
[units.peak_ops]
fp32 = 1e9  # test value
"""


def _write(tmp_path: Path, text: str, name: str = "my-board.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _npu_only(ops: tuple[str, ...]) -> Target:
    npu = ComputeUnit("npu", "npu", "test NPU", {"int8": 1e12, "fp16": 5e11}, ops=ops)
    return Target("npu-board", "test", "aarch64", (npu,), 1e10, 2**30, ("tflite",), "cleanup")


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: p.stem)
def test_profile_loads_and_validates(path: Path) -> None:
    target = load_target_file(path)
    assert target.name == path.stem
    assert target.source_path == str(path)
    assert target.memory_bandwidth > 0 and target.memory_size > 0
    assert target.backends and all(target.backends)
    assert target.default_pipeline.strip()
    assert target.units
    for unit in target.units:
        assert unit.peak_ops and all(peak > 0 for peak in unit.peak_ops.values())
        assert set(unit.precisions) == set(unit.peak_ops) <= set(PRECISIONS)
        if unit.kind == "cpu":
            assert unit.ops is None
        else:  # accelerators must say what they run
            assert unit.ops and all(onnx.defs.has(op) for op in unit.ops)
            assert len(set(unit.ops)) == len(unit.ops)
    assert set(target.precisions) == {p for u in target.units for p in u.precisions}
    json.dumps(target.to_dict())


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: p.stem)
def test_every_number_carries_a_source(path: Path) -> None:
    unsourced = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if NUMBER_LINE.match(line):
            comment = line.split("#", 1)[1] if "#" in line else ""
            if not SOURCE.search(comment):
                unsourced.append(f"{path.name}:{lineno}: {line.strip()}")
    assert not unsourced, "numbers without a source comment:\n" + "\n".join(unsourced)


def test_shipped_targets_are_registered() -> None:
    assert set(SHIPPED) <= set(target_names())
    for name in SHIPPED:
        assert get_target(name).name == name
    assert get_target("snapdragon-8").unit("npu").precisions == ("fp16", "int16", "int8")


def test_unit_lookup() -> None:
    target = get_target("snapdragon-8")
    assert target.unit("gpu").kind == "gpu"
    with pytest.raises(UserError, match="no unit 'tpu'.*cpu, gpu, npu"):
        target.unit("tpu")


def test_unsupported_ops() -> None:
    target = get_target("snapdragon-8")
    # Erf is not on the NPU or GPU, but the CPU runs it, so the target does.
    assert target.unsupported_ops(["MatMul", "Erf", "Softmax"]) == {}
    missing = target.unsupported_ops(["MatMul", "FrobnicateTensor", "FrobnicateTensor"])
    assert list(missing) == ["FrobnicateTensor"]
    assert missing["FrobnicateTensor"] == (
        "cpu: not a standard ONNX operator",
        "gpu: not in the ops this unit runs",
        "npu: not in the ops this unit runs",
    )
    npu_board = _npu_only(("MatMul", "Gelu"))
    assert npu_board.unsupported_ops(["MatMul", "Erf"]) == {"Erf": ("npu: not in the ops this unit runs",)}


def test_unknown_target_lists_names() -> None:
    with pytest.raises(UserError) as info:
        get_target("snapdragon-9")
    message = str(info.value)
    assert "unknown target 'snapdragon-9'" in message
    assert all(name in message for name in SHIPPED)


def test_user_toml_path_loads(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL)
    for ref in (str(path), path):
        target = get_target(ref)
        assert target.name == "my-board"
        assert target.source_path == str(path)
        assert target.unit("cpu").ops is None and target.cpu_features == ()


@pytest.mark.parametrize(
    "drop, key",
    [
        ("memory_bandwidth = 1e10  # test value\n", "memory_bandwidth"),
        ("[units.peak_ops]\nfp32 = 1e9  # test value\n", "units[0].peak_ops"),
    ],
)
def test_missing_key_names_file_and_key(tmp_path: Path, drop: str, key: str) -> None:
    path = _write(tmp_path, MINIMAL.replace(drop, ""))
    with pytest.raises(UserError, match=re.escape(f"{path}: missing key '{key}'")):
        load_target_file(path)


@pytest.mark.parametrize(
    "old, new, message",
    [
        ('arch = "aarch64"', 'arch = "riscv"', "arch 'riscv' is unknown"),
        ('arch = "aarch64"', 'arch = "aarch64"\nbandwidth = 3', "unknown key 'bandwidth'"),
        ("fp32 = 1e9", "fp32 = -1e9", "peak_ops.fp32 must be a positive number"),
        ("fp32 = 1e9", "fp64 = 1e9", "peak_ops.fp64 is not a known precision"),
        ("fp32 = 1e9", 'fp32 = "fast"', "key 'units[0].peak_ops.fp32' must be a number"),
        ('description = "one core"', 'description = "one core"\nops = ["Matmul"]', "ops lists Matmul, not ONNX operators"),
        ('backends = ["onnxruntime"]', "backends = []", "backends must be a non-empty list"),
        ('default_pipeline = "cleanup"', 'default_pipeline = ""', "default_pipeline is empty"),
        ('name = "my-board"', "name = [", "not valid TOML"),
    ],
)
def test_bad_profile_is_a_user_error_naming_the_file(tmp_path: Path, old: str, new: str, message: str) -> None:
    path = _write(tmp_path, MINIMAL.replace(old, new))
    with pytest.raises(UserError) as info:
        load_target_file(path)
    assert str(info.value).startswith(str(path)) and message in str(info.value)


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        get_target(str(tmp_path / "nope.toml"))


def test_precisions_must_match_peak_ops() -> None:
    assert ComputeUnit("cpu", "cpu", "", {"int8": 4.0, "fp32": 1.0}).precisions == ("fp32", "int8")
    with pytest.raises(UserError, match="disagree with peak_ops"):
        ComputeUnit("cpu", "cpu", "", {"fp32": 1.0}, precisions=("fp32", "fp16"))


def test_to_dict_is_json() -> None:
    for name in SHIPPED:
        data = json.loads(json.dumps(get_target(name).to_dict()))
        assert data["name"] == name and data["units"] and data["precisions"]
    assert hash(get_target("x86-64")) == hash(load_target_file(PROFILES_DIR / "x86-64.toml"))


def test_roofline_is_max_of_compute_and_memory() -> None:
    target = get_target("raspberry-pi-5")
    peak, bandwidth = target.unit("cpu").peak_ops["fp32"], target.memory_bandwidth
    compute_bound = estimate_node_seconds(1e12, 1e3, target, "fp32")
    assert compute_bound == pytest.approx(1e12 / peak)
    memory_bound = estimate_node_seconds(1e3, 1e10, target, "fp32")
    assert memory_bound == pytest.approx(1e10 / bandwidth)
    flops, nbytes = 3e9, 2e8
    assert estimate_node_seconds(flops, nbytes, target, "fp32", unit="cpu") == max(flops / peak, nbytes / bandwidth)


def test_roofline_picks_the_fastest_unit() -> None:
    target = get_target("snapdragon-8")
    assert best_unit(target, "int8").name == "npu"
    assert best_unit(target, "fp32").name == "gpu"
    npu_time = estimate_node_seconds(1e12, 0, target, "int8")
    assert npu_time == pytest.approx(1e12 / target.unit("npu").peak_ops["int8"])
    assert estimate_node_seconds(1e12, 0, target, "int8", unit="cpu") > npu_time
    with pytest.raises(UserError, match="does not compute in int16"):
        estimate_node_seconds(1.0, 1.0, target, "int16", unit="gpu")
    with pytest.raises(UserError, match="no unit that computes in bf16"):
        estimate_node_seconds(1.0, 1.0, target, "bf16")


def test_integer_ops_of_a_quantized_model_are_timed_at_the_int8_peak() -> None:
    """A model quantized before edgec saw it (MatMulInteger, QLinearMatMul, ...) is estimated at fp32,
    but its integer ops compute in int8; the float ones, and a target without int8, stay at fp32."""
    from edgec.analysis.cost import ModelCost, NodeCost

    flops = 1e12  # compute-bound on every shipped target
    cost = ModelCost(nodes=[NodeCost("q", "MatMulInteger", flops, 1e3), NodeCost("f", "MatMul", flops, 1e3)])
    target = get_target("raspberry-pi-5")
    peaks = target.unit("cpu").peak_ops
    assert estimate_model_seconds(cost, target, "fp32") == pytest.approx(flops / peaks["int8"] + flops / peaks["fp32"])
    no_int8 = dataclasses.replace(target, units=tuple(
        dataclasses.replace(u, peak_ops={p: v for p, v in u.peak_ops.items() if p != "int8"},
                            precisions=tuple(p for p in u.precisions if p != "int8")) for u in target.units))
    assert "int8" not in no_int8.precisions
    assert estimate_model_seconds(cost, no_int8, "fp32") == pytest.approx(2 * flops / peaks["fp32"])


class _FakeEntryPoint:
    def __init__(self, name: str, item: object):
        self.name, self.value, self.dist, self._item = name, f"fake:{name}", None, item

    def load(self) -> object:
        return self._item


def _registry_with(monkeypatch: pytest.MonkeyPatch, *eps: _FakeEntryPoint) -> _TargetRegistry:
    def entry_points(group: str) -> list[_FakeEntryPoint]:
        return list(eps) if group == "edgec.targets" else []

    monkeypatch.setattr(edgec.plugins.metadata, "entry_points", entry_points)
    return _TargetRegistry("target", "edgec.targets", _builtin_targets)


def test_plugins_may_give_a_target_a_callable_or_a_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    obj = _npu_only(("MatMul",))
    path = _write(tmp_path, MINIMAL)
    made = load_target_file(_write(tmp_path, MINIMAL.replace('"my-board"', '"made-board"'), "made.toml"))
    registry = _registry_with(
        monkeypatch,
        _FakeEntryPoint("npu-board", obj),
        _FakeEntryPoint("made-board", lambda: made),
        _FakeEntryPoint("my-board", str(path)),
    )
    assert registry.get("npu-board") is obj
    assert registry.get("made-board") is made
    assert registry.get("my-board").source_path == str(path)
    assert set(SHIPPED) | {"npu-board", "made-board", "my-board"} == set(registry.names())


@pytest.mark.parametrize(
    "ep, message",
    [
        (_FakeEntryPoint("other-name", _npu_only(("MatMul",))), "calls itself 'npu-board' but is registered as 'other-name'"),
        (_FakeEntryPoint("number", 42), "gave a int, not a Target"),
        (_FakeEntryPoint("x86-64", lambda: get_target("x86-64")), "already registered"),
    ],
)
def test_bad_plugins_are_user_errors(monkeypatch: pytest.MonkeyPatch, ep: _FakeEntryPoint, message: str) -> None:
    registry = _registry_with(monkeypatch, ep)
    with pytest.raises(UserError, match=re.escape(message)):
        registry.names()
