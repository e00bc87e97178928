"""pack-qkv: the Q, K and V projections of an attention block that read one hidden state become one
MatMul on their concatenated weights (and one bias Add), split three ways.

One [E, 3E] GEMM instead of three [E, E] ones reads the hidden state once and keeps the GEMM units of
NPUs and GPUs busier; TFLite's FULLY_CONNECTED and TensorRT both gain. Blocks whose projections read
different inputs (cross attention, MobileBERT's bottleneck) or are already packed are left alone.
"""

from __future__ import annotations

import onnx_ir as ir

from edgec.analysis.attention import AttentionBlock, Projection, _values_by_name
from edgec.passes.blocks import Builder, packed_bias, packed_weight, trusted_blocks
from edgec.passes.cleanup._util import is_onnx_op, remove_dead
from edgec.passes.core import Pass, PassContext, PassResult


def _projection_output(node: ir.Node, p: Projection, values: dict[str, ir.Value]) -> ir.Value | None:
    """The projection's result after its bias: the MatMul/Gemm output, or the Add that adds the bias."""
    out = node.outputs[0]
    if not p.bias or is_onnx_op(node, "Gemm"):
        return out
    bias_value = values[p.bias]
    for user, _ in out.uses():
        if is_onnx_op(user, "Add") and bias_value in user.inputs:
            return user.outputs[0]
    return None


def _why_not(block: AttentionBlock) -> str | None:
    parts = (block.q, block.k, block.v)
    if len({p.input for p in parts}) != 1:
        return "Q, K and V read different inputs"
    if any(p.columns is not None for p in parts):
        return "already packed"
    if len({p.node for p in parts}) != 3:
        return "projections share a node"
    return None


class PackQkvPass(Pass):
    """Packs each proven attention block's Q, K and V projections into one MatMul and a Split."""

    name = "pack-qkv"
    requires = ("attention",)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        blocks, unproven = trusted_blocks(model, ctx)
        stats = {"blocks_packed": 0, "unproven": unproven}
        cache: dict = {}
        for block in blocks:
            if _why_not(block) is not None or not ctx.allow(self.name):
                continue
            if self._pack(model, block, cache):
                stats["blocks_packed"] += 1
        return PassResult(model, stats["blocks_packed"] > 0, stats)

    def _pack(self, model: ir.Model, block: AttentionBlock, cache: dict) -> bool:
        values = _values_by_name(model)
        nodes = {n.name: n for n in model.graph}
        parts = (block.q, block.k, block.v)
        if any(p.node not in nodes for p in parts):
            return False
        outputs = [_projection_output(nodes[p.node], p, values) for p in parts]
        if any(o is None or o.is_graph_output() for o in outputs):
            return False
        first = min((nodes[p.node] for p in parts), key=lambda n: model.graph.index(n))
        x = values[block.q.input]
        b = Builder(model, first, x.dtype, cache)
        y = b.op("MatMul", x, packed_weight(b, values, parts))
        if any(p.bias for p in parts):
            y = b.op("Add", y, packed_bias(b, values, parts))
        split = b.op("Split", y, b.ints(*(p.width for p in parts)), axis=-1, outputs=3)
        for old, new in zip(outputs, split):
            if old.shape is not None:
                new.shape, new.type = old.shape, old.type
            old.replace_all_uses_with(new)
        remove_dead(outputs)
        return True
