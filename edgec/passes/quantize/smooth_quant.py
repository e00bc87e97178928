"""smooth-quant: moves activation outliers into the weights before quantization (Xiao et al., 2023).

Transformer activations carry a few channels hundreds of times larger than the rest (LayerNorm
outputs, GELU outputs); one per-tensor scale then spends the int8 levels on them and rounds every
other channel to a handful of values. For a MatMul X·W, X·W = (X·diag(1/s))·(diag(s)·W) for any
positive s: with s_j = max|X_j|^α / max|W_j|^(1-α) the activation's channels come out even, and
the weights, quantized per output channel, absorb the spread.

The per-channel 1/s is a Mul inserted on the path to the MatMuls only (other readers, such as a
post-LayerNorm residual Add, keep the unscaled value); every MatMul reading the same activation gets
its rows scaled by the same s. Channel maxima come from calibration (`ctx.options[CHANNEL_ABSMAX_KEY]`).

One alpha does not fit every activation (edgec.quantize.smoothing measures the best one per
activation); `ctx.options[SMOOTH_ALPHAS_KEY]`, activation name -> alpha, smooths exactly those
activations, each with its own alpha, in place of the pass's single `alpha`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgec.errors import UserError
from edgec.passes.cleanup._util import add_initializer, constant_array, is_onnx_op, remove_dead
from edgec.passes.core import Pass, PassContext, PassResult

CHANNEL_ABSMAX_KEY = "channel_absmax"
SMOOTH_ALPHAS_KEY = "smooth_alphas"
SMOOTH_KEY = "edgec.smooth_quant"  # node metadata on the inserted Mul: a second run leaves it alone
SCALE_LIMIT = 1e4  # the most a channel is scaled either way: beyond it float32 weights lose their own precision


@dataclass
class SmoothQuantOptions:
    alpha: float = 0.5  # the share of each channel's spread moved into the weights (the paper's migration strength)
    exclude: tuple[str, ...] = ()  # MatMul node names left alone


def readers(value: ir.Value, options: SmoothQuantOptions) -> list[ir.Node] | None:
    """The MatMuls with a constant [in, out] weight that read `value` as their left operand, or None
    when `value` is already smoothed or has none."""
    producer = value.producer()
    if producer is not None and SMOOTH_KEY in producer.metadata_props:
        return None
    found = []
    width = value.shape[-1] if value.shape is not None and len(value.shape) else None
    for user, index in value.uses():
        if index != 0 or not is_onnx_op(user, "MatMul") or user.name in options.exclude:
            continue
        weight = constant_array(user.inputs[1])
        if weight is None or weight.ndim != 2 or not np.issubdtype(weight.dtype, np.floating) or weight.shape[0] != width:
            continue
        found.append(user)
    return found or None


def smooth_scale(channel_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_c = max|X_c|^alpha / max|W_c|^(1-alpha); 1 where a channel (or its weight row) is all zeros."""
    live = (channel_absmax > 0) & (weight_absmax > 0)
    scale = np.ones(channel_absmax.shape, np.float64)
    scale[live] = channel_absmax[live] ** alpha / weight_absmax[live] ** (1 - alpha)
    return np.clip(scale, 1 / SCALE_LIMIT, SCALE_LIMIT)


def smoothable(model: ir.Model, options: SmoothQuantOptions | None = None) -> list[str]:
    """The activations smooth-quant would scale: the tensors calibration must measure per channel."""
    from edgec.analysis.shapes import ensure_shapes

    options = options or SmoothQuantOptions()
    ensure_shapes(model)  # the channel count is the activation's last dim
    seen: dict[str, None] = {}
    for node in model.graph:
        if is_onnx_op(node, "MatMul") and node.inputs[0] is not None and node.inputs[0].name not in seen:
            if readers(node.inputs[0], options):
                seen[node.inputs[0].name] = None
    return list(seen)


class SmoothQuantPass(Pass):
    """Migrates activation outliers into MatMul weights (SmoothQuant) so per-tensor int8 keeps them."""

    name = "smooth-quant"
    Options = SmoothQuantOptions
    preserves = ("shapes",)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        if not 0.0 <= self.options.alpha <= 1.0:
            raise UserError(f"smooth-quant alpha={self.options.alpha} is outside [0, 1]", "use e.g. alpha=0.5")
        absmax = ctx.options.get(CHANNEL_ABSMAX_KEY)
        alphas = ctx.options.get(SMOOTH_ALPHAS_KEY)
        targets = smoothable(model, self.options)
        if alphas is not None:
            targets = [name for name in targets if name in alphas]
        stats = {"activations_smoothed": 0, "weights_scaled": 0, "max_scale": 0.0}
        if not targets:
            return PassResult(model, False, stats)
        if absmax is None:
            raise UserError("smooth-quant needs per-channel activation maxima from calibration",
                            "run it inside a compile with --precision int8 --calib DATA.npz")
        values = {v.name: v for node in model.graph for v in node.outputs if v.name}
        values.update({v.name: v for v in model.graph.inputs})
        values.update(model.graph.initializers)
        for name in targets:
            channel = absmax.get(name)
            matmuls = readers(values[name], self.options)
            if channel is None or matmuls is None or not ctx.allow(self.name):
                continue
            alpha = self.options.alpha if alphas is None else float(alphas[name])
            scale = self._scale(np.asarray(channel, np.float64), matmuls, alpha)
            if scale is None:
                continue
            self._apply(model, values[name], matmuls, scale)
            stats["activations_smoothed"] += 1
            stats["weights_scaled"] += len(matmuls)
            stats["max_scale"] = max(stats["max_scale"], float(np.max(np.maximum(scale, 1 / scale))))
        return PassResult(model, stats["activations_smoothed"] > 0, stats)

    @staticmethod
    def _scale(channel: np.ndarray, matmuls: list[ir.Node], alpha: float) -> np.ndarray | None:
        weight_max = np.max([np.abs(constant_array(r.inputs[1])).max(axis=1) for r in matmuls], axis=0).astype(np.float64)
        if channel.shape != weight_max.shape or not np.all(np.isfinite(channel)) or not 0.0 <= alpha <= 1.0:
            return None
        return smooth_scale(channel, weight_max, alpha)

    def _apply(self, model: ir.Model, x: ir.Value, readers: list[ir.Node], scale: np.ndarray) -> None:
        graph = model.graph
        dtype = x.dtype.numpy()
        inverse = add_initializer(graph, (1.0 / scale).astype(dtype))
        smoothed = ir.node("Mul", [x, inverse], metadata_props={SMOOTH_KEY: "1"})
        smoothed.outputs[0].shape, smoothed.outputs[0].type = (x.shape.copy() if x.shape is not None else None), x.type
        graph.insert_before(min(readers, key=graph.index), smoothed)
        for reader in readers:
            old = reader.inputs[1]
            weight = constant_array(old)
            # A new initializer per reader: the old one may be shared, and is never edited in place.
            reader.replace_input_with(1, add_initializer(graph, (weight * scale[:, None]).astype(weight.dtype)))
            reader.replace_input_with(0, smoothed.outputs[0])
            remove_dead([old])
