"""FLOPs and bytes per node: the inputs of the roofline estimate and of `edgec inspect`.

Dynamic dims are bound to stated sizes (batch 1, other dims 128 unless told), so every figure
is an estimate for those sizes and is reported together with them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import onnx_ir as ir

from edgec.analysis import analysis
from edgec.analysis.shapes import ensure_shapes

DEFAULT_BINDINGS = {"batch": 1, "*": 128}

_ELEMENTWISE_FLOPS = {
    "Add": 1, "Sub": 1, "Mul": 1, "Div": 1, "Pow": 1, "Sqrt": 1, "Relu": 1, "Neg": 1, "Max": 1, "Min": 1,
    "Where": 1, "Clip": 1, "Abs": 1, "Exp": 4, "Log": 4, "Erf": 8, "Tanh": 8, "Sigmoid": 4,
    "Gelu": 10, "HardSigmoid": 3, "HardSwish": 4, "LeakyRelu": 2, "Reciprocal": 1, "Sin": 8, "Cos": 8,
    "ReduceMean": 1, "ReduceSum": 1, "ReduceMax": 1, "Softmax": 5, "LayerNormalization": 8,
    "SimplifiedLayerNormalization": 5, "BatchNormalization": 4, "InstanceNormalization": 8,
    "GroupNormalization": 8,
}


@dataclass
class NodeCost:
    node: str
    op_type: str
    flops: float
    bytes: float


@dataclass
class ModelCost:
    flops: float = 0.0
    bytes: float = 0.0
    parameters: int = 0
    parameter_bytes: int = 0
    bindings: dict[str, int] = field(default_factory=dict)
    nodes: list[NodeCost] = field(default_factory=list)


def _dim(d, bindings: dict[str, int], axis: int) -> int:
    if isinstance(d, int):
        return d
    name = getattr(d, "value", None)
    if name in bindings:
        return bindings[name]
    if axis == 0 or (name and "batch" in name.lower()):
        return bindings.get("batch", 1)
    return bindings.get("*", 128)


def _shape(value: ir.Value | None, bindings) -> tuple[int, ...] | None:
    if value is None or value.shape is None:
        return None
    return tuple(_dim(d, bindings, i) for i, d in enumerate(value.shape))


def _numel(shape) -> int:
    return math.prod(shape) if shape is not None else 0


def _itemsize(value: ir.Value | None) -> int:
    try:
        return value.dtype.itemsize if value is not None and value.dtype is not None else 4
    except Exception:
        return 4


def node_flops(node: ir.Node, bindings: dict[str, int]) -> float:
    op = node.op_type
    out = _shape(node.outputs[0], bindings) if node.outputs else None
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul"):
        a = _shape(node.inputs[0], bindings)
        if a is None or out is None or not a:
            return 0.0
        return 2.0 * _numel(out) * a[-1]
    if op == "Gemm":
        a = _shape(node.inputs[0], bindings)
        if a is None or out is None:
            return 0.0
        k = a[0] if node.attributes.get_int("transA", 0) else a[-1]
        return 2.0 * _numel(out) * k
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = _shape(node.inputs[1 if op != "QLinearConv" else 3], bindings)
        if w is None or out is None:
            return 0.0
        return 2.0 * _numel(out) * _numel(w[1:])
    if op in ("Attention", "MultiHeadAttention"):
        q = _shape(node.inputs[0], bindings)
        return 4.0 * _numel(q) * (q[-2] if q and len(q) >= 2 else 1)
    if op in _ELEMENTWISE_FLOPS and out is not None:
        src = _shape(node.inputs[0], bindings) if op.startswith("Reduce") else out
        return float(_ELEMENTWISE_FLOPS[op] * _numel(src))
    return 0.0


def node_bytes(node: ir.Node, bindings: dict[str, int]) -> float:
    total = 0
    for v in list(node.inputs) + list(node.outputs):
        if v is not None:
            total += _numel(_shape(v, bindings)) * _itemsize(v)
    return float(total)


def model_cost(model: ir.Model, bindings: dict[str, int] | None = None) -> ModelCost:
    bindings = {**DEFAULT_BINDINGS, **(bindings or {})}
    ensure_shapes(model)
    cost = ModelCost(bindings=bindings)
    for init in model.graph.initializers.values():
        if init.const_value is not None:
            cost.parameters += _numel(init.const_value.shape)
            cost.parameter_bytes += init.const_value.nbytes
    for node in model.graph.all_nodes():
        f, b = node_flops(node, bindings), node_bytes(node, bindings)
        cost.nodes.append(NodeCost(node.name or "", node.op_type, f, b))
        cost.flops += f
        cost.bytes += b
    return cost


@analysis("cost")
def _cost(model: ir.Model) -> ModelCost:
    return model_cost(model)
