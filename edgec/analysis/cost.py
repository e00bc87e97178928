"""FLOPs and bytes per node: the inputs of the roofline estimate and of `edgec inspect`.

Dynamic dims are bound to stated sizes (batch 1, other dims 128 unless told), so every figure
is an estimate for those sizes and is reported together with them. Fused ops count the work they
fuse: onnxruntime's Attention its packed Q/K/V GEMM as well as the attention core, whose size
follows its inner (head) width rather than the hidden state's, so removing heads shows in the count.
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
    # onnxruntime's fused elementwise ops (com.microsoft)
    "BiasGelu": 11, "FastGelu": 10, "QuickGelu": 5, "BiasAdd": 2, "SkipLayerNormalization": 9,
    "SkipSimplifiedLayerNormalization": 6,
}
_MATMULS = ("MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul")
_ATTENTIONS = ("Attention", "MultiHeadAttention", "ScaledDotProductAttention")
# Ops that read only the rows or elements their indices name, not the whole of their first input.
_GATHERS = ("Gather", "GatherElements", "GatherND")


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
    if op in _MATMULS:
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
    if op in _ATTENTIONS:
        return _attention_flops(node, bindings)
    if op == "Sum" and out is not None:  # variadic: one add per element for each input after the first
        return float(max(len(node.inputs) - 1, 1) * _numel(out))
    if op in _ELEMENTWISE_FLOPS and out is not None:
        src = _shape(node.inputs[0], bindings) if op.startswith("Reduce") else out
        return float(_ELEMENTWISE_FLOPS[op] * _numel(src))
    return 0.0


def _attention_flops(node: ir.Node, bindings: dict[str, int]) -> float:
    """Q·Kᵀ and the weighted sum of V: 2·(rows of Q)·(keys)·(Q width + V width), Q and V [B, S, width]
    or [B, heads, S, head_dim], keys the second-last dim of K. onnxruntime's Attention reads the hidden
    state [B, S, hidden] and adds its packed projection onto [Q | K | V] (widths `qkv_hidden_sizes`,
    else a third of the weight's columns each)."""
    inputs = list(node.inputs) + [None] * 3
    x = _shape(inputs[0], bindings)
    if not x or not 3 <= len(x) <= 4 or not x[-1]:  # (a packed [B, S, heads, 3, head_dim] query is not counted)
        return 0.0
    if node.op_type == "Attention" and node.domain == "com.microsoft":
        w = _shape(inputs[1], bindings)
        if w is None or len(w) != 2:
            return 0.0
        sizes = list(node.attributes.get_ints("qkv_hidden_sizes", ())) or [w[1] // 3] * 3
        rows = _numel(x) // x[-1]
        return 2.0 * rows * w[0] * w[1] + 2.0 * rows * x[-2] * (sizes[0] + sizes[2])
    k, v = _shape(inputs[1], bindings), _shape(inputs[2], bindings)
    keys = k[-2] if k and len(k) >= 3 else x[-2]
    if v and len(v) == len(x):
        v_width = v[-1]
    elif v and len(v) == 4 and len(x) == 3:  # [B, heads, keys, head_dim] values for a [B, S, width] query
        v_width = v[1] * v[3]
    else:
        v_width = x[-1]
    return 2.0 * (_numel(x) // x[-1]) * keys * (x[-1] + v_width)


def node_bytes(node: ir.Node, bindings: dict[str, int]) -> float:
    """Bytes read and written, each input and output once; a gather reads only the rows it returns."""
    total = 0
    for i, v in enumerate(list(node.inputs) + list(node.outputs)):
        if v is None:
            continue
        if i == 0 and node.op_type in _GATHERS and node.outputs and node.outputs[0] is not None:
            v = node.outputs[0]
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
