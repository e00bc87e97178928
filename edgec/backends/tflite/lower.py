"""ONNX nodes to TFLite builtin operators: the lowering context, the rule registry and the driver.

Each ONNX op type has one named rule (`rule`): `check` says why a node cannot be lowered (or None),
`lower` emits its TFLite operators. The rules live in the ops_* modules beside this one.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir

from edgec.backends.tflite.writer import MAX_FLATBUFFER_BYTES, FlatModel, Op, tensor_type
from edgec.errors import UserError
from edgec.ir.constants import ONNX_DOMAINS, constant_array, constant_tensor

# A float constant with fewer elements stays float32 in fp16 artifacts: scalars such as a layer
# norm's epsilon (1e-12) or a mask's -3.4e38 do not survive float16, and saving their bytes is moot.
FP16_MIN_ELEMENTS = 16
_FP16_MAX = float(np.finfo(np.float16).max)


# How a rule's outputs are laid out. ONNX images are NCHW, TFLite's image kernels NHWC: "nhwc" rules
# (convolutions, pools, resizes) write NHWC, "follow" rules (elementwise) write NHWC when every input
# computed at run time is NHWC, and the rest see NCHW. A value is transposed at most once each way.
LAYOUTS = ("nchw", "nhwc", "follow")
TO_NHWC, TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)


@dataclass(frozen=True)
class Rule:
    name: str
    lower: Callable[["Lowering", ir.Node], None]
    check: Callable[[ir.Node], str | None] | None = None
    layout: str = "nchw"


RULES: dict[str, Rule] = {}


def rule(*op_types: str, check: Callable[[ir.Node], str | None] | None = None, layout: str = "nchw"):
    """Registers the decorated `lower(ctx, node)` for the ONNX op types, with an optional `check`."""
    assert layout in LAYOUTS, layout

    def register(lower):
        for op_type in op_types:
            if op_type in RULES:
                raise ValueError(f"two TFLite lowering rules for {op_type}")
            RULES[op_type] = Rule(lower.__name__.removeprefix("lower_"), lower, check, layout)
        return lower
    return register


# --- reading the IR ------------------------------------------------------------------------------

def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None or value.shape is None or not all(isinstance(d, int) for d in value.shape):
        return None
    return tuple(value.shape)


def shape(value: ir.Value) -> tuple[int, ...]:
    """The static shape, which `unsupported_ops` has made sure of before any rule runs."""
    dims = static_shape(value)
    assert dims is not None, f"{value.name} has no static shape"
    return dims


def np_type(value: ir.Value) -> np.dtype:
    return np.dtype(value.dtype.numpy())


def const(value: ir.Value | None) -> np.ndarray | None:
    """The value's array when it is known at compile time: a constant, or a constant dequantized (the
    IR's int8 weights, which rules that take no integer weights read as float)."""
    if value is None:
        return None
    array = constant_array(value)
    if array is None and _dequantized_constant(value):
        node = value.producer()
        codes, scale = constant_array(node.inputs[0]), constant_array(node.inputs[1])
        zero = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        shape = [1] * codes.ndim
        if scale.size > 1:
            shape[_axis(node, codes.ndim)] = -1
        zero = np.float32(0) if zero is None else zero.astype(np.float32).reshape(shape)
        array = ((codes.astype(np.float32) - zero) * scale.astype(np.float32).reshape(shape)).astype(np_type(value))
    return array


def is_const(value: ir.Value | None) -> bool:
    return value is not None and (constant_tensor(value) is not None or _dequantized_constant(value))


def _dequantized_constant(value: ir.Value) -> bool:
    producer = value.producer()
    return (producer is not None and producer.op_type == "DequantizeLinear" and producer.domain in ONNX_DOMAINS
            and all(v is None or constant_tensor(v) is not None for v in producer.inputs))


def _axis(node: ir.Node, rank: int) -> int:
    axis = node.attributes.get_int("axis", 1)
    return axis + rank if axis < 0 else axis


def quantization(value: ir.Value) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(scales, zero points, axis) of an integer value of the QDQ form: what its QuantizeLinear wrote,
    or what the DequantizeLinear nodes reading it (all alike) take. None for other values."""
    producer = value.producer()
    if producer is not None and producer.op_type == "QuantizeLinear" and producer.domain in ONNX_DOMAINS:
        node = producer
    else:
        readers = {use.node for use in value.uses()}
        params = {_params_key(n) for n in readers}
        if not readers or len(params) != 1 or any(n.op_type != "DequantizeLinear" or n.inputs[0] is not value for n in readers):
            return None
        node = next(iter(readers))
    scale = constant_array(node.inputs[1])
    zero = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.zeros(1, np.int64)
    if scale is None or zero is None:
        return None
    rank = len(value.shape) if value.shape is not None else 1
    return scale.astype(np.float32).ravel(), zero.astype(np.int64).ravel(), _axis(node, rank) if scale.size > 1 else 0


def _params_key(node: ir.Node) -> tuple:
    arrays = [constant_array(v) if v is not None else None for v in node.inputs[1:3]]
    return (node.attributes.get_int("axis", 1), *(None if a is None else (a.dtype.str, a.tobytes()) for a in arrays))


def opset(node: ir.Node) -> int:
    graph = node.graph
    return (graph.opset_imports.get("", 0) if graph is not None else 0) or 0


def only_uses(value: ir.Value) -> ir.Node | None:
    """The single node that reads `value`, when it is not also a graph output."""
    if value.is_graph_output():
        return None
    consumers = set(value.consumers())
    return consumers.pop() if len(consumers) == 1 else None


# --- the context rules write through ------------------------------------------------------------

class Lowering:
    """The TFLite model being written for one ONNX graph: maps values to tensors as rules emit."""

    def __init__(self, fp16_weights: bool = False, nhwc_values: frozenset = frozenset()):
        self.fm = FlatModel()
        self.fp16_weights = fp16_weights
        self.node: ir.Node | None = None
        self.absorbed: set[ir.Node] = set()  # nodes a rule already lowered together with its own
        self.nhwc_values = nhwc_values  # the values `plan_layout` keeps NHWC
        self._tensors: dict[ir.Value, int] = {}
        self._nhwc: dict[ir.Value, int] = {}   # NHWC tensors of 4-D values
        self._constants: dict[tuple, int] = {}
        self._names: Counter = Counter()
        self.memo: dict = {}  # what rules work out about a node once, for other rules to ask

    def _name(self, name: str) -> str:
        self._names[name] += 1
        return name if self._names[name] == 1 else f"{name}:{self._names[name] - 1}"

    def define(self, value: ir.Value) -> int:
        """The tensor a rule writes `value` into, named after it."""
        if value in self._tensors:
            raise AssertionError(f"{value.name} is defined twice")
        index = self.fm.tensor(self._name(value.name), shape(value), tensor_type(np_type(value)))
        self._quantize(index, value)
        self._tensors[value] = index
        return index

    def alias(self, value: ir.Value, index: int) -> None:
        """`value` is held by an existing tensor (an op that computes nothing in TFLite)."""
        if value in self._tensors:
            raise AssertionError(f"{value.name} is defined twice")
        self._tensors[value] = index

    def _quantize(self, index: int, value: ir.Value) -> None:
        if np_type(value).kind in "iu" and (params := quantization(value)) is not None:
            self.fm.quantize(index, *params)

    def value(self, value: ir.Value) -> int:
        """The tensor holding `value` (NCHW) as an operand: defined earlier, or a constant written now."""
        if value in self._tensors:
            return self._tensors[value]
        if value in self._nhwc:
            index = self.fm.tensor(self._name(value.name), shape(value), tensor_type(np_type(value)))
            self._transpose(self._nhwc[value], TO_NCHW, index)
            self._tensors[value] = index
            return index
        array = const(value)
        if array is None:
            raise AssertionError(f"{value.name} is read before a rule defined it")
        index = self.weight(value, array)
        self._quantize(index, value)
        self._tensors[value] = index
        return index

    def define_nhwc(self, value: ir.Value) -> int:
        """The tensor a rule writes the 4-D `value` into with its axes as NHWC."""
        dims = tuple(shape(value)[p] for p in TO_NHWC)
        index = self.fm.tensor(self._name(f"{value.name}/nhwc"), dims, tensor_type(np_type(value)))
        self._nhwc[value] = index
        return index

    def nhwc(self, value: ir.Value) -> int:
        """`value` as NHWC: kept so, transposed once, or (a constant) broadcast to 4-D and permuted."""
        if value in self._nhwc:
            return self._nhwc[value]
        array = const(value)
        if array is not None:
            wide = array.reshape((1,) * (4 - array.ndim) + array.shape)
            return self.weight(value, np.ascontiguousarray(wide.transpose(TO_NHWC)), "nhwc")
        x = self.value(value)
        index = self.fm.tensor(self._name(f"{value.name}/nhwc"), [self.shape(x)[p] for p in TO_NHWC],
                               self.fm.type(x))
        self._transpose(x, TO_NHWC, index)
        self._nhwc[value] = index
        return index

    @property
    def in_nhwc(self) -> bool:
        """Whether the node being lowered writes NHWC (see `plan_layout`)."""
        return self.node is not None and self.node.outputs[0] in self.nhwc_values

    def operand(self, value: ir.Value) -> int:
        """An input of a layout-following rule, in the node's layout."""
        return self.nhwc(value) if self.in_nhwc else self.value(value)

    def result(self, value: ir.Value) -> int:
        """An output of a layout-following rule, in the node's layout."""
        return self.define_nhwc(value) if self.in_nhwc else self.define(value)

    def _transpose(self, x: int, perm, out: int) -> None:
        self.op(Op.TRANSPOSE, [x, self.int32(perm, "perm")], [out], version=3 if self.fm.type(x) == _BOOL else 1)

    def weight(self, value: ir.Value, array: np.ndarray, tag: str = "") -> int:
        """A constant derived from the ONNX constant `value` (e.g. transposed as `tag`), written once."""
        key = ("weight", value, tag)
        if key not in self._constants:
            self._constants[key] = self._constant(array, value.name + (f"/{tag}" if tag else ""))
        return self._constants[key]

    def const(self, array, dtype=None, hint: str = "const") -> int:
        """A small constant the lowering itself needs (a shape, axes, an epsilon), shared by value."""
        array = np.asarray(array, dtype=dtype)
        key = ("const", array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            owner = self.node.name if self.node is not None else "edgec"
            self._constants[key] = self._constant(array, f"{owner}/{hint}")
        return self._constants[key]

    def quantized_constant(self, array: np.ndarray, name: str, scale, zero_point=0, axis: int = 0) -> int:
        """An integer constant of its own (never shared: its scales belong to one operator)."""
        index = self.fm.constant(self._name(name), array)
        self.fm.quantize(index, scale, zero_point, axis)
        return index

    def int32(self, values, hint: str = "shape") -> int:
        return self.const(np.asarray(values, dtype=np.int32).reshape(-1), hint=hint)

    def _constant(self, array: np.ndarray, name: str) -> int:
        name = self._name(name)
        if self.fp16_weights and _stores_as_fp16(array):
            half = self.fm.constant(name + "/fp16", array.astype(np.float16))
            index = self.fm.tensor(name, array.shape, tensor_type(np.float32))
            self.fm.op(Op.DEQUANTIZE, [half], [index], version=3)  # version 3: float16 input
            return index
        return self.fm.constant(name, array)

    def temp(self, dims, dtype, hint: str) -> int:
        """An intermediate tensor of the current node."""
        owner = self.node.name if self.node is not None else "edgec"
        return self.fm.tensor(self._name(f"{owner}/{hint}"), dims, tensor_type(np.dtype(dtype)))

    def op(self, code: int, inputs, outputs, options=None, *, version: int = 1) -> None:
        self.fm.op(code, inputs, outputs, options, version=version)

    def shape(self, index: int) -> tuple[int, ...]:
        return self.fm.shape(index)


_BOOL = tensor_type(np.dtype(np.bool_))


def _stores_as_fp16(array: np.ndarray) -> bool:
    return (array.dtype == np.float32 and array.size >= FP16_MIN_ELEMENTS
            and bool(np.all(np.abs(array) <= _FP16_MAX)))


# --- the driver -----------------------------------------------------------------------------------

_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.INT64, ir.DataType.INT32,
                    ir.DataType.INT16, ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.BOOL})


def _value_problem(value: ir.Value | None) -> str | None:
    if value is None:
        return None
    if value.dtype not in _TYPES:
        return f"{value.name} has type {value.dtype}, which TFLite kernels here do not take"
    if static_shape(value) is None and not is_const(value):
        return f"{value.name} has no static shape (the tflite backend needs specialized input shapes)"
    return None


def unsupported_ops(model: ir.Model) -> dict[str, str]:
    """Node name -> why the tflite writer cannot lower it; empty when the whole graph lowers."""
    problems: dict[str, str] = {}
    for i, node in enumerate(model.graph):
        if node.domain not in ONNX_DOMAINS:
            reason = f"{node.domain}::{node.op_type} is not a standard ONNX op"
        elif node.op_type == "Constant":
            continue
        elif node.op_type not in RULES:
            reason = f"{node.op_type} has no TFLite builtin lowering"
        else:
            reason = next(filter(None, map(_value_problem, [*node.inputs, *node.outputs])), None)
            check = RULES[node.op_type].check
            reason = reason or (check(node) if check else None)
        if reason:
            problems[node.name or f"{node.op_type}#{i}"] = reason
    return problems


def plan_layout(model: ir.Model) -> frozenset:
    """The 4-D values to keep NHWC: outputs of "nhwc" rules, and of "follow" rules whose inputs
    computed at run time all are (constants are permuted at compile time)."""
    nhwc: set[ir.Value] = set()
    for node in model.graph:
        layout = RULES[node.op_type].layout if node.op_type in RULES else "nchw"
        out = node.outputs[0] if node.outputs else None
        if layout == "nchw" or out is None or len(shape(out)) != 4:
            continue
        if layout == "follow":
            live = [v for v in node.inputs if v is not None and not is_const(v)]
            constants_fit = all(const(v).ndim <= 4 for v in node.inputs if v is not None and is_const(v))
            if not live or not constants_fit or not all(v in nhwc for v in live):
                continue
        nhwc.update(v for v in node.outputs if v is not None)
    return frozenset(nhwc)


def lower_model(model: ir.Model, *, fp16_weights: bool = False) -> tuple[bytes, Lowering]:
    """The .tflite file for `model` (whose `unsupported_ops` must be empty) and the context that wrote it."""
    ctx = Lowering(fp16_weights, plan_layout(model))
    graph = model.graph
    inputs = {v.name: ctx.define(v) for v in graph.inputs if v.name not in graph.initializers}
    for node in graph:
        if node in ctx.absorbed or (node.domain in ONNX_DOMAINS and node.op_type == "Constant"):
            continue
        ctx.node = node
        RULES[node.op_type].lower(ctx, node)
    ctx.node = None
    outputs = {v.name: ctx.value(v) for v in graph.outputs}
    data = ctx.fm.finish(inputs, outputs)
    if len(data) > MAX_FLATBUFFER_BYTES:
        raise UserError(f"the model needs {len(data) / 2**30:.1f} GiB as .tflite, over the 2 GiB a flatbuffer holds",
                        "quantize it (edgec compile --precision int8) or compile for another backend")
    return data, ctx


def normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def numel(dims) -> int:
    return math.prod(dims)


# The rules register themselves on import; they need the names above, so they come last.
from edgec.backends.tflite import ops_elementwise, ops_integer, ops_layout, ops_spatial  # noqa: E402,F401
