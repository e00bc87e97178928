"""fuse-layer-norm: a LayerNorm the exporter wrote as arithmetic (ReduceMean, Sub, Pow, Sqrt, Div, Mul,
Add) becomes one ONNX LayerNormalization, once running its subgraph has proven what it computes."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from edgec.analysis.attention import _values_by_name, nodes_between
from edgec.analysis.structure import Norm, check_norm
from edgec.passes.cleanup._util import add_initializer, constant_array, take_over
from edgec.passes.core import Pass, PassContext, PassResult

logger = logging.getLogger(__name__)

T = ir.DataType
# The types ONNX LayerNormalization computes in.
NORM_TYPES = (T.FLOAT16, T.BFLOAT16, T.FLOAT, T.DOUBLE)
# check_norm's difference allowed per unit of output scale: float32 arithmetic differs from the
# float64 reference by ~1e-6; a wrong epsilon, axis or weight by far more.
PROOF_TOLERANCE = 1e-4


def proven(model: ir.Model, norm: Norm, values: dict[str, ir.Value]) -> bool:
    """Whether the norm's original subgraph, run in onnxruntime, computes edgec's canonical norm of its
    record within PROOF_TOLERANCE of the output's scale (what a unit normalized value becomes)."""
    try:
        difference = check_norm(model, norm, np.random.default_rng(0))
    except Exception:  # a subgraph onnxruntime cannot run (or that reads more than its input) is not proven
        return False
    scale = _max_abs(values.get(norm.weight)) if norm.weight else 1.0
    if norm.bias:
        scale += _max_abs(values.get(norm.bias))
    return difference <= PROOF_TOLERANCE * max(1.0, scale)


def exposed(model: ir.Model, input: str, output: str) -> bool:
    """Whether a value computed between `input` and `output`, other than `output`, is a graph output: the
    analyses check that no node outside a match reads its values, not that the graph does not return them."""
    nodes, _ = nodes_between(model, [input], output)
    return any(v.is_graph_output() for node in nodes for v in node.outputs if v.name != output)


def _max_abs(value: ir.Value | None) -> float:
    array = constant_array(value)
    return float(np.abs(array).max()) if array is not None and array.size else 0.0


def alive(value: ir.Value | None, graph: ir.Graph) -> bool:
    """Whether `value` is still part of `graph`: an earlier rewrite of the same run may have removed it."""
    if value is None:
        return False
    if value.is_graph_input() or value.is_initializer():
        return True
    producer = value.producer()
    return producer is not None and producer.graph is graph


def affine_vector(value: ir.Value | None, width: int | ir.SymbolicDim | None, dtype: ir.DataType | None,
                  fill: float) -> ir.Value | np.ndarray | None:
    """A norm's weight (or bias) as the 1-D vector of `width` a fused norm op takes: the value itself, or
    the array of a new initializer (`fill` everywhere when there is none, its scalar repeated when it
    is one). None when it cannot be such a vector. Nothing is added to the graph here: see `vector`."""
    static = width if isinstance(width, int) else None
    if value is None:
        return None if static is None else np.full(static, fill, dtype.numpy())
    array = constant_array(value)
    if array is None or value.dtype != dtype:
        return None
    if array.ndim == 1 and (static is None or array.shape[0] == static):
        # A symbolic width is the weight's length: Mul broadcasts [..., 1] too, but no norm is that narrow.
        return value
    if array.size == 1 and static is not None:
        return np.full(static, array.reshape(-1)[0], array.dtype)
    return None


def vector(graph: ir.Graph, planned: ir.Value | np.ndarray) -> ir.Value:
    """The value `affine_vector` planned, adding its initializer when it is a new one."""
    return add_initializer(graph, planned) if isinstance(planned, np.ndarray) else planned


Planned = ir.Value | np.ndarray  # an existing value, or the array of an initializer still to add


def _plan(model: ir.Model, norm: Norm, values: dict[str, ir.Value]) -> tuple[Planned, Planned | None] | str:
    """(scale, bias) of the LayerNormalization replacing the norm, or why there can be none."""
    x, out = values.get(norm.input), values.get(norm.output)
    if x is None or out is None or x.shape is None or len(x.shape) == 0:
        return "its input has no known shape"
    if x.dtype not in NORM_TYPES:
        return f"LayerNormalization does not take {x.dtype}"
    if out.dtype != x.dtype:
        return f"it reads {x.dtype} and returns {out.dtype}"
    if exposed(model, norm.input, norm.output):
        return "a value inside it is a graph output"
    width = x.shape[-1]
    scale = affine_vector(values.get(norm.weight) if norm.weight else None, width, x.dtype, 1.0)
    bias = affine_vector(values[norm.bias], width, x.dtype, 0.0) if norm.bias else None
    if scale is None or (norm.bias and bias is None):
        return "its weight or bias is not a vector of its width (or the width is not static)"
    return scale, bias


class FuseLayerNormPass(Pass):
    """Fuses each proven decomposed LayerNorm into one LayerNormalization (RMSNorms stay: opset 20 has none)."""

    name = "fuse-layer-norm"
    requires = ("norms",)
    preserves = ("shapes",)  # every value a rewrite adds takes the type and shape of the one it replaces

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        norms = ctx.analyses.get("norms", model)
        values = _values_by_name(model)
        stats = {"layer_norms_fused": 0, "rms_norms_left": 0, "unproven": 0, "unsupported": 0}
        chosen = []
        # Every proof runs before the first rewrite: check_norm extracts the subgraph by value names.
        for norm in norms:
            if norm.form != "decomposed":
                continue
            if norm.kind == "rmsnorm":
                stats["rms_norms_left"] += 1
                continue
            if not proven(model, norm, values):
                logger.debug("%s: the LayerNorm ending in %s is not proven", self.name, norm.output)
                stats["unproven"] += 1
                continue
            plan = _plan(model, norm, values)
            if isinstance(plan, str):
                logger.debug("%s: the LayerNorm ending in %s is left alone: %s", self.name, norm.output, plan)
                stats["unsupported"] += 1
                continue
            chosen.append((norm, plan))
        for norm, (scale, bias) in chosen:
            x, out = values[norm.input], values[norm.output]
            if not alive(x, graph) or not alive(out, graph) or not ctx.allow(self.name):
                continue
            inputs = [x, vector(graph, scale)] + ([vector(graph, bias)] if bias is not None else [])
            # The epsilon as a float attribute stores it, so that a golden graph written in text compares equal.
            epsilon = float(np.float32(norm.epsilon))
            fused = ir.node("LayerNormalization", inputs, {"axis": -1, "epsilon": epsilon})
            graph.insert_before(out.producer(), fused)  # after the norm's input and weights
            take_over(out, fused.outputs[0])
            values[norm.output] = fused.outputs[0]  # a later match may read it by that name
            stats["layer_norms_fused"] += 1
        return PassResult(model, stats["layer_norms_fused"] > 0, stats)
