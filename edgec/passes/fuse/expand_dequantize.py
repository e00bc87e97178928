"""expand-dequantize (onnxruntime): a per-axis DequantizeLinear of a computed int8 tensor (the rows an
int8 embedding Gather fetched) becomes Cast to float and Mul by the scale vector.

The two compute the same numbers (with no zero point, DequantizeLinear is x * scale, and an int8
value is exact in float). onnxruntime 1.32's per-axis DequantizeLinear on the last axis runs an
unthreaded per-element loop: on MiniLM's three embedding lookups at 8x65 it took 1.4 ms where Cast and
Mul take 0.55. Per-tensor ones, constant inputs (weights, which onnxruntime folds or fuses) and
tensors with a nonzero zero point are left alone."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgec.passes.cleanup._util import bypass, constant_array, constant_tensor, ensure_shapes, is_onnx_op, remove_dead
from edgec.passes.core import Pass, PassContext, PassResult

T = ir.DataType


def _expandable(dq: ir.Node) -> bool:
    """Whether `dq` dequantizes a computed int8 tensor along its last axis (a constant scale vector,
    which broadcasts there) with no zero point, or an all-zero one."""
    x = dq.inputs[0]
    if x is None or x.dtype != T.INT8 or constant_tensor(x) is not None or x.shape is None:
        return False
    scale = constant_array(dq.inputs[1]) if len(dq.inputs) > 1 and dq.inputs[1] is not None else None
    if scale is None or scale.ndim != 1 or scale.size < 2:
        return False
    zero = dq.inputs[2] if len(dq.inputs) > 2 else None
    if zero is not None:
        codes = constant_array(zero)
        if codes is None or np.any(codes != 0):
            return False
    rank = len(x.shape)
    axis = dq.attributes.get_int("axis", 1)
    return rank > 0 and axis % rank == rank - 1 and not dq.attributes.get_int("block_size", 0)


class ExpandDequantizePass(Pass):
    """Rewrites a per-axis DequantizeLinear (last axis, no zero point) of a computed int8 tensor as
    Cast and Mul (onnxruntime)."""

    name = "expand-dequantize"
    requires = ("shapes",)
    preserves = ("shapes",)  # the Cast and Mul take the type and shape of what they replace

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        expanded = 0
        ensure_shapes(model, ctx, {"DequantizeLinear"})
        for dq in list(graph):
            if dq.graph is not graph or not is_onnx_op(dq, "DequantizeLinear"):
                continue
            out = dq.outputs[0]
            if not _expandable(dq) or out.dtype not in (T.FLOAT, T.FLOAT16) or not ctx.allow(self.name):
                continue
            cast = ir.node("Cast", [dq.inputs[0]], {"to": out.dtype})
            graph.insert_before(dq, cast)
            cast.outputs[0].type, cast.outputs[0].shape = out.type, out.shape
            mul = ir.node("Mul", [cast.outputs[0], dq.inputs[1]])
            graph.insert_before(dq, mul)
            mul.outputs[0].type, mul.outputs[0].shape = out.type, out.shape
            zero = dq.inputs[2] if len(dq.inputs) > 2 else None
            bypass(dq, mul.outputs[0], out)
            remove_dead([zero])
            expanded += 1
        return PassResult(model, expanded > 0, {"dequantizes_expanded": expanded})
