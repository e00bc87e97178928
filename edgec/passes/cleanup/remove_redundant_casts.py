"""remove-redundant-casts: drops Cast/CastLike to the type a value already has, and shortens Cast
chains whose intermediate type holds every value of the source type exactly."""

from __future__ import annotations

import onnx_ir as ir

from edgec.passes.cleanup._util import bypass, ensure_shapes, is_onnx_op, remove_dead
from edgec.passes.core import Pass, PassContext, PassResult

T = ir.DataType
_FLOATS = (T.FLOAT16, T.BFLOAT16, T.FLOAT, T.DOUBLE)

# source -> the types that represent every value of the source exactly. Cast(Cast(x, B), C) equals
# Cast(x, C) when B is one of these for x's type: the inner cast changes the representation, never
# the value, and every cast is a function of the value. float32 -> float16 or float -> int are
# missing on purpose: they round.
LOSSLESS: dict[ir.DataType, frozenset[ir.DataType]] = {
    T.BOOL: frozenset({T.UINT8, T.UINT16, T.UINT32, T.UINT64, T.INT8, T.INT16, T.INT32, T.INT64, *_FLOATS}),
    T.UINT8: frozenset({T.UINT16, T.UINT32, T.UINT64, T.INT16, T.INT32, T.INT64, *_FLOATS}),
    T.INT8: frozenset({T.INT16, T.INT32, T.INT64, *_FLOATS}),
    T.UINT16: frozenset({T.UINT32, T.UINT64, T.INT32, T.INT64, T.FLOAT, T.DOUBLE}),
    T.INT16: frozenset({T.INT32, T.INT64, T.FLOAT, T.DOUBLE}),
    T.UINT32: frozenset({T.UINT64, T.INT64, T.DOUBLE}),
    T.INT32: frozenset({T.INT64, T.DOUBLE}),
    T.FLOAT16: frozenset({T.FLOAT, T.DOUBLE}),
    T.BFLOAT16: frozenset({T.FLOAT, T.DOUBLE}),
    T.FLOAT: frozenset({T.DOUBLE}),
}


def _is_cast(node: ir.Node | None) -> bool:
    return node is not None and is_onnx_op(node, "Cast", "CastLike")


def _target(node: ir.Node) -> ir.DataType | None:
    """The type a Cast or CastLike produces, when known."""
    if node.op_type == "Cast":
        to = node.attributes.get_int("to")
        return None if to is None else ir.DataType(to)
    like = node.inputs[1] if len(node.inputs) > 1 else None
    return None if like is None else like.dtype


def _lossless(source: ir.DataType | None, middle: ir.DataType | None) -> bool:
    return source is not None and middle is not None and middle in LOSSLESS.get(source, ())


class RemoveRedundantCastsPass(Pass):
    """Removes casts to the type a value already has and collapses cast chains through a type that
    loses nothing (int32 -> int64 -> float becomes int32 -> float; int32 -> int64 -> int32 disappears)."""

    name = "remove-redundant-casts"
    requires = ("shapes",)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        removed = 0
        ensure_shapes(model, ctx, {"Cast", "CastLike"})
        for node in list(model.graph.all_nodes()):
            if node.graph is None or not _is_cast(node) or not node.inputs or node.inputs[0] is None:
                continue
            x, target = node.inputs[0], _target(node)
            if target is None:
                continue
            if x.dtype == target:
                if ctx.allow(self.name):
                    bypass(node, x)
                    removed += 1
                continue
            inner = x.producer()
            if not _is_cast(inner) or inner.inputs[0] is None:
                continue
            source = inner.inputs[0]
            if not _lossless(source.dtype, _target(inner)):
                continue
            if source.dtype == target:
                # There and back through a wider type: neither cast is needed by this reader.
                if ctx.allow(self.name):
                    bypass(node, source)
                    removed += 1 + remove_dead(inner.outputs, only=_is_cast)[0]
            elif len(x.uses()) == 1 and not x.is_graph_output():
                # Only worth it when the inner cast goes away; with other readers it stays anyway.
                if ctx.allow(self.name):
                    node.replace_input_with(0, source)
                    removed += remove_dead(inner.outputs, only=_is_cast)[0]
        return PassResult(model, removed > 0, {"casts_removed": removed})
