"""remove-redundant-reshapes: drops Reshape/Squeeze/Unsqueeze/Flatten that give back a shape the
data already had, and starts a Reshape with a constant target from the beginning of a reshape chain.

All four ops keep the row-major order of the elements and change only the shape, so a chain of them
that ends in the shape it started from is the identity, and a Reshape to a constant shape does not
care which shape its input had (unless a 0 in the target copies a dim of that input).
"""

from __future__ import annotations

import onnx_ir as ir

from edgec.passes.cleanup._util import (
    bypass,
    constant_ints,
    ensure_shapes,
    is_onnx_op,
    rank,
    remove_dead,
    same_shape,
)
from edgec.passes.core import Pass, PassContext, PassResult

_LAYOUT_OPS = ("Reshape", "Squeeze", "Unsqueeze", "Flatten")


def _is_layout(node: ir.Node | None) -> bool:
    return node is not None and is_onnx_op(node, *_LAYOUT_OPS) and bool(node.inputs) and node.inputs[0] is not None


def _reshape_keeps_shape(x: ir.Value, node: ir.Node) -> bool:
    """Whether Reshape(x, constant shape) provably gives x's own shape, symbolic dims included."""
    target = constant_ints(node.inputs[1]) if len(node.inputs) > 1 else None
    if target is None or x.shape is None or len(target) != len(x.shape):
        return False
    allowzero = node.attributes.get_int("allowzero", 0)
    free = 0
    for dim, want in zip(x.shape, target):
        if want == 0 and not allowzero:
            continue  # 0 copies this dim of the input
        if want == -1:
            free += 1
        elif not (isinstance(dim, int) and dim == want):
            return False
    # The one -1 takes what the other dims leave, which is x's dim there unless some dim is 0.
    return free == 0 or (free == 1 and not any(d == 0 for d in x.shape if isinstance(d, int)))


def _absolute_target(node: ir.Node) -> bool:
    """Whether a Reshape's target is a constant that copies no dim from its input: then what its
    input went through before (other reshapes) does not matter."""
    if node.op_type != "Reshape" or len(node.inputs) < 2:
        return False
    target = constant_ints(node.inputs[1])
    return target is not None and (0 not in target or bool(node.attributes.get_int("allowzero", 0)))


def _keeps_shape(node: ir.Node) -> bool:
    x, y = node.inputs[0], node.outputs[0]
    if same_shape(x.shape, y.shape):
        return True
    if node.op_type == "Reshape":
        return _reshape_keeps_shape(x, node)
    if node.op_type == "Flatten":
        r = rank(x)
        return r == 2 and node.attributes.get_int("axis", 1) % r == 1
    return False  # Squeeze and Unsqueeze always change the rank


def _axes(node: ir.Node, r: int | None) -> set[int] | None:
    """The axes a Squeeze or Unsqueeze names, made non-negative against rank `r`."""
    axes = constant_ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if axes is None:
        if node.op_type != "Squeeze" or len(node.inputs) > 1 and node.inputs[1] is not None:
            return None
        # Squeeze without axes drops every dim of size 1: known only when every dim is a number.
        shape = node.inputs[0].shape
        if shape is None or not all(isinstance(d, int) for d in shape):
            return None
        return {i for i, d in enumerate(shape) if d == 1}
    if any(a < 0 for a in axes):
        if r is None:
            return None
        axes = [a + r if a < 0 else a for a in axes]
    return set(axes) if len(set(axes)) == len(axes) else None


def _cancels(outer: ir.Node, inner: ir.Node) -> bool:
    """Unsqueeze(Squeeze(x, A), A) and Squeeze(Unsqueeze(x, A), A): x again, whatever its dims."""
    pair = (inner.op_type, outer.op_type)
    if pair == ("Squeeze", "Unsqueeze"):
        r = rank(inner.inputs[0])  # both name axes of x's rank
    elif pair == ("Unsqueeze", "Squeeze"):
        r = rank(inner.outputs[0])
        if r is None and rank(inner.inputs[0]) is not None:
            a = _axes(inner, None)
            r = rank(inner.inputs[0]) + len(a) if a is not None else None
    else:
        return False
    if pair == ("Unsqueeze", "Squeeze") and (len(outer.inputs) < 2 or outer.inputs[1] is None):
        return False  # a Squeeze without axes would also drop x's own dims of size 1
    a_inner, a_outer = _axes(inner, r), _axes(outer, r)
    return a_inner is not None and a_inner == a_outer


def _chain(value: ir.Value) -> list[ir.Node]:
    """The layout ops that produced `value`, nearest first, walking up until another kind of op."""
    nodes = []
    node = value.producer()
    while _is_layout(node) and node not in nodes:
        nodes.append(node)
        node = node.inputs[0].producer()
    return nodes


class RemoveRedundantReshapesPass(Pass):
    """Removes Reshape/Squeeze/Unsqueeze/Flatten chains that end in the shape they started from and
    lets a Reshape to a constant shape skip the reshapes before it (Reshape of Reshape -> one Reshape)."""

    name = "remove-redundant-reshapes"
    requires = ("shapes",)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        removed = 0
        ensure_shapes(model, ctx, set(_LAYOUT_OPS))
        for node in list(model.graph.all_nodes()):
            if node.graph is None or not _is_layout(node):
                continue
            removed += self._skip_inner_reshapes(node, _chain(node.inputs[0]), ctx)
            x, y = node.inputs[0], node.outputs[0]
            chain = _chain(x)
            if _keeps_shape(node):
                if ctx.allow(self.name):
                    bypass(node, x)
                    removed += 1 + remove_dead([x], only=_is_layout)[0]
                continue
            # The furthest value up the chain with this node's shape: everything between is a no-op.
            source = None
            absolute = _absolute_target(node)
            for i, inner in enumerate(chain):
                start = inner.inputs[0]
                if (
                    same_shape(start.shape, y.shape)
                    or (i == 0 and _cancels(node, inner))
                    or (absolute and _reshape_keeps_shape(start, node))
                ):
                    source = start
            if source is not None and ctx.allow(self.name):
                bypass(node, source)
                removed += 1 + remove_dead([x], only=_is_layout)[0]
        return PassResult(model, removed > 0, {"reshapes_removed": removed})

    def _skip_inner_reshapes(self, node: ir.Node, chain: list[ir.Node], ctx: PassContext) -> int:
        """Reshape(Reshape(x, s1), s2) -> Reshape(x, s2) when s2 is a constant that does not copy dims.

        Only where the inner op has no other reader: with another reader it stays, and reading x
        instead of its output would save nothing.
        """
        if not chain or not _absolute_target(node):
            return 0  # a 0 copies a dim of the input, which is another dim once the inner op is gone
        removed = 0
        for inner in chain:
            x = node.inputs[0]
            if x.producer() is not inner or len(x.uses()) != 1 or x.is_graph_output():
                break
            if not self._inner_is_plain(inner) or not ctx.allow(self.name):
                break
            node.replace_input_with(0, inner.inputs[0])
            removed += remove_dead(inner.outputs, only=_is_layout)[0]
        return removed

    @staticmethod
    def _inner_is_plain(inner: ir.Node) -> bool:
        # An inner Reshape with allowzero=1 and a 0 fails on any non-empty tensor; keep that failure.
        if inner.op_type != "Reshape" or not inner.attributes.get_int("allowzero", 0):
            return True
        shape = constant_ints(inner.inputs[1]) if len(inner.inputs) > 1 else None
        return shape is not None and 0 not in shape
