"""Lowering rules that move data without arithmetic: reshapes, transposes, slices, pads, gathers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgec.backends.tflite.lower import TO_NHWC, Lowering, const, normalize_axis, np_type, opset, rule, shape
from edgec.backends.tflite.ops_elementwise import transpose_version
from edgec.backends.tflite.writer import Op, options, tensor_type

_BOOL, _I64 = np.dtype(np.bool_), np.dtype(np.int64)


def reshape(ctx: Lowering, x: int, dims, out: int) -> None:
    ctx.op(Op.RESHAPE, [x, ctx.int32(dims)], [out], options("Reshape", newShape=[int(d) for d in dims]))


def _check_training_dropout(node: ir.Node) -> str | None:
    if node.op_type == "Dropout" and len(node.inputs) > 2 and node.inputs[2] is not None:
        mode = const(node.inputs[2])
        if mode is None or bool(mode.reshape(())):
            return "Dropout in training mode"
    if node.op_type == "Dropout" and len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].uses():
        return "Dropout's mask output is used"
    return None


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout", check=_check_training_dropout)
def lower_reshape(ctx: Lowering, node: ir.Node) -> None:
    """Every static reshape is a RESHAPE to the output's shape (which also resolves Reshape's 0 and -1)."""
    y = node.outputs[0]
    reshape(ctx, ctx.value(node.inputs[0]), shape(y), ctx.define(y))


def transpose(ctx: Lowering, x: int, perm, out: int) -> None:
    version = transpose_version(len(perm))
    if version == 1 and ctx.fm.type(x) == tensor_type(_BOOL):
        version = 3
    ctx.op(Op.TRANSPOSE, [x, ctx.int32(perm, "perm")], [out], version=version)


@rule("Transpose")
def lower_transpose(ctx: Lowering, node: ir.Node) -> None:
    rank = len(shape(node.inputs[0]))
    perm = node.attributes.get_ints("perm", None) or list(reversed(range(rank)))
    transpose(ctx, ctx.value(node.inputs[0]), list(perm), ctx.define(node.outputs[0]))


@rule("Concat", layout="follow")
def lower_concat(ctx: Lowering, node: ir.Node) -> None:
    y = node.outputs[0]
    axis = normalize_axis(node.attributes.get_int("axis"), len(shape(y)))
    if ctx.in_nhwc:
        axis = TO_NHWC.index(axis)
    parts = [ctx.operand(v) for v in node.inputs if v is not None and 0 not in shape(v)]
    ctx.op(Op.CONCATENATION, parts, [ctx.result(y)], options("Concatenation", axis=axis))


def _slice_params(node: ir.Node):
    """(begin, end, strides) over every axis, clamped to the static shape; None when not constant."""
    dims = shape(node.inputs[0])
    rank = len(dims)
    if len(node.inputs) < 3:
        return None
    starts, ends = const(node.inputs[1]), const(node.inputs[2])
    if starts is None or ends is None:
        return None
    given = [node.inputs[i] if len(node.inputs) > i else None for i in (3, 4)]
    axes = const(given[0]) if given[0] is not None else np.arange(len(starts))
    steps = const(given[1]) if given[1] is not None else np.ones(len(starts), np.int64)
    if axes is None or steps is None:
        return None
    begin, end, strides = [0] * rank, list(dims), [1] * rank
    for s, e, a, st in zip(starts.tolist(), ends.tolist(), axes.tolist(), steps.tolist()):
        a, n = normalize_axis(int(a), rank), dims[normalize_axis(int(a), rank)]
        s, e = (s + n if s < 0 else s), (e + n if e < 0 else e)
        if st > 0:
            s, e = min(max(s, 0), n), min(max(e, 0), n)
        else:
            s, e = min(max(s, -1), n - 1), min(max(e, -1), n - 1)
        begin[a], end[a], strides[a] = s, e, int(st)
    return begin, end, strides


def _check_slice(node: ir.Node) -> str | None:
    if opset(node) < 10:
        return "Slice of opset < 10 (attributes instead of inputs)"
    return None if _slice_params(node) is not None else "Slice with bounds computed at run time"


@rule("Slice", check=_check_slice)
def lower_slice(ctx: Lowering, node: ir.Node) -> None:
    begin, end, strides = _slice_params(node)
    x, y = ctx.value(node.inputs[0]), ctx.define(node.outputs[0])
    rank = len(begin)
    if all(s == 1 for s in strides):
        size = [e - b for b, e in zip(begin, end)]
        ctx.op(Op.SLICE, [x, ctx.int32(begin, "begin"), ctx.int32(size, "size")], [y], options("Slice"),
               version=5 if rank > 4 else 1)
        return
    # A negative stride that runs past index 0 has no end index: the end mask says "to the edge".
    end_mask = sum(1 << i for i, (e, s) in enumerate(zip(end, strides)) if s < 0 and e == -1)
    ctx.op(Op.STRIDED_SLICE, [x, ctx.int32(begin, "begin"), ctx.int32(end, "end"), ctx.int32(strides, "strides")],
           [y], options("StridedSlice", endMask=end_mask), version=4 if rank > 4 else 1)


@rule("Split")
def lower_split(ctx: Lowering, node: ir.Node) -> None:
    x = node.inputs[0]
    axis = normalize_axis(node.attributes.get_int("axis", 0), len(shape(x)))
    sizes = [shape(y)[axis] for y in node.outputs]
    outs = [ctx.define(y) for y in node.outputs]
    ctx.op(Op.SPLIT_V, [ctx.value(x), ctx.int32(sizes, "sizes"), ctx.const(np.int32(axis), hint="axis")], outs,
           options("SplitV", numSplits=len(outs)))


def _pads(node: ir.Node) -> np.ndarray | None:
    """[rank, 2] (before, after) pads, or None when they are not constant."""
    rank = len(shape(node.inputs[0]))
    raw = const(node.inputs[1]) if opset(node) >= 11 else np.asarray(node.attributes.get_ints("pads", []))
    if raw is None:
        return None
    axes = list(range(rank))
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        given = const(node.inputs[3])
        if given is None:
            return None
        axes = [normalize_axis(int(a), rank) for a in given.reshape(-1)]
    raw = raw.reshape(2, len(axes))
    pads = np.zeros((rank, 2), np.int32)
    for i, a in enumerate(axes):
        pads[a] = raw[0, i], raw[1, i]
    return pads


def _pad_value(node: ir.Node):
    if opset(node) < 11:
        return np.asarray(node.attributes.get_float("value", 0.0), np.float32)
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        return const(node.inputs[2])
    return np.zeros((), np_type(node.inputs[0]))


def _check_pad(node: ir.Node) -> str | None:
    mode = node.attributes.get_string("mode", "constant")
    pads = _pads(node)
    if pads is None:
        return "Pad with pads computed at run time"
    if (pads < 0).any():
        return "Pad with negative pads (a crop)"
    if mode == "reflect":
        return None
    if mode != "constant":
        return f"Pad in mode {mode!r} (TFLite pads with a constant or by reflection)"
    if _pad_value(node) is None:
        return "Pad with a value computed at run time"
    return None


@rule("Pad", check=_check_pad)
def lower_pad(ctx: Lowering, node: ir.Node) -> None:
    pads = _pads(node)
    x, y = ctx.value(node.inputs[0]), ctx.define(node.outputs[0])
    rank = len(pads)
    paddings = ctx.const(pads, hint="paddings")
    version = 4 if rank > 4 else 1
    if node.attributes.get_string("mode", "constant") == "reflect":
        ctx.op(Op.MIRROR_PAD, [x, paddings], [y], options("MirrorPad", mode=0), version=2 if rank > 4 else 1)
        return
    value = np.asarray(_pad_value(node)).astype(np_type(node.inputs[0])).reshape(())
    if not value.any():
        ctx.op(Op.PAD, [x, paddings], [y], options("Pad"), version=version)
    else:
        ctx.op(Op.PADV2, [x, paddings, ctx.const(value, hint="pad_value")], [y], options("PadV2"), version=version)


@rule("Expand")
def lower_expand(ctx: Lowering, node: ir.Node) -> None:
    x, y = ctx.value(node.inputs[0]), ctx.define(node.outputs[0])
    dims = ctx.shape(y)
    if ctx.shape(x) == dims:
        reshape(ctx, x, dims, y)
    else:
        ctx.op(Op.BROADCAST_TO, [x, ctx.int32(dims)], [y], version=2)


def _check_tile(node: ir.Node) -> str | None:
    return None if const(node.inputs[1]) is not None else "Tile with repeats computed at run time"


@rule("Tile", check=_check_tile)
def lower_tile(ctx: Lowering, node: ir.Node) -> None:
    repeats = const(node.inputs[1]).reshape(-1)
    ctx.op(Op.TILE, [ctx.value(node.inputs[0]), ctx.int32(repeats, "multiples")], [ctx.define(node.outputs[0])])


# --- gathers ---------------------------------------------------------------------------------------

def _indices(ctx: Lowering, value: ir.Value, dim: int) -> int:
    """The index tensor; constant indices get ONNX's negative indices resolved (TFLite has none).

    Indices computed at run time are taken as they come: token ids and positions are never negative."""
    array = const(value)
    if array is None:
        return ctx.value(value)
    return ctx.const(np.where(array < 0, array + dim, array).astype(array.dtype), hint="indices")


@rule("Gather")
def lower_gather(ctx: Lowering, node: ir.Node) -> None:
    data, indices = node.inputs
    dims = shape(data)
    axis = normalize_axis(node.attributes.get_int("axis", 0), len(dims))
    version = 3 if np_type(data) == _BOOL else 1
    ctx.op(Op.GATHER, [ctx.value(data), _indices(ctx, indices, dims[axis])], [ctx.define(node.outputs[0])],
           options("Gather", axis=axis), version=version)


def _check_gather_nd(node: ir.Node) -> str | None:
    if node.attributes.get_int("batch_dims", 0):
        return "GatherND with batch_dims (TFLite's GATHER_ND has none)"
    return None


@rule("GatherND", check=_check_gather_nd)
def lower_gather_nd(ctx: Lowering, node: ir.Node) -> None:
    data, indices = node.inputs
    version = 5 if np_type(data) == _BOOL else 1
    ctx.op(Op.GATHER_ND, [ctx.value(data), ctx.value(indices)], [ctx.define(node.outputs[0])], version=version)


@rule("GatherElements")
def lower_gather_elements(ctx: Lowering, node: ir.Node) -> None:
    """out[i, j, ..] = data[.., index[i, j, ..] on `axis`, ..]: a GATHER_ND whose coordinates are the
    output's own position on every other axis, known statically, and the index on `axis`."""
    data, indices = node.inputs
    dims = shape(indices)
    rank = len(dims)
    axis = normalize_axis(node.attributes.get_int("axis", 0), rank)
    grid = np.indices(dims, dtype=np.int64)  # [rank, *dims]: each position's coordinates
    array = const(indices)
    if array is not None:
        grid[axis] = np.where(array < 0, array + shape(data)[axis], array)
        coords = ctx.const(np.moveaxis(grid, 0, -1), hint="coordinates")
    else:
        index = ctx.value(indices)
        if ctx.fm.type(index) != tensor_type(_I64):
            wide = ctx.temp(dims, np.int64, "index64")
            ctx.op(Op.CAST, [index], [wide], options("Cast", inDataType=ctx.fm.type(index),
                                                     outDataType=tensor_type(_I64)))
            index = wide
        column = ctx.temp((*dims, 1), np.int64, "index")
        reshape(ctx, index, (*dims, 1), column)
        parts = []
        for a in range(rank):
            parts.append(column if a == axis else ctx.const(grid[a][..., None], hint=f"axis{a}"))
        coords = ctx.temp((*dims, rank), np.int64, "coordinates")
        ctx.op(Op.CONCATENATION, parts, [coords], options("Concatenation", axis=rank))
    version = 5 if np_type(data) == _BOOL else 1
    ctx.op(Op.GATHER_ND, [ctx.value(data), coords], [ctx.define(node.outputs[0])], version=version)

