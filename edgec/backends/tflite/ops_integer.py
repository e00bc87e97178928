"""Lowering rules for the IR's QDQ form: QuantizeLinear, DequantizeLinear and the integer products.

insert-qdq writes int8 as x -> QuantizeLinear -> DequantizeLinear -> MatMul <- DequantizeLinear <- int8 W,
and (with its `outputs` option) the product, after its bias, -> QuantizeLinear -> DequantizeLinear. TFLite's
integer kernels take that whole pattern as one operator: FULLY_CONNECTED (or BATCH_MATMUL for two
activations) reads the int8 tensor the QUANTIZE wrote, int8 weights with per-channel scales and an int32
bias, and writes the int8 tensor of the output's QuantizeLinear. A DequantizeLinear becomes a DEQUANTIZE
only where a float op reads it; one of constants is folded into the float weights of ops that take no
integers (`lower.const`). A quantized weight whose product has no quantized output runs in TFLite's hybrid
kernel: float in, int8 weights, float out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgec.backends.tflite.lower import Lowering, const, np_type, only_uses, quantization, rule, shape
from edgec.backends.tflite.writer import Op, options
from edgec.ir.constants import ONNX_DOMAINS, constant_array, constant_tensor

I8 = np.dtype(np.int8)
F32 = np.dtype(np.float32)
_QUANTIZED_TYPES = frozenset({I8, np.dtype(np.uint8), np.dtype(np.int16)})
_INT32 = np.iinfo(np.int32)


def _is(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in ONNX_DOMAINS


# --- the products TFLite runs in integers -----------------------------------------------------------

def fusable_bias(mm_out: ir.Value, n: int) -> tuple[ir.Node, ir.Value, np.ndarray] | None:
    """The Add that only adds a constant [n] bias to the product, which FULLY_CONNECTED can take."""
    add = only_uses(mm_out)
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return None
    other = add.inputs[1] if add.inputs[0] is mm_out else add.inputs[0]
    bias = const(other)
    if bias is None or bias.dtype != np.float32 or bias.size != n or shape(add.outputs[0]) != shape(mm_out):
        return None
    if bias.ndim and bias.shape[-1] != n:
        return None
    return add, other, bias.reshape(n)


def fully_connected(ctx: Lowering, x: int, weight: int, bias: int, out: int, *, hybrid: bool = False) -> None:
    """FULLY_CONNECTED keeping x's leading dims. `hybrid`: float x and out, int8 weights (x is quantized
    per row at run time, with a zero point)."""
    opts = options("FullyConnected", keepNumDims=True, asymmetricQuantizeInputs=hybrid)
    # keep_num_dims: version 5; asymmetric inputs of the hybrid kernel: version 9.
    ctx.op(Op.FULLY_CONNECTED, [x, weight, bias], [out], opts, version=9 if hybrid else 5)


def _quantized_input(value: ir.Value) -> ir.Value | None:
    """The integer value behind a run-time DequantizeLinear with one scale (what a QUANTIZE wrote)."""
    dq = value.producer()
    if not _is(dq, "DequantizeLinear") or constant_tensor(dq.inputs[0]) is not None:
        return None
    q = dq.inputs[0]
    params = quantization(q)
    if q.dtype is None or np_type(q) != I8 or params is None or params[0].size != 1:
        return None
    return q


def _weight_codes(value: ir.Value, transposed: bool) -> tuple[ir.Value, np.ndarray, np.ndarray] | None:
    """(the int8 constant, its codes as [out, in], one scale per output channel) of a DequantizeLinear'd
    2-D weight with symmetric codes. `transposed`: the weight is stored [out, in] (Gemm's transB)."""
    dq = value.producer()
    if not _is(dq, "DequantizeLinear"):
        return None
    codes_value = dq.inputs[0]
    codes = constant_array(codes_value)
    params = quantization(codes_value) if codes is not None else None
    if codes is None or codes.dtype != I8 or codes.ndim != 2 or params is None or np.any(params[1] != 0):
        return None
    scale, _, axis = params
    out_axis = 0 if transposed else 1
    if scale.size != 1 and axis != out_axis:
        return None
    matrix = codes if transposed else codes.T
    return codes_value, np.ascontiguousarray(matrix), np.broadcast_to(scale, (matrix.shape[0],)).astype(np.float32)


def _quantized_output(value: ir.Value) -> ir.Node | None:
    """The QuantizeLinear to int8 with one scale that alone reads `value`."""
    q = only_uses(value)
    if not _is(q, "QuantizeLinear") or np_type(q.outputs[0]) != I8:
        return None
    params = quantization(q.outputs[0])
    return q if params is not None and params[0].size == 1 else None


@dataclass(frozen=True)
class Product:
    """How one MatMul/Gemm runs in integers.

    kind "fc": int8 x (`inputs`), int8 weights, int32 bias, int8 out; "bmm": int8 x int8 -> int8;
    "hybrid": float x, int8 weights, float bias and out. `bypassed` are the DequantizeLinear outputs
    this product reads as integers (their DEQUANTIZE is not needed for it)."""

    kind: str
    inputs: tuple[ir.Value, ...]
    bypassed: tuple[ir.Value, ...]
    output: ir.Value                 # the value the operator writes (a QuantizeLinear's output for fc/bmm)
    absorbed: tuple[ir.Node, ...]    # the bias Add and the output QuantizeLinear lowered with it
    weight: tuple[ir.Value, np.ndarray, np.ndarray] | None = None
    bias: tuple[ir.Value, np.ndarray] | None = None
    bias_codes: np.ndarray | None = None  # fc: the bias in int32 at x_scale * w_scale


def integer_product(ctx: Lowering, node: ir.Node) -> Product | None:
    """How `node` runs in integers, or None when it runs in float (worked out once per node)."""
    key = ("product", node)
    if key not in ctx.memo:
        ctx.memo[key] = _plan_product(node) if _is(node, "MatMul") or _is(node, "Gemm") else None
    return ctx.memo[key]


def _plan_product(node: ir.Node) -> Product | None:
    a, b = node.inputs[0], node.inputs[1]
    if a is None or b is None or np_type(a) != F32:
        return None
    if _is(node, "Gemm"):
        attrs = node.attributes
        if attrs.get_int("transA", 0) or attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
            return None
        weight = _weight_codes(b, transposed=bool(attrs.get_int("transB", 0)))
        if weight is None:
            return None
        c = node.inputs[2] if len(node.inputs) > 2 else None
        bias_array = const(c)
        if c is not None and (bias_array is None or bias_array.size != weight[1].shape[0]):
            return None
        bias = None if c is None else (c, bias_array.reshape(-1).astype(np.float32))
        point, absorbed = node.outputs[0], ()
    else:
        weight = _weight_codes(b, transposed=False)
        if weight is None:
            return _plan_activation_product(node)
        bias, point, absorbed = None, node.outputs[0], ()
        fused = fusable_bias(point, weight[1].shape[0])
        if fused is not None:
            add, bias_value, bias_array = fused
            bias, point, absorbed = (bias_value, bias_array), add.outputs[0], (add,)
    x = _quantized_input(a)
    out_q = _quantized_output(point)
    codes = _int32_bias(x, weight, bias) if x is not None and out_q is not None else None
    if codes is not None:
        return Product("fc", (x,), (a,), out_q.outputs[0], (*absorbed, out_q), weight, bias, codes)
    return Product("hybrid", (a,), (), point, absorbed, weight, bias)


def _plan_activation_product(node: ir.Node) -> Product | None:
    a, b = node.inputs[0], node.inputs[1]
    x, y = _quantized_input(a), _quantized_input(b)
    out_q = _quantized_output(node.outputs[0])
    if x is None or y is None or out_q is None or max(len(shape(a)), len(shape(b))) > 5:
        return None
    return Product("bmm", (x, y), (a, b), out_q.outputs[0], (out_q,))


def _int32_bias(x: ir.Value, weight, bias) -> np.ndarray | None:
    """The bias in int32 at scale x_scale * w_scale (what the kernel adds to its accumulators); None
    when it does not fit."""
    scale = quantization(x)[0][0] * weight[2].astype(np.float64)
    if bias is None:
        return np.zeros(weight[1].shape[0], np.int32)
    codes = np.rint(bias[1].astype(np.float64) / scale)
    if not np.all(np.isfinite(codes)) or codes.min() < _INT32.min or codes.max() > _INT32.max:
        return None
    return codes.astype(np.int32)


def _weight_tensor(ctx: Lowering, weight) -> int:
    codes_value, matrix, scale = weight
    key = ("int8 weight", codes_value)
    if key not in ctx.memo:
        ctx.memo[key] = ctx.quantized_constant(matrix, codes_value.name, scale)
    return ctx.memo[key]


def lower_integer_product(ctx: Lowering, node: ir.Node) -> bool:
    """Lowers `node` with an integer kernel when it has one (see `integer_product`)."""
    product = integer_product(ctx, node)
    if product is None:
        return False
    ctx.absorbed.update(product.absorbed)
    if product.kind == "bmm":
        x, y = (ctx.value(v) for v in product.inputs)
        ctx.op(Op.BATCH_MATMUL, [x, y], [ctx.define(product.output)], options("BatchMatMul"), version=4)
        return True
    weight = _weight_tensor(ctx, product.weight)
    (x_value,) = product.inputs
    if product.kind == "fc":
        bias = ctx.quantized_constant(product.bias_codes, "bias", quantization(x_value)[0][0] * product.weight[2])
        fully_connected(ctx, ctx.value(x_value), weight, bias, ctx.define(product.output))
        return True
    bias = -1 if product.bias is None else ctx.weight(product.bias[0], product.bias[1], "bias")
    fully_connected(ctx, ctx.value(x_value), weight, bias, ctx.define(product.output), hybrid=True)
    return True


# --- QuantizeLinear / DequantizeLinear -------------------------------------------------------------

def _check_params(node: ir.Node) -> str | None:
    for what, v in zip(("scale", "zero point"), node.inputs[1:3]):
        if v is not None and constant_tensor(v) is None:
            return f"{node.op_type} with a {what} computed at run time"
    if node.attributes.get_int("block_size", 0):
        return f"blocked {node.op_type}"
    return None


def _check_quantize(node: ir.Node) -> str | None:
    if np_type(node.inputs[0]) != F32:
        return f"QuantizeLinear of {np_type(node.inputs[0])} (QUANTIZE takes float32)"
    if np_type(node.outputs[0]) not in _QUANTIZED_TYPES:
        return f"QuantizeLinear to {np_type(node.outputs[0])}"
    problem = _check_params(node)
    if problem is None and constant_array(node.inputs[1]).size != 1:
        problem = "QuantizeLinear with a scale per channel (QUANTIZE takes one)"
    return problem


def _feeds_hybrid_only(ctx: Lowering, dq: ir.Node) -> bool:
    """Whether only hybrid products read this run-time DequantizeLinear of a QuantizeLinear: they
    quantize their float input themselves, so the pair can hand them the float it was given."""
    q, out = dq.inputs[0].producer(), dq.outputs[0]
    if not _is(q, "QuantizeLinear") or out.is_graph_output():
        return False
    readers = {use.node for use in out.uses()}
    return bool(readers) and all((p := integer_product(ctx, r)) is not None and p.kind == "hybrid" and out in p.inputs
                                 for r in readers)


@rule("QuantizeLinear", check=_check_quantize)
def lower_quantize(ctx: Lowering, node: ir.Node) -> None:
    """A QUANTIZE, unless only pairs whose readers are hybrid products read it."""
    q = node.outputs[0]
    readers = {use.node for use in q.uses()}
    if not q.is_graph_output() and readers and all(_is(r, "DequantizeLinear") and _feeds_hybrid_only(ctx, r)
                                                   for r in readers):
        return
    ctx.op(Op.QUANTIZE, [ctx.value(node.inputs[0])], [ctx.define(q)])


def _check_dequantize(node: ir.Node) -> str | None:
    if np_type(node.inputs[0]) not in _QUANTIZED_TYPES and constant_tensor(node.inputs[0]) is None:
        return f"DequantizeLinear of {np_type(node.inputs[0])}"
    if np_type(node.outputs[0]) != F32:
        return f"DequantizeLinear to {np_type(node.outputs[0])} (DEQUANTIZE writes float32)"
    return _check_params(node)


@rule("DequantizeLinear", check=_check_dequantize)
def lower_dequantize(ctx: Lowering, node: ir.Node) -> None:
    """A DEQUANTIZE for float readers; none where every reader takes the integers (or, for constants,
    where readers take the folded float array), and none after a QUANTIZE for hybrid readers alone."""
    out = node.outputs[0]
    if constant_tensor(node.inputs[0]) is not None:
        return
    readers = {use.node for use in out.uses()}
    if not out.is_graph_output() and readers and all(
            (p := integer_product(ctx, r)) is not None and out in p.bypassed for r in readers):
        return
    if _feeds_hybrid_only(ctx, node):
        ctx.alias(out, ctx.value(node.inputs[0].producer().inputs[0]))
        return
    ctx.op(Op.DEQUANTIZE, [ctx.value(node.inputs[0])], [ctx.define(out)], version=2)
