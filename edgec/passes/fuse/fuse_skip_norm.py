"""fuse-skip-norm (onnxruntime): the residual Add before a LayerNorm or an RMSNorm joins the norm in one
com.microsoft.SkipLayerNormalization or SkipSimplifiedLayerNormalization, with the bias of the branch's
last projection folded in, and the sum still handed to the next residual branch."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgec.analysis.attention import _values_by_name
from edgec.analysis.structure import Norm
from edgec.passes.cleanup._util import constant_tensor, is_onnx_op, remove_dead, same_shape, take_over
from edgec.passes.core import Pass, PassContext, PassResult
from edgec.passes.fuse.fuse_layer_norm import affine_vector, alive, exposed, proven, vector

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
T = ir.DataType
# What the contrib ops take (their T), and the ranks onnxruntime's kernels accept.
_SKIP_TYPES = (T.FLOAT16, T.BFLOAT16, T.FLOAT)
_RANKS = (2, 3)
_SUM = 3  # the output holding input + skip + bias


@dataclass
class _Match:
    op: str  # SkipLayerNormalization or SkipSimplifiedLayerNormalization
    add: ir.Node  # the residual Add
    input: ir.Value
    skip: ir.Value
    gamma: ir.Value | np.ndarray
    beta: ir.Value | np.ndarray | None
    bias: ir.Value | None  # a projection's bias folded in


def _candidate(norm: Norm, values: dict[str, ir.Value]) -> tuple[str, ir.Value | None, ir.Value | None] | None:
    """(op, weight, bias) of the fused op for a norm of a kind it fuses; None for others."""
    if norm.kind == "layernorm" and norm.form == "op":
        node = values[norm.output].producer()
        if node is None or not is_onnx_op(node, "LayerNormalization"):
            return None
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        return "SkipLayerNormalization", weight, bias
    if norm.kind == "rmsnorm" and norm.form == "decomposed":
        return ("SkipSimplifiedLayerNormalization", values[norm.weight] if norm.weight else None,
                values[norm.bias] if norm.bias else None)
    return None  # a decomposed LayerNorm is fuse-layer-norm's to fuse first


def _projection_bias(side: ir.Value, width: int | ir.SymbolicDim) -> tuple[ir.Value, ir.Value] | None:
    """(MatMul output, bias) when `side` is MatMul(...) + a constant vector of `width`, read only by the
    residual Add: the bias can move into the fused op."""
    add = side.producer()
    if add is None or not is_onnx_op(add, "Add") or len(side.uses()) != 1 or side.is_graph_output():
        return None
    for bias, product in ((add.inputs[1], add.inputs[0]), (add.inputs[0], add.inputs[1])):
        tensor = constant_tensor(bias)
        producer = product.producer() if product is not None else None
        if (tensor is not None and isinstance(width, int) and tuple(tensor.shape) == (width,)
                and bias.dtype == side.dtype and producer is not None and is_onnx_op(producer, "MatMul")
                and same_shape(product.shape, side.shape)):
            return product, bias
    return None


def _match(norm: Norm, values: dict[str, ir.Value], graph: ir.Graph) -> _Match | str | None:
    """What replaces the norm and its residual Add, why nothing does, or None for a norm of another kind."""
    candidate = _candidate(norm, values)
    if candidate is None:
        return None
    op, weight, bias = candidate
    x, out = values[norm.input], values[norm.output]
    if not alive(x, graph) or not alive(out, graph):
        return "an earlier rewrite removed it"
    add = x.producer()
    if add is None or not is_onnx_op(add, "Add") or add.graph is not graph:
        return "its input is not an Add"
    if x.is_graph_output():
        return "the residual sum is a graph output"
    if x.shape is None or len(x.shape) not in _RANKS:
        return "its input's rank is unknown" if x.shape is None else f"its input has rank {len(x.shape)}, not 2 or 3"
    if x.dtype not in _SKIP_TYPES:
        return f"the fused ops do not take {x.dtype}"
    if out.dtype != x.dtype:
        return f"it reads {x.dtype} and returns {out.dtype}"
    if norm.axis not in (-1, len(x.shape) - 1):
        return f"it normalizes from axis {norm.axis}, not the last"
    first, second = add.inputs
    if not same_shape(first.shape, second.shape) or not same_shape(first.shape, x.shape):
        return "the Add broadcasts: it is not a residual"
    node = out.producer()
    if op == "SkipLayerNormalization" and any(v.uses() or v.is_graph_output() for v in node.outputs[1:]):
        return "its mean or inverse standard deviation is read"
    if op == "SkipSimplifiedLayerNormalization" and bias is not None:
        return "an RMSNorm with a bias has no fused op"
    width = x.shape[-1]
    gamma = affine_vector(weight, width, x.dtype, 1.0)
    beta = affine_vector(bias, width, x.dtype, 0.0) if bias is not None else None
    if gamma is None or (bias is not None and beta is None):
        return "its weight or bias is not a constant vector of its width"
    for side, other in ((first, second), (second, first)):
        folded = _projection_bias(side, width)
        if folded is not None:
            return _Match(op, add, folded[0], other, gamma, beta, folded[1])
    return _Match(op, add, first, second, gamma, beta, None)


def _hoist(value: ir.Value, anchor: ir.Node, graph: ir.Graph) -> None:
    """Moves the Constant node producing `value` before `anchor` when it comes after: a Constant reads
    nothing, so it may move up freely."""
    producer = value.producer()
    if producer is None:
        return
    order = {id(n): i for i, n in enumerate(graph)}
    if order[id(producer)] > order[id(anchor)]:
        graph.remove(producer)
        graph.insert_before(anchor, producer)


def _rewrite(graph: ir.Graph, match: _Match, out: ir.Value, epsilon: float) -> bool:
    """Builds the fused op after the residual Add, moves the norm's readers (and the sum's) to it and
    removes what is left dead. Returns whether the sum is read on."""
    x = match.add.outputs[0]
    gamma = vector(graph, match.gamma)
    beta = vector(graph, match.beta) if match.beta is not None else None
    inputs = [match.input, match.skip, gamma]
    if match.op == "SkipLayerNormalization":
        inputs.append(beta)
    inputs.append(match.bias)
    while inputs[-1] is None:
        inputs.pop()
    fused = ir.node(match.op, inputs, {"epsilon": float(np.float32(epsilon))}, domain=MS_DOMAIN, num_outputs=_SUM + 1)
    graph.insert_after(match.add, fused)
    for value in (gamma, beta):
        if value is not None:
            _hoist(value, fused, graph)
    take_over(out, fused.outputs[0])
    if not x.uses():  # remove_dead took the Add too
        fused.resize_outputs(1)
        return False
    # The next residual branch reads the sum: the fused op hands it on, mean and 1/std stay unwritten.
    total = fused.outputs[_SUM]
    total.type, total.shape = x.type, x.shape
    x.replace_all_uses_with(total)
    remove_dead([x])
    for unused in fused.outputs[1:_SUM]:
        unused.name = ""  # onnx's spelling of an optional output left out
    return True


class FuseSkipNormPass(Pass):
    """Fuses a residual Add and the LayerNorm or RMSNorm after it into one com.microsoft op (onnxruntime)."""

    name = "fuse-skip-norm"
    requires = ("norms",)
    preserves = ("shapes",)  # every value a rewrite adds takes the type and shape of the one it replaces

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        norms = ctx.analyses.get("norms", model)
        values = _values_by_name(model)
        stats = {"skip_layer_norms": 0, "skip_rms_norms": 0, "biases_folded": 0, "sums_reused": 0, "unproven": 0}
        # Every proof runs before the first rewrite: check_norm extracts the subgraph by value names.
        trusted = []
        for norm in norms:
            if norm.form == "decomposed" and _candidate(norm, values) is not None:
                if exposed(model, norm.input, norm.output):
                    logger.debug("%s: the norm ending in %s is left alone: a value inside it is a graph output",
                                 self.name, norm.output)
                    continue
                if not proven(model, norm, values):
                    stats["unproven"] += 1
                    continue
            trusted.append(norm)
        # Matching waits for the rewrites before it: each moves the readers of the residual sum it took.
        for norm in trusted:
            match = _match(norm, values, graph)
            if isinstance(match, str):
                logger.debug("%s: the norm ending in %s is left alone: %s", self.name, norm.output, match)
            if not isinstance(match, _Match) or not ctx.allow(self.name):
                continue
            reused = _rewrite(graph, match, values[norm.output], norm.epsilon)
            stats["skip_layer_norms" if match.op == "SkipLayerNormalization" else "skip_rms_norms"] += 1
            stats["biases_folded"] += match.bias is not None
            stats["sums_reused"] += reused
        fused = stats["skip_layer_norms"] + stats["skip_rms_norms"]
        if fused:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return PassResult(model, fused > 0, stats)
