"""FLOPs and bytes per node: the inputs of the roofline estimate and of `edgec inspect`.

Dynamic dims are bound to stated sizes (batch 1, other dims 128 unless told), so every figure
is an estimate for those sizes and is reported together with them. Fused ops count the work they
fuse: onnxruntime's Attention its packed Q/K/V GEMM as well as the attention core, whose size
follows its inner (head) width rather than the hidden state's, so removing heads shows in the count.
onnxruntime's quantized and decoder ops (com.microsoft: MatMulNBits, MatMulBnb4, QGemm, QAttention,
GemmFastGelu, GroupQueryAttention, DecoderMaskedMultiHeadAttention, RotaryEmbedding) count as the float
graph they replace; onnx infers no shapes for them, so their counts read only their inputs and attributes.
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
# Rotating a pair (x, y) into (x·cos - y·sin, y·cos + x·sin): two multiplies and an add per element.
_ROTARY_FLOPS = 3
# MatMuls and where their B is among their inputs.
_MATMULS = {"MatMul": 1, "MatMulInteger": 1, "QLinearMatMul": 3, "FusedMatMul": 1, "MatMulIntegerToFloat": 1,
            "DynamicQuantizeMatMul": 1}
_ATTENTIONS = ("Attention", "QAttention", "MultiHeadAttention", "DecoderMaskedMultiHeadAttention",
               "ScaledDotProductAttention")
# Weight-only quantized MatMuls: B is packed, the attributes K and N give the float weight's shape.
_PACKED_MATMULS = ("MatMulNBits", "MatMulBnb4")
# Where B is among a Gemm's inputs.
_GEMM_B = {"Gemm": 1, "QGemm": 3}
# Where an attention op takes its cached keys [..., past, head_dim].
_PAST_KEY = {"Attention": 4, "QAttention": 8, "MultiHeadAttention": 6, "DecoderMaskedMultiHeadAttention": 5,
             "GroupQueryAttention": 3}
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
    if op in _MATMULS:  # 2·(output elements)·K; FusedMatMul may transpose A or B
        a = _shape(node.inputs[0], bindings)
        if not a:
            return 0.0
        trans_a = bool(node.attributes.get_int("transA", 0)) and len(a) > 1
        k = a[-2] if trans_a else a[-1]
        if out is not None:
            return 2.0 * _numel(out) * k
        # onnx infers no shape for the com.microsoft ones: A's rows times B's columns, over the batch dims
        b = _shape(node.inputs[_MATMULS[op]], bindings)
        if not b or len(a) < 2 or len(b) < 2:
            return 0.0
        m, n = (a[-1] if trans_a else a[-2]), (b[-2] if node.attributes.get_int("transB", 0) else b[-1])
        return 2.0 * max(_numel(a[:-2]), _numel(b[:-2])) * m * n * k
    if op in _PACKED_MATMULS:  # 2·rows(A)·K·N
        a = _shape(node.inputs[0], bindings)
        k, n = node.attributes.get_int("K", 0), node.attributes.get_int("N", 0)
        return 2.0 * (_numel(a) // a[-1]) * k * n if a and a[-1] else 0.0
    if op in _GEMM_B:  # 2·M·K·N, from A and B (transA, transB)
        a, b = _shape(node.inputs[0], bindings), _shape(node.inputs[_GEMM_B[op]], bindings)
        if not a or not b or len(a) != 2 or len(b) != 2:
            return 0.0
        n = b[0] if node.attributes.get_int("transB", 0) else b[1]
        return 2.0 * a[0] * a[1] * n
    if op == "GemmFastGelu":  # X [..., K] · W [K, N], then the bias and FastGelu on each output element
        x, w = _shape(node.inputs[0], bindings), _shape(node.inputs[1], bindings)
        if not x or not w or len(w) != 2:
            return 0.0
        outputs = _numel(x) // x[-1] * w[1]
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        return 2.0 * outputs * w[0] + (_ELEMENTWISE_FLOPS["FastGelu"] + has_bias) * outputs
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = _shape(node.inputs[1 if op != "QLinearConv" else 3], bindings)
        if w is None or out is None:
            return 0.0
        return 2.0 * _numel(out) * _numel(w[1:])
    if op in _ATTENTIONS:
        return _attention_flops(node, bindings)
    if op == "GroupQueryAttention":
        return _group_query_attention_flops(node, bindings)
    if op == "RotaryEmbedding":  # counted as if every element rotated (a partial rotary copies the rest)
        return float(_ROTARY_FLOPS * _numel(_shape(node.inputs[0], bindings)))
    if op == "Sum" and out is not None:  # variadic: one add per element for each input after the first
        return float(max(len(node.inputs) - 1, 1) * _numel(out))
    if op in _ELEMENTWISE_FLOPS:
        # onnx infers no output shape for com.microsoft ops; their first input has it.
        src = _shape(node.inputs[0], bindings) if op.startswith("Reduce") or out is None else out
        return float(_ELEMENTWISE_FLOPS[op] * _numel(src))
    return 0.0


def _attention_flops(node: ir.Node, bindings: dict[str, int]) -> float:
    """Q·Kᵀ and the weighted sum of V: 2·(rows of Q)·(keys)·(Q width + V width), Q and V [B, S, width]
    or [B, heads, S, head_dim], keys the second-last dim of K ([B, keys, heads, 2, head_dim] packed K/V)
    plus the cached ones (`_keys`). onnxruntime's Attention and QAttention read the hidden state
    [B, S, hidden] and add their packed projection onto [Q | K | V] (widths `qkv_hidden_sizes`, else a
    third of the weight's columns each)."""
    inputs = list(node.inputs) + [None] * 9
    x = _shape(inputs[0], bindings)
    if not x or not 3 <= len(x) <= 4 or not x[-1]:  # (a packed [B, S, heads, 3, head_dim] query is not counted)
        return 0.0
    past = inputs[_PAST_KEY[node.op_type]] if node.op_type in _PAST_KEY else None
    if node.op_type in ("Attention", "QAttention") and node.domain == "com.microsoft":
        w = _shape(inputs[1], bindings)
        if w is None or len(w) != 2:
            return 0.0
        sizes = list(node.attributes.get_ints("qkv_hidden_sizes", ())) or [w[1] // 3] * 3
        rows = _numel(x) // x[-1]
        return 2.0 * rows * w[0] * w[1] + 2.0 * rows * _keys(node, x[-2], past, bindings) * (sizes[0] + sizes[2])
    k, v = _shape(inputs[1], bindings), _shape(inputs[2], bindings)
    if k and len(k) == 5:  # packed [B, keys, heads, 2, head_dim] K/V
        keys = _keys(node, k[1], past, bindings)
    else:
        keys = _keys(node, k[-2] if k and len(k) >= 3 else x[-2], past, bindings)
    if v and len(v) == len(x):
        v_width = v[-1]
    elif v and len(v) == 4 and len(x) == 3:  # [B, heads, keys, head_dim] values for a [B, S, width] query
        v_width = v[1] * v[3]
    else:
        v_width = x[-1]
    return 2.0 * (_numel(x) // x[-1]) * keys * (x[-1] + v_width)


def _group_query_attention_flops(node: ir.Node, bindings: dict[str, int]) -> float:
    """The attention core of the `num_heads` query heads: 2·(B·S)·keys·(num_heads·head_dim) for Q·Kᵀ and
    as much for the weighted sum of V, keys S plus the cached ones (`_keys`). Each query head reads its
    group's K and V, so `kv_num_heads` changes what is read, not the work. Without key and value the
    query is packed [Q | K | V], (num_heads + 2·kv_num_heads)·head_dim wide. do_rotary adds
    `_ROTARY_FLOPS` per element of Q and K."""
    inputs = list(node.inputs) + [None] * 4
    x = _shape(inputs[0], bindings)
    heads, kv_heads = node.attributes.get_int("num_heads", 0), node.attributes.get_int("kv_num_heads", 0)
    if not x or len(x) != 3 or not heads:
        return 0.0
    head_dim = x[-1] // (heads + 2 * kv_heads if inputs[1] is None else heads)
    rows = x[0] * x[1]
    flops = 2.0 * rows * _keys(node, x[1], inputs[3], bindings) * 2 * heads * head_dim
    if node.attributes.get_int("do_rotary", 0):
        flops += _ROTARY_FLOPS * rows * (heads + kv_heads) * head_dim
    return flops


def _keys(node: ir.Node, new: int, past: ir.Value | None, bindings: dict[str, int]) -> int:
    """Keys attended: the `new` ones after those cached in `past` [..., past, head_dim]. Where past and
    present share one buffer (past_present_share_buffer), its length bounds them and is counted."""
    p = _shape(past, bindings)
    if not p or len(p) < 4:
        return new
    return p[-2] if node.attributes.get_int("past_present_share_buffer", 0) else p[-2] + new


def node_bytes(node: ir.Node, bindings: dict[str, int]) -> float:
    """Bytes read and written, each input and output once; a gather reads only the rows it returns, a
    block-quantized one (GatherBlockQuantized) the share of its packed table, scales and zero points
    that its indices name."""
    total = 0.0
    share = _gathered_share(node, bindings) if node.op_type == "GatherBlockQuantized" else 1.0
    for i, v in enumerate(list(node.inputs) + list(node.outputs)):
        if v is None:
            continue
        if i == 0 and node.op_type in _GATHERS and node.outputs and node.outputs[0] is not None:
            v = node.outputs[0]
        read_share = share if i < len(node.inputs) and i != 1 else 1.0  # all but the indices
        total += _numel(_shape(v, bindings)) * _itemsize(v) * read_share
    return total


def _gathered_share(node: ir.Node, bindings: dict[str, int]) -> float:
    """The share of GatherBlockQuantized's table that its indices name: (indices) / (table rows on gather_axis)."""
    data, indices = _shape(node.inputs[0], bindings), _shape(node.inputs[1], bindings)
    axis = node.attributes.get_int("gather_axis", 0)
    if not data or indices is None or not -len(data) <= axis < len(data) or not data[axis]:
        return 1.0
    return min(_numel(indices) / data[axis], 1.0)


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
