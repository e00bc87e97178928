"""Lowering rules for image ops: ONNX is NCHW, TFLite's convolutions, pools and resizes are NHWC. These
rules read and write NHWC tensors; the context transposes where a value meets a rule of the other layout
(see `plan_layout`), so a chain of convolutions and activations runs without transposes."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from edgec.backends.tflite.lower import TO_NHWC, Lowering, const, np_type, opset, rule, shape
from edgec.backends.tflite.writer import Op, options, schema

F32 = np.dtype(np.float32)
SAME, VALID = schema.Padding.SAME, schema.Padding.VALID


def _window(node: ir.Node, kernel) -> tuple[list[int], list[int], list[int]]:
    """(strides, dilations, pads as [top, left, bottom, right]) with auto_pad resolved."""
    strides = list(node.attributes.get_ints("strides", [1, 1]))
    dilations = list(node.attributes.get_ints("dilations", [1, 1]))
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    size = shape(node.inputs[0])[2:]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * 4
        for i, (n, k, s, d) in enumerate(zip(size, kernel, strides, dilations)):
            total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
            before = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            pads[i], pads[i + 2] = before, total - before
    elif auto_pad == "VALID":
        pads = [0] * 4
    else:
        pads = list(node.attributes.get_ints("pads", [0] * 4))
    return strides, dilations, pads


def _tflite_padding(node: ir.Node, kernel, strides, dilations, pads) -> int | None:
    """SAME or VALID when one of them pads exactly as the node does (TFLite's SAME puts the odd pixel
    after, like SAME_UPPER); None when explicit padding is needed."""
    if not any(pads):
        return VALID
    size = shape(node.inputs[0])[2:]
    same = []
    for n, k, s, d in zip(size, kernel, strides, dilations):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        same.append((total // 2, total - total // 2))
    if pads == [same[0][0], same[1][0], same[0][1], same[1][1]]:
        return SAME
    return None


def _pad_nhwc(ctx: Lowering, x: int, pads, value: float = 0.0) -> int:
    n, h, w, c = ctx.shape(x)
    top, left, bottom, right = pads
    padded = ctx.temp((n, h + top + bottom, w + left + right, c), F32, "padded")
    paddings = ctx.const(np.array([[0, 0], [top, bottom], [left, right], [0, 0]], np.int32), hint="paddings")
    if value == 0.0:
        ctx.op(Op.PAD, [x, paddings], [padded], options("Pad"))
    else:
        ctx.op(Op.PADV2, [x, paddings, ctx.const(np.float32(value), hint="pad_value")], [padded], options("PadV2"))
    return padded


def _check_image(node: ir.Node) -> str | None:
    if len(shape(node.inputs[0])) != 4:
        return f"{node.op_type} of a {len(shape(node.inputs[0]))}-D input (2-D images, NCHW, lower)"
    if np_type(node.inputs[0]) != F32:
        return f"{node.op_type} of {np_type(node.inputs[0])}"
    return None


# --- convolution -----------------------------------------------------------------------------------

def _check_conv(node: ir.Node) -> str | None:
    problem = _check_image(node)
    if problem:
        return problem
    weight = const(node.inputs[1])
    if weight is None:
        return "Conv with weights computed at run time"
    if len(node.inputs) > 2 and node.inputs[2] is not None and const(node.inputs[2]) is None:
        return "Conv with a bias computed at run time"
    group = node.attributes.get_int("group", 1)
    channels = shape(node.inputs[0])[1]
    if group not in (1, channels):
        return f"Conv with {group} groups of {channels} channels (only dense and depthwise lower)"
    return None


@rule("Conv", check=_check_conv, layout="nhwc")
def lower_conv(ctx: Lowering, node: ir.Node) -> None:
    w = const(node.inputs[1])
    m, _, kh, kw = w.shape
    strides, dilations, pads = _window(node, (kh, kw))
    padding = _tflite_padding(node, (kh, kw), strides, dilations, pads)
    x = ctx.nhwc(node.inputs[0])
    if padding is None:
        x, padding = _pad_nhwc(ctx, x, pads), VALID
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    if bias_value is not None:
        bias = ctx.value(bias_value)
    else:
        bias = ctx.const(np.zeros(m, np.float32), hint="bias")
    geometry = dict(padding=padding, strideH=strides[0], strideW=strides[1],
                    dilationHFactor=dilations[0], dilationWFactor=dilations[1])
    group, channels = node.attributes.get_int("group", 1), shape(node.inputs[0])[1]
    if group == 1:
        filt = ctx.weight(node.inputs[1], np.ascontiguousarray(w.transpose(0, 2, 3, 1)), "ohwi")
        code, opts, version = Op.CONV_2D, options("Conv2D", **geometry), 1
    else:  # depthwise: output channel c * multiplier + k reads input channel c, as in ONNX's groups
        filt = ctx.weight(node.inputs[1], np.ascontiguousarray(w.transpose(1, 2, 3, 0)), "1hwo")
        code = Op.DEPTHWISE_CONV_2D
        opts = options("DepthwiseConv2D", depthMultiplier=m // channels, **geometry)
        version = 2 if dilations != [1, 1] else 1
    ctx.op(code, [x, filt, bias], [ctx.define_nhwc(node.outputs[0])], opts, version=version)


# --- pooling ---------------------------------------------------------------------------------------

def _pool_plan(node: ir.Node):
    """(kernel, strides, pads, padding) where padding is SAME, VALID or None (explicit pad first)."""
    kernel = list(node.attributes.get_ints("kernel_shape"))
    strides, dilations, pads = _window(node, kernel)
    return kernel, strides, pads, _tflite_padding(node, kernel, strides, [1, 1], pads)


def _check_pool(node: ir.Node) -> str | None:
    problem = _check_image(node)
    if problem:
        return problem
    if node.attributes.get_int("ceil_mode", 0):
        return f"{node.op_type} with ceil_mode"
    if list(node.attributes.get_ints("dilations", [1, 1])) != [1, 1]:
        return f"{node.op_type} with dilations"
    if len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].uses():
        return "MaxPool's indices output is used"
    _, _, pads, padding = _pool_plan(node)
    include_pad = node.attributes.get_int("count_include_pad", 0)
    if node.op_type == "AveragePool" and any(pads) and padding != SAME and not include_pad:
        # TFLite's SAME averages over the real pixels only; explicit zero pads would count as pixels.
        return "AveragePool excluding pads from the average, padded other than TFLite's SAME"
    return None


@rule("MaxPool", "AveragePool", check=_check_pool, layout="nhwc")
def lower_pool(ctx: Lowering, node: ir.Node) -> None:
    kernel, strides, pads, padding = _pool_plan(node)
    is_max = node.op_type == "MaxPool"
    x = ctx.nhwc(node.inputs[0])
    include_pad = not is_max and any(pads) and node.attributes.get_int("count_include_pad", 0)
    if padding is None or include_pad:
        x, padding = _pad_nhwc(ctx, x, pads, float(np.finfo(np.float32).min) if is_max else 0.0), VALID
    opts = options("Pool2D", padding=padding, strideH=strides[0], strideW=strides[1],
                   filterHeight=kernel[0], filterWidth=kernel[1])
    code = Op.MAX_POOL_2D if is_max else Op.AVERAGE_POOL_2D
    ctx.op(code, [x], [ctx.define_nhwc(node.outputs[0])], opts)


@rule("GlobalAveragePool", "GlobalMaxPool", check=_check_image, layout="nhwc")
def lower_global_pool(ctx: Lowering, node: ir.Node) -> None:
    code = Op.MEAN if node.op_type == "GlobalAveragePool" else Op.REDUCE_MAX
    ctx.op(code, [ctx.nhwc(node.inputs[0]), ctx.int32([1, 2], "axes")], [ctx.define_nhwc(node.outputs[0])],
           options("Reducer", keepDims=True))


# --- resize ----------------------------------------------------------------------------------------

# (mode, coordinate_transformation_mode, nearest_mode or None) -> (align_corners, half_pixel_centers)
_RESIZE_MODES = {
    ("linear", "half_pixel", None): (False, True),
    ("linear", "pytorch_half_pixel", None): (False, True),  # the same except for outputs of size 1
    ("linear", "align_corners", None): (True, False),
    ("linear", "asymmetric", None): (False, False),
    ("nearest", "asymmetric", "floor"): (False, False),
    # TFLite's half-pixel nearest takes floor((o + 0.5) * scale): ONNX's half_pixel rounded half up.
    ("nearest", "half_pixel", "round_prefer_ceil"): (False, True),
    ("nearest", "align_corners", "round_prefer_ceil"): (True, False),
}


def _resize_key(node: ir.Node):
    mode = node.attributes.get_string("mode", "nearest")
    coords = node.attributes.get_string("coordinate_transformation_mode", "half_pixel")
    nearest = node.attributes.get_string("nearest_mode", "round_prefer_floor") if mode == "nearest" else None
    return mode, coords, nearest


def _check_resize(node: ir.Node) -> str | None:
    problem = _check_image(node)
    if problem:
        return problem
    if opset(node) < 11:
        return "Resize of opset < 11"
    key = _resize_key(node)
    if key not in _RESIZE_MODES:
        return "Resize mode={} coordinate_transformation_mode={}{} (no TFLite equivalent)".format(
            key[0], key[1], f" nearest_mode={key[2]}" if key[2] else "")
    x, y = shape(node.inputs[0]), shape(node.outputs[0])
    if x[:2] != y[:2]:
        return "Resize of the batch or channel axis"
    if key[1] == "pytorch_half_pixel" and 1 in y[2:]:
        return "Resize pytorch_half_pixel to a size of 1"
    if node.attributes.get_int("antialias", 0) and any(o < i for i, o in zip(x[2:], y[2:])):
        return "Resize with antialias when downscaling"
    scales = const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if scales is not None and scales.size and any(i * s != o for i, s, o in zip(x[2:], scales[2:], y[2:])):
        # ONNX maps coordinates with the given scale; TFLite with output / input size.
        return "Resize by a scale that is not the ratio of its sizes"
    return None


@rule("Resize", check=_check_resize, layout="nhwc")
def lower_resize(ctx: Lowering, node: ir.Node) -> None:
    align, half = _RESIZE_MODES[_resize_key(node)]
    mode = node.attributes.get_string("mode", "nearest")
    x = ctx.nhwc(node.inputs[0])
    size = ctx.int32(shape(node.outputs[0])[2:], "size")
    flags = dict(alignCorners=align, halfPixelCenters=half)
    if mode == "linear":
        code, opts, version = Op.RESIZE_BILINEAR, options("ResizeBilinear", **flags), 3 if half else 1
    else:
        code, opts = Op.RESIZE_NEAREST_NEIGHBOR, options("ResizeNearestNeighbor", **flags)
        version = 3 if (align or half) else 1
    ctx.op(code, [x, size], [ctx.define_nhwc(node.outputs[0])], opts, version=version)
