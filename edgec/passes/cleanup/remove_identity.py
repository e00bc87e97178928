"""remove-identity: drops Identity, inference-mode Dropout and ops that provably return their input.

A no-op Expand is simplify-shapes' to remove: its target is usually computed from run-time dims,
which only simplify-shapes' symbolic facts can compare with the input's.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_ir as ir

from edgec.passes.cleanup._util import (
    MAX_CONSTANT_ELEMENTS,
    bypass,
    can_take_name,
    constant_array,
    constant_ints,
    ensure_shapes,
    is_onnx_op,
    rank,
    same_shape,
)
from edgec.passes.core import Pass, PassContext, PassResult

# A Slice end at least this large reaches the end of any axis a real tensor can have.
SLICE_TO_END = 1 << 62


# --- the rules: node -> the value it provably equals, or None ----------------------------------

def _identity(node: ir.Node) -> ir.Value | None:
    return node.inputs[0] if node.inputs else None


def _dropout(node: ir.Node) -> ir.Value | None:
    training = node.inputs[2] if len(node.inputs) > 2 else None
    if training is not None:
        flag = constant_array(training)
        if flag is None or flag.size != 1 or bool(flag.reshape(-1)[0]):
            return None
    mask = node.outputs[1] if len(node.outputs) > 1 else None
    if mask is not None and (mask.uses() or mask.is_graph_output()):
        return None  # the mask is read: it is all true in inference, but that is a tensor to build
    return node.inputs[0]


def _broadcasts_into(x: ir.Value, other_shape: tuple[int, ...]) -> bool:
    """Whether broadcasting x with a tensor of `other_shape` leaves x's shape unchanged."""
    if x.shape is None or len(other_shape) > len(x.shape):
        return False
    x_dims = list(x.shape)[len(x.shape) - len(other_shape):]
    return all(d == 1 or (isinstance(xd, int) and xd == d) for xd, d in zip(x_dims, other_shape))


def _neutral_operand(node: ir.Node, neutral: float, positions: tuple[int, ...]) -> ir.Value | None:
    """For x op c with c a constant filled with `neutral`: x, when c changes neither shape nor dtype."""
    if len(node.inputs) != 2 or any(v is None for v in node.inputs):
        return None
    for pos in positions:
        const, x = node.inputs[pos], node.inputs[1 - pos]
        array = constant_array(const, MAX_CONSTANT_ELEMENTS)
        if array is None or x.dtype is None or ir.DataType.from_numpy(array.dtype) != x.dtype:
            continue  # an int x times a float 1.0 would change the type (and is not valid ONNX)
        if array.size and np.all(array == neutral) and _broadcasts_into(x, array.shape):
            return x
    return None


def _add(node: ir.Node) -> ir.Value | None:
    # x + (+0.0) turns -0.0 into +0.0: numerically equal, and only the sign of zero can differ.
    return _neutral_operand(node, 0, (1, 0))


def _sub(node: ir.Node) -> ir.Value | None:
    return _neutral_operand(node, 0, (1,))


def _mul(node: ir.Node) -> ir.Value | None:
    return _neutral_operand(node, 1, (1, 0))


def _div(node: ir.Node) -> ir.Value | None:
    return _neutral_operand(node, 1, (1,))


def _tile(node: ir.Node) -> ir.Value | None:
    x, out = node.inputs[0], node.outputs[0]
    repeats = constant_ints(node.inputs[1])
    if repeats is not None and all(r == 1 for r in repeats):
        return x
    # Equal shapes mean every repeat is 1 (or the axis is empty): the same tensor either way.
    return x if same_shape(x.shape, out.shape) else None


def _pad(node: ir.Node) -> ir.Value | None:
    pads = constant_ints(node.inputs[1]) if len(node.inputs) > 1 else None
    return node.inputs[0] if pads is not None and all(p == 0 for p in pads) else None


def _slice(node: ir.Node) -> ir.Value | None:
    data = node.inputs[0]
    inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
    starts, ends = constant_ints(inputs[1]), constant_ints(inputs[2])
    axes = constant_ints(inputs[3]) if inputs[3] is not None else None
    steps = constant_ints(inputs[4]) if inputs[4] is not None else None
    if (inputs[4] is not None and steps is None) or (steps is not None and any(s != 1 for s in steps)):
        return None  # a step other than 1 drops or reverses elements
    if same_shape(data.shape, node.outputs[0].shape):
        return data  # step 1 and nothing cut off: the whole tensor
    r = rank(data)
    if starts is None or ends is None or r is None or len(starts) != len(ends):
        return None
    if inputs[3] is None:
        axes = list(range(len(starts)))
    if axes is None or len(axes) != len(starts):
        return None
    for start, end, axis in zip(starts, ends, axes):
        dim = data.shape[axis % r] if -r <= axis < r else None
        if dim is None:
            return None
        whole_start = start == 0 or (isinstance(dim, int) and start <= -dim)
        whole_end = end >= SLICE_TO_END or (isinstance(dim, int) and end >= dim)
        if not (whole_start and whole_end):
            return None
    return data


def _concat(node: ir.Node) -> ir.Value | None:
    return node.inputs[0] if len(node.inputs) == 1 else None


# op_type -> (rule, the stat it counts in). Named so each can be documented, counted and tested alone.
RULES: dict[str, tuple[Callable[[ir.Node], ir.Value | None], str]] = {
    "Identity": (_identity, "identities_removed"),
    "Dropout": (_dropout, "dropouts_removed"),
    "Add": (_add, "noops_removed"),
    "Sub": (_sub, "noops_removed"),
    "Mul": (_mul, "noops_removed"),
    "Div": (_div, "noops_removed"),
    "Tile": (_tile, "noops_removed"),
    "Pad": (_pad, "noops_removed"),
    "Slice": (_slice, "noops_removed"),
    "Concat": (_concat, "noops_removed"),
}
# Rules that read inferred shapes or types.
_NEEDS_SHAPES = {"Add", "Sub", "Mul", "Div", "Tile", "Slice"}


class RemoveIdentityPass(Pass):
    """Removes Identity, inference-mode Dropout and exact no-ops (Tile to the same shape, zero Pad,
    whole-tensor Slice, +0, -0, *1, /1 that keep shape and type, one-input Concat)."""

    name = "remove-identity"
    requires = ("shapes",)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        stats = {"identities_removed": 0, "dropouts_removed": 0, "noops_removed": 0}
        ensure_shapes(model, ctx, _NEEDS_SHAPES)
        for node in list(model.graph.all_nodes()):
            if node.graph is None or not is_onnx_op(node, *RULES):
                continue
            rule, stat = RULES[node.op_type]
            replacement = rule(node)
            if replacement is None:
                continue
            output = node.outputs[0]
            if node.op_type == "Identity" and output.is_graph_output() and not can_take_name(replacement, node.graph):
                continue  # this Identity is what keeps the output's name: it is needed
            if not ctx.allow(self.name):
                continue
            bypass(node, replacement)
            stats[stat] += 1
        return PassResult(model, any(stats.values()), stats)
