"""Lowering rules for arithmetic: elementwise ops, activations, normalizations, reductions, matrix products."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgec.backends.tflite.lower import (Lowering, const, is_const, normalize_axis, np_type, opset,
                                         rule, shape)
from edgec.backends.tflite.ops_integer import fully_connected, fusable_bias, lower_integer_product
from edgec.backends.tflite.writer import Op, options, tensor_type

F32 = np.dtype(np.float32)
I32, I64, BOOL = np.dtype(np.int32), np.dtype(np.int64), np.dtype(np.bool_)
_FLOAT = frozenset({F32})
_NUMERIC = frozenset({F32, I32, I64})

# ONNX op -> (TFLite op, options name, input types its kernel takes, highest rank it broadcasts).
# Beyond that rank the operands are first broadcast to the output's shape (BROADCAST_TO).
_BINARY = {
    "Add": (Op.ADD, "Add", _NUMERIC, 6),
    "Sub": (Op.SUB, "Sub", _NUMERIC, 5),
    "Mul": (Op.MUL, "Mul", _NUMERIC, 6),
    "Div": (Op.DIV, "Div", frozenset({F32, I32}), 5),
    "Pow": (Op.POW, "Pow", frozenset({F32, I32}), 4),
    "Max": (Op.MAXIMUM, "MaximumMinimum", _NUMERIC, 5),
    "Min": (Op.MINIMUM, "MaximumMinimum", _NUMERIC, 5),
    "Equal": (Op.EQUAL, "Equal", _NUMERIC | {BOOL}, 4),
    "Less": (Op.LESS, "Less", _NUMERIC, 4),
    "LessOrEqual": (Op.LESS_EQUAL, "LessEqual", _NUMERIC, 4),
    "Greater": (Op.GREATER, "Greater", _NUMERIC, 4),
    "GreaterOrEqual": (Op.GREATER_EQUAL, "GreaterEqual", _NUMERIC, 4),
    "And": (Op.LOGICAL_AND, "LogicalAnd", frozenset({BOOL}), 4),
    "Or": (Op.LOGICAL_OR, "LogicalOr", frozenset({BOOL}), 4),
    "Xor": (Op.NOT_EQUAL, "NotEqual", frozenset({BOOL}), 4),
}

# ONNX op -> (TFLite op, input types).
_UNARY = {
    "Relu": (Op.RELU, _FLOAT),
    "Sigmoid": (Op.LOGISTIC, _FLOAT),
    "Tanh": (Op.TANH, _FLOAT),
    "Sqrt": (Op.SQRT, _FLOAT),
    "Exp": (Op.EXP, _FLOAT),
    "Log": (Op.LOG, _FLOAT),
    "Sin": (Op.SIN, _FLOAT),
    "Cos": (Op.COS, _FLOAT),
    "Floor": (Op.FLOOR, _FLOAT),
    "Ceil": (Op.CEIL, _FLOAT),
    "HardSwish": (Op.HARD_SWISH, _FLOAT),
    "Abs": (Op.ABS, frozenset({F32, I32})),
    "Sign": (Op.SIGN, frozenset({F32, I32})),
    "Neg": (Op.NEG, _NUMERIC),
    "Not": (Op.LOGICAL_NOT, frozenset({BOOL})),
}


def _input_type(allowed):
    def check(node: ir.Node) -> str | None:
        dtype = np_type(node.inputs[0])
        if dtype not in allowed:
            names = ", ".join(sorted(str(t) for t in allowed))
            return f"TFLite's {node.op_type} kernel takes {names}, not {dtype}"
        return None
    return check


def broadcast_operands(ctx: Lowering, tensors: list[int], out_dims, limit: int) -> list[int]:
    """The operand tensors, each broadcast to `out_dims` first when the op cannot broadcast that rank."""
    out_dims = tuple(out_dims)
    if len(out_dims) <= limit or all(ctx.shape(t) == out_dims for t in tensors):
        return tensors
    result = []
    for t in tensors:
        if ctx.shape(t) != out_dims:
            wide = ctx.temp(out_dims, type_of(ctx, t), "broadcast")
            ctx.op(Op.BROADCAST_TO, [t, ctx.int32(out_dims)], [wide], version=2)
            t = wide
        result.append(t)
    return result


def type_of(ctx: Lowering, tensor: int) -> np.dtype:
    return next(dtype for dtype in (F32, I32, I64, BOOL) if tensor_type(dtype) == ctx.fm.type(tensor))


def _binary_version(code: int, dtype: np.dtype, dims: list[tuple[int, ...]]) -> int:
    wide_broadcast = len(set(dims)) > 1 and max(map(len, dims)) > 4
    if code == Op.ADD:
        return 4 if dtype == I64 else 1
    if code == Op.SUB:
        return 4 if dtype == I64 else 3 if wide_broadcast else 1
    if code == Op.MUL:
        return 5 if dtype == I64 else 1
    if code in (Op.DIV, Op.MAXIMUM, Op.MINIMUM):
        return (2 if code == Op.DIV else 3) if wide_broadcast else 1
    return 1


def binary(ctx: Lowering, code: int, name: str, tensors: list[int], out: int, limit: int) -> None:
    operands = broadcast_operands(ctx, tensors, ctx.shape(out), limit)
    version = _binary_version(code, type_of(ctx, tensors[0]), [ctx.shape(t) for t in operands])
    ctx.op(code, operands, [out], options(name), version=version)


def _check_binary(node: ir.Node) -> str | None:
    if len(node.inputs) != 2:
        return f"{node.op_type} with {len(node.inputs)} inputs (TFLite's takes two)"
    return _input_type(_BINARY[node.op_type][2])(node)


# Arithmetic on images keeps their layout: an activation between two convolutions stays NHWC.
_ARITHMETIC = ("Add", "Sub", "Mul", "Div", "Max", "Min")


def lower_binary(ctx: Lowering, node: ir.Node) -> None:
    code, name, _, limit = _BINARY[node.op_type]
    if node.op_type == "Pow" and _lower_pow_by_constant(ctx, node):
        return
    operands = [ctx.operand(v) for v in node.inputs]
    binary(ctx, code, name, operands, ctx.result(node.outputs[0]), limit)


rule(*_ARITHMETIC, check=_check_binary, layout="follow")(lower_binary)
rule(*(op for op in _BINARY if op not in _ARITHMETIC), check=_check_binary)(lower_binary)


def _lower_pow_by_constant(ctx: Lowering, node: ir.Node) -> bool:
    """x**2 and x**0.5 as MUL and SQRT: exact where POW goes through exp/log, and XNNPACK runs them."""
    exponent = const(node.inputs[1])
    x, y = node.inputs[0], node.outputs[0]
    if exponent is None or exponent.size != 1 or shape(y) != shape(x) or np_type(x) != F32:
        return False
    e = float(exponent.reshape(()))
    if e == 2.0:
        t = ctx.value(x)
        ctx.op(Op.MUL, [t, t], [ctx.define(y)], options("Mul"))
    elif e == 0.5:
        ctx.op(Op.SQRT, [ctx.value(x)], [ctx.define(y)])
    else:
        return False
    return True


def _check_unary(node: ir.Node) -> str | None:
    if node.op_type == "Elu" and node.attributes.get_float("alpha", 1.0) != 1.0:
        return "Elu with alpha other than 1 (TFLite's ELU has none)"
    return _input_type(_UNARY[node.op_type][1] if node.op_type in _UNARY else _FLOAT)(node)


@rule(*_UNARY, check=_check_unary, layout="follow")
def lower_unary(ctx: Lowering, node: ir.Node) -> None:
    code, _ = _UNARY[node.op_type]
    ctx.op(code, [ctx.operand(node.inputs[0])], [ctx.result(node.outputs[0])])


@rule("Elu", check=_check_unary, layout="follow")
def lower_elu(ctx: Lowering, node: ir.Node) -> None:
    ctx.op(Op.ELU, [ctx.operand(node.inputs[0])], [ctx.result(node.outputs[0])])


@rule("Gelu", check=_input_type(_FLOAT), layout="follow")
def lower_gelu(ctx: Lowering, node: ir.Node) -> None:
    approximate = node.attributes.get_string("approximate", "none") == "tanh"
    opts = options("Gelu", approximate=approximate)
    ctx.op(Op.GELU, [ctx.operand(node.inputs[0])], [ctx.result(node.outputs[0])], opts)


@rule("LeakyRelu", check=_input_type(_FLOAT), layout="follow")
def lower_leaky_relu(ctx: Lowering, node: ir.Node) -> None:
    opts = options("LeakyRelu", alpha=node.attributes.get_float("alpha", 0.01))
    ctx.op(Op.LEAKY_RELU, [ctx.operand(node.inputs[0])], [ctx.result(node.outputs[0])], opts)


@rule("Reciprocal", check=_input_type(_FLOAT), layout="follow")
def lower_reciprocal(ctx: Lowering, node: ir.Node) -> None:
    one = ctx.const(np.float32(1.0), hint="one")
    ctx.op(Op.DIV, [one, ctx.operand(node.inputs[0])], [ctx.result(node.outputs[0])], options("Div"))


def _clip_bounds(node: ir.Node) -> tuple[float, float] | None:
    if opset(node) < 11:
        return node.attributes.get_float("min", -np.inf), node.attributes.get_float("max", np.inf)
    bounds = []
    for i, default in ((1, -np.inf), (2, np.inf)):
        v = node.inputs[i] if len(node.inputs) > i else None
        if v is None:
            bounds.append(default)
            continue
        array = const(v)
        if array is None or array.size != 1:
            return None
        bounds.append(float(array.reshape(())))
    return bounds[0], bounds[1]


def _check_clip(node: ir.Node) -> str | None:
    if _clip_bounds(node) is None:
        return "Clip with bounds computed at run time"
    return _input_type(_FLOAT)(node)


@rule("Clip", check=_check_clip, layout="follow")
def lower_clip(ctx: Lowering, node: ir.Node) -> None:
    low, high = _clip_bounds(node)
    x, y = ctx.operand(node.inputs[0]), ctx.result(node.outputs[0])
    fused = {(0.0, 6.0): Op.RELU6, (0.0, np.inf): Op.RELU, (-1.0, 1.0): Op.RELU_N1_TO_1}.get((low, high))
    if fused is not None:
        ctx.op(fused, [x], [y])
        return
    if low > -np.inf:
        floor = y if high == np.inf else ctx.temp(ctx.shape(x), F32, "max")
        ctx.op(Op.MAXIMUM, [x, ctx.const(np.float32(low), hint="min")], [floor], options("MaximumMinimum"))
        x = floor
    if high < np.inf:
        ctx.op(Op.MINIMUM, [x, ctx.const(np.float32(high), hint="max")], [y], options("MaximumMinimum"))
    elif low == -np.inf:
        ctx.op(Op.RESHAPE, [x, ctx.int32(ctx.shape(x))], [y], options("Reshape", newShape=list(ctx.shape(x))))


@rule("Where")
def lower_where(ctx: Lowering, node: ir.Node) -> None:
    operands = broadcast_operands(ctx, [ctx.value(v) for v in node.inputs], shape(node.outputs[0]), 4)
    ctx.op(Op.SELECT_V2, operands, [ctx.define(node.outputs[0])])


@rule("Cast")
def lower_cast(ctx: Lowering, node: ir.Node) -> None:
    x, y = ctx.value(node.inputs[0]), ctx.define(node.outputs[0])
    src, dst = ctx.fm.type(x), ctx.fm.type(y)
    ctx.op(Op.CAST, [x], [y], options("Cast", inDataType=src, outDataType=dst))


# --- softmax and normalization ---------------------------------------------------------------------

def _softmax_axis(node: ir.Node) -> int | None:
    rank = len(shape(node.inputs[0]))
    default = -1 if opset(node) >= 13 else 1
    axis = normalize_axis(node.attributes.get_int("axis", default), rank)
    if opset(node) < 13 and axis != rank - 1:
        return None  # before opset 13 the axis flattens the tensor into 2-D: another operation
    return axis


def _check_softmax(node: ir.Node) -> str | None:
    if _softmax_axis(node) is None:
        return f"{node.op_type} of opset < 13 on an axis other than the last"
    return _input_type(_FLOAT)(node)


@rule("Softmax", "LogSoftmax", check=_check_softmax)
def lower_softmax(ctx: Lowering, node: ir.Node) -> None:
    """SOFTMAX works on the last axis: another axis is transposed there and back."""
    axis = _softmax_axis(node)
    x, y = ctx.value(node.inputs[0]), ctx.define(node.outputs[0])
    dims = ctx.shape(x)
    last = len(dims) - 1
    code, opts = ((Op.SOFTMAX, options("Softmax", beta=1.0)) if node.op_type == "Softmax"
                  else (Op.LOG_SOFTMAX, options("LogSoftmax")))
    if axis == last:
        ctx.op(code, [x], [y], opts)
        return
    perm = list(range(len(dims)))
    perm[axis], perm[last] = last, axis  # a swap is its own inverse
    moved = ctx.temp([dims[p] for p in perm], F32, "moved")
    result = ctx.temp([dims[p] for p in perm], F32, "softmax")
    ctx.op(Op.TRANSPOSE, [x, ctx.int32(perm, "perm")], [moved], version=transpose_version(len(dims)))
    ctx.op(code, [moved], [result], opts)
    ctx.op(Op.TRANSPOSE, [result, ctx.int32(perm, "perm")], [y], version=transpose_version(len(dims)))


def transpose_version(rank: int) -> int:
    return 6 if rank > 5 else 4 if rank > 4 else 1


def _unused_outputs(node: ir.Node) -> str | None:
    for extra in node.outputs[1:]:
        if extra is not None and (extra.uses() or extra.is_graph_output()):
            return f"{node.op_type}'s output {extra.name} is used (only the first one lowers)"
    return None


def _check_layer_norm(node: ir.Node) -> str | None:
    return _unused_outputs(node) or _input_type(_FLOAT)(node)


@rule("LayerNormalization", check=_check_layer_norm)
def lower_layer_norm(ctx: Lowering, node: ir.Node) -> None:
    """TFLite has no layer norm: (x - mean) * rsqrt(var + eps) * scale + bias over the trailing axes."""
    x = ctx.value(node.inputs[0])
    dims = ctx.shape(x)
    axis = normalize_axis(node.attributes.get_int("axis", -1), len(dims))
    eps = node.attributes.get_float("epsilon", 1e-5)
    axes = ctx.int32(list(range(axis, len(dims))), "axes")
    reduced = [*dims[:axis], *[1] * (len(dims) - axis)]
    keep = options("Reducer", keepDims=True)
    mean, sq, var, var_eps, rstd, centered = (ctx.temp(d, F32, h) for d, h in (
        (reduced, "mean"), (dims, "squared"), (reduced, "var"), (reduced, "var_eps"), (reduced, "rstd"),
        (dims, "centered")))
    ctx.op(Op.MEAN, [x, axes], [mean], keep)
    ctx.op(Op.SQUARED_DIFFERENCE, [x, mean], [sq], options("SquaredDifference"))
    ctx.op(Op.MEAN, [sq, axes], [var], keep)
    ctx.op(Op.ADD, [var, ctx.const(np.float32(eps), hint="epsilon")], [var_eps], options("Add"))
    ctx.op(Op.RSQRT, [var_eps], [rstd])
    ctx.op(Op.SUB, [x, mean], [centered], options("Sub"))
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    steps = [(Op.MUL, "Mul", rstd), (Op.MUL, "Mul", scale), (Op.ADD, "Add", bias)]
    steps = [(code, name, t if isinstance(t, int) else ctx.value(t)) for code, name, t in steps if t is not None]
    out = centered
    for i, (code, name, operand) in enumerate(steps):
        result = ctx.define(node.outputs[0]) if i == len(steps) - 1 else ctx.temp(dims, F32, name.lower())
        ctx.op(code, [out, operand], [result], options(name))
        out = result


def _check_batch_norm(node: ir.Node) -> str | None:
    if node.attributes.get_int("training_mode", 0):
        return "BatchNormalization in training mode"
    if not all(is_const(v) for v in node.inputs[1:5]):
        return "BatchNormalization with statistics computed at run time"
    return _unused_outputs(node) or _input_type(_FLOAT)(node)


@rule("BatchNormalization", check=_check_batch_norm)
def lower_batch_norm(ctx: Lowering, node: ir.Node) -> None:
    """Inference batch norm is a per-channel affine map: x * s + t, folded here from the statistics."""
    gamma, beta, mean, var = (const(v).astype(np.float64) for v in node.inputs[1:5])
    eps = node.attributes.get_float("epsilon", 1e-5)
    s = gamma / np.sqrt(var + eps)
    t = beta - mean * s
    dims = shape(node.inputs[0])
    channel = (-1, *[1] * (len(dims) - 2))  # channels are axis 1: broadcast over the spatial axes
    scale = ctx.weight(node.inputs[1], s.astype(np.float32).reshape(channel), "scale")
    shift = ctx.weight(node.inputs[2], t.astype(np.float32).reshape(channel), "shift")
    scaled = ctx.temp(dims, F32, "scaled")
    ctx.op(Op.MUL, [ctx.value(node.inputs[0]), scale], [scaled], options("Mul"))
    ctx.op(Op.ADD, [scaled, shift], [ctx.define(node.outputs[0])], options("Add"))


# --- reductions -------------------------------------------------------------------------------------

_REDUCE = {"ReduceMean": Op.MEAN, "ReduceSum": Op.SUM, "ReduceMax": Op.REDUCE_MAX,
           "ReduceMin": Op.REDUCE_MIN, "ReduceProd": Op.REDUCE_PROD}


def _reduce_axes(node: ir.Node) -> list[int] | None:
    """The reduced axes (all when empty), or None when they are only known at run time."""
    rank = len(shape(node.inputs[0]))
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        array = const(node.inputs[1])
        if array is None:
            return None
        axes = [int(a) for a in array.reshape(-1)]
    else:
        axes = list(node.attributes.get_ints("axes", []) or [])
    if not axes and node.attributes.get_int("noop_with_empty_axes", 0):
        return []
    return sorted({normalize_axis(a, rank) for a in axes}) if axes else list(range(rank))


def _check_reduce(node: ir.Node) -> str | None:
    if _reduce_axes(node) is None:
        return f"{node.op_type} over axes computed at run time"
    return _input_type(_NUMERIC)(node)


@rule(*_REDUCE, check=_check_reduce)
def lower_reduce(ctx: Lowering, node: ir.Node) -> None:
    axes = _reduce_axes(node)
    x, y = ctx.value(node.inputs[0]), ctx.define(node.outputs[0])
    if not axes:  # noop_with_empty_axes
        ctx.op(Op.RESHAPE, [x, ctx.int32(ctx.shape(y))], [y], options("Reshape", newShape=list(ctx.shape(y))))
        return
    keep = bool(node.attributes.get_int("keepdims", 1))
    ctx.op(_REDUCE[node.op_type], [x, ctx.int32(axes, "axes")], [y], options("Reducer", keepDims=keep))


def _check_cumsum(node: ir.Node) -> str | None:
    if const(node.inputs[1]) is None:
        return "CumSum over an axis computed at run time"
    return _input_type(_NUMERIC)(node)


@rule("CumSum", check=_check_cumsum)
def lower_cumsum(ctx: Lowering, node: ir.Node) -> None:
    rank = len(shape(node.inputs[0]))
    axis = normalize_axis(int(const(node.inputs[1]).reshape(())), rank)
    opts = options("Cumsum", exclusive=bool(node.attributes.get_int("exclusive", 0)),
                   reverse=bool(node.attributes.get_int("reverse", 0)))
    axis_tensor = ctx.const(np.int32(axis), hint="axis")
    ctx.op(Op.CUMSUM, [ctx.value(node.inputs[0]), axis_tensor], [ctx.define(node.outputs[0])], opts)


# --- matrix products ----------------------------------------------------------------------------------

def _check_matmul(node: ir.Node) -> str | None:
    a, b = (shape(v) for v in node.inputs)
    if len(a) < 2 or len(b) < 2:
        return "MatMul of a 1-D operand"
    if np_type(node.inputs[0]) != F32:
        return f"MatMul of {np_type(node.inputs[0])} (the float kernels take float32)"
    weight = const(node.inputs[1])
    if (weight is None or weight.ndim != 2) and max(len(a), len(b)) > 5:
        return "MatMul of rank > 5 (BATCH_MATMUL takes up to 5)"
    return None


@rule("MatMul", check=_check_matmul)
def lower_matmul(ctx: Lowering, node: ir.Node) -> None:
    """A constant 2-D right operand makes a FULLY_CONNECTED (weights [out, in], a following bias Add
    fused in); anything else is a BATCH_MATMUL. Quantized ones run in integers where they can."""
    if lower_integer_product(ctx, node):
        return
    a, b = node.inputs
    weight = const(b)
    if weight is None or weight.ndim != 2:
        ctx.op(Op.BATCH_MATMUL, [ctx.value(a), ctx.value(b)], [ctx.define(node.outputs[0])], options("BatchMatMul"))
        return
    n = weight.shape[1]
    w = ctx.weight(b, np.ascontiguousarray(weight.T), "transposed")
    fused = fusable_bias(node.outputs[0], n)
    if fused is not None:
        add, bias_value, bias = fused
        ctx.absorbed.add(add)
        fully_connected(ctx, ctx.value(a), w, ctx.weight(bias_value, bias, "bias"), ctx.define(add.outputs[0]))
        return
    fully_connected(ctx, ctx.value(a), w, -1, ctx.define(node.outputs[0]))


def _check_gemm(node: ir.Node) -> str | None:
    if const(node.inputs[1]) is None:
        return "Gemm with a weight computed at run time"
    if len(node.inputs) > 2 and node.inputs[2] is not None and const(node.inputs[2]) is None:
        return "Gemm with a bias computed at run time"
    return _input_type(_FLOAT)(node)


@rule("Gemm", check=_check_gemm)
def lower_gemm(ctx: Lowering, node: ir.Node) -> None:
    """alpha * A' B' + beta * C with constant B and C: one FULLY_CONNECTED (plus an ADD for a C that is
    not a row vector). Quantized ones run in integers where they can."""
    if lower_integer_product(ctx, node):
        return
    attrs = node.attributes
    alpha, beta = attrs.get_float("alpha", 1.0), attrs.get_float("beta", 1.0)
    b = const(node.inputs[1])
    w = (b if attrs.get_int("transB", 0) else b.T) * np.float32(alpha)
    n = w.shape[0]
    x = ctx.value(node.inputs[0])
    if attrs.get_int("transA", 0):
        m, k = ctx.shape(x)
        xt = ctx.temp((k, m), F32, "transposed")
        ctx.op(Op.TRANSPOSE, [x, ctx.int32([1, 0], "perm")], [xt])
        x = xt
    weight = ctx.weight(node.inputs[1], np.ascontiguousarray(w, dtype=np.float32), "gemm")
    y = node.outputs[0]
    c_value = node.inputs[2] if len(node.inputs) > 2 else None
    c = None if c_value is None else (const(c_value) * np.float32(beta)).astype(np.float32)
    if c is None:
        fully_connected(ctx, x, weight, -1, ctx.define(y))
    elif c.size in (1, n) and (c.ndim == 0 or c.shape[-1] == c.size):
        bias = np.broadcast_to(c.reshape(-1), (n,)).copy()
        fully_connected(ctx, x, weight, ctx.weight(c_value, bias, "bias"), ctx.define(y))
    else:
        product = ctx.temp(shape(y), F32, "product")
        fully_connected(ctx, x, weight, -1, product)
        ctx.op(Op.ADD, [product, ctx.weight(c_value, c, "bias")], [ctx.define(y)], options("Add"))
