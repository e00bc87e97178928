"""fuse-integer-matmul (onnxruntime): a QDQ MatMul with a constant int8 weight, and the constant bias
Add after it, becomes com.microsoft.MatMulIntegerToFloat, which adds the bias inside the kernel.

onnxruntime rewrites DequantizeLinear(a) x DequantizeLinear(W) -> MatMul into that op itself when it
loads the model, but leaves the bias Add outside: on MiniLM that is 18 extra passes over the
activations (about 2 ms of 110 at 8x65 on a 2-core x86). The numbers are the same: the kernel
computes (a_q - a_zp) x (W_q - W_zp) in integers and scales the sum, as the QDQ form defines.

What stays QDQ: MatMuls of two activations (onnxruntime fuses them itself, there is no bias), weights
that are not 2-D int8 constants with one scale or one per column, activations not read through a
DequantizeLinear with one scale. QNN, TensorRT and the other lowerings need the standard form, so this
pass is only in the pipelines of onnxruntime's CPU kernels."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgec.passes.cleanup._util import bypass, constant_array, constant_tensor, ensure_shapes, is_onnx_op, remove_dead
from edgec.passes.core import Pass, PassContext, PassResult

MS_DOMAIN = "com.microsoft"
T = ir.DataType
_ACTIVATION_TYPES = (T.UINT8, T.INT8)


def _dequantized(value: ir.Value | None) -> ir.Node | None:
    producer = None if value is None else value.producer()
    if producer is None or not is_onnx_op(producer, "DequantizeLinear") or len(producer.inputs) < 2:
        return None
    return producer


def _scalar(value: ir.Value | None) -> bool:
    tensor = None if value is None else constant_tensor(value)
    return tensor is not None and int(np.prod(tensor.shape.numpy(), dtype=np.int64)) == 1


def _activation(matmul: ir.Node):
    """(a_q, a_scale, a_zero_point) when the MatMul's left input is DequantizeLinear with one scale."""
    dq = _dequantized(matmul.inputs[0])
    if dq is None or dq.inputs[0].dtype not in _ACTIVATION_TYPES or not _scalar(dq.inputs[1]):
        return None
    zero = dq.inputs[2] if len(dq.inputs) > 2 else None
    if zero is not None and not _scalar(zero):
        return None
    return dq.inputs[0], dq.inputs[1], zero


def _weight(matmul: ir.Node):
    """(W_q, scale, zero_point) when the right input is DequantizeLinear of a constant int8 [K, N]
    with one scale, or one per column (axis 1) and no zero point."""
    dq = _dequantized(matmul.inputs[1])
    if dq is None:
        return None
    codes = constant_tensor(dq.inputs[0])
    scale = constant_array(dq.inputs[1])
    if codes is None or dq.inputs[0].dtype != T.INT8 or len(codes.shape) != 2 or scale is None:
        return None
    zero = dq.inputs[2] if len(dq.inputs) > 2 else None
    if scale.size != 1:
        axis = dq.attributes.get_int("axis", 1)
        if axis not in (1, -1) or scale.shape != (codes.shape[1],) or zero is not None:
            return None
    elif zero is not None and not _scalar(zero):
        return None
    return dq.inputs[0], dq.inputs[1], zero


def _bias(matmul: ir.Node, columns: int) -> tuple[ir.Node, ir.Value] | None:
    """(Add, bias) when the MatMul's product is read only by an Add of a constant [N] vector."""
    y = matmul.outputs[0]
    uses = list(y.uses())
    if len(uses) != 1 or y.is_graph_output() or not is_onnx_op(uses[0].node, "Add"):
        return None
    add = uses[0].node
    other = add.inputs[1 - uses[0].idx]
    bias = constant_tensor(other) if other is not None else None
    if bias is None or other.dtype != y.dtype or tuple(bias.shape.numpy()) != (columns,):
        return None
    return add, other


class FuseIntegerMatmulPass(Pass):
    """Fuses DequantizeLinear x DequantizeLinear(int8 weight) -> MatMul (-> Add bias) into
    com.microsoft.MatMulIntegerToFloat (onnxruntime)."""

    name = "fuse-integer-matmul"
    requires = ("shapes",)
    preserves = ("shapes",)  # the fused op takes the type and shape of the output it replaces

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        stats = {"matmuls_fused": 0, "biases_fused": 0}
        ensure_shapes(model, ctx, {"MatMul"})
        for matmul in list(graph):
            if matmul.graph is not graph or not is_onnx_op(matmul, "MatMul"):
                continue
            a, w = _activation(matmul), _weight(matmul)
            if a is None or w is None or matmul.outputs[0].dtype not in (T.FLOAT, T.FLOAT16):
                continue
            if a[1].dtype != matmul.outputs[0].dtype or w[1].dtype != a[1].dtype or not ctx.allow(self.name):
                continue
            found = _bias(matmul, constant_tensor(w[0]).shape[1])
            a_q, a_scale, a_zero = a
            w_q, w_scale, w_zero = w
            inputs = [a_q, w_q, a_scale, w_scale, a_zero, w_zero, found[1] if found else None]
            while inputs[-1] is None:
                inputs.pop()
            fused = ir.node("MatMulIntegerToFloat", inputs, domain=MS_DOMAIN)
            last = found[0] if found else matmul
            graph.insert_before(last, fused)
            out = last.outputs[0]
            fused.outputs[0].type, fused.outputs[0].shape = out.type, out.shape
            dead = [matmul.inputs[0], matmul.inputs[1]]
            if found:
                bypass(found[0], fused.outputs[0], out)
                dead.append(matmul.outputs[0])
            else:
                bypass(matmul, fused.outputs[0], out)
            remove_dead(dead)
            stats["matmuls_fused"] += 1
            stats["biases_fused"] += found is not None
        if stats["matmuls_fused"]:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return PassResult(model, stats["matmuls_fused"] > 0, stats)
