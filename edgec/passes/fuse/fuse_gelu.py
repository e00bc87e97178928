"""fuse-gelu: a GELU the exporter wrote as arithmetic (Erf, or the Tanh polynomial) becomes one opset-20
Gelu, once running its subgraph has proven what it computes."""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx_ir as ir

from edgec.analysis.attention import _values_by_name, extract_subgraph, run_subgraph
from edgec.analysis.structure import Activation
from edgec.passes.cleanup._util import ensure_shapes, take_over
from edgec.passes.core import Pass, PassContext, PassResult
from edgec.passes.fuse.fuse_layer_norm import PROOF_TOLERANCE, alive, exposed

logger = logging.getLogger(__name__)

T = ir.DataType
_GELU_TYPES = (T.FLOAT16, T.BFLOAT16, T.FLOAT, T.DOUBLE)
_APPROXIMATE = {"gelu": "none", "gelu_tanh": "tanh"}


def reference_gelu(x: np.ndarray, approximate: str) -> np.ndarray:
    """ONNX Gelu's definition, in float64."""
    x = x.astype(np.float64)
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def proven(model: ir.Model, activation: Activation, values: dict[str, ir.Value]) -> bool:
    """Whether the activation's original subgraph, run in onnxruntime, computes ONNX's Gelu of its kind.

    The analysis accepts constants within 0.1% of 1/sqrt(2), 0.044715 and 0.5; the fused op is exact,
    so a model whose exporter wrote a rougher constant would change by as much: only a proof by
    execution tells.
    """
    x = values[activation.input]
    if x.shape is None:
        return False
    shape = tuple(d if isinstance(d, int) else 3 for d in x.shape)
    # Three standard deviations reach the tails, where erf and tanh saturate and rough constants show.
    feed = (np.random.default_rng(0).standard_normal(shape) * 3).astype(x.dtype.numpy())
    try:
        subgraph = extract_subgraph(model, [activation.input], activation.output, "gelu")
        actual = run_subgraph(subgraph, {activation.input: feed}, activation.output).astype(np.float64)
    except Exception:  # a subgraph onnxruntime cannot run is not proven
        return False
    expected = reference_gelu(feed, _APPROXIMATE[activation.kind])
    if actual.shape != expected.shape:
        return False
    return float(np.abs(actual - expected).max()) <= PROOF_TOLERANCE * max(1.0, float(np.abs(expected).max()))


class FuseGeluPass(Pass):
    """Fuses each proven decomposed GELU (erf or tanh form) into one Gelu node."""

    name = "fuse-gelu"
    requires = ("activations", "shapes")
    preserves = ("shapes",)  # every value a rewrite adds takes the type and shape of the one it replaces

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        stats = {"erf_gelus_fused": 0, "tanh_gelus_fused": 0, "unproven": 0}
        activations = [a for a in ctx.analyses.get("activations", model)
                       if a.form == "decomposed" and a.kind in _APPROXIMATE]
        if not activations:
            return PassResult(model, False, stats)
        ensure_shapes(model, ctx, {"Erf", "Tanh"})  # the proof feeds an input of the activation's shape
        values = _values_by_name(model)
        chosen = []
        for activation in activations:
            x, out = values[activation.input], values[activation.output]
            if exposed(model, activation.input, activation.output):
                logger.debug("%s: the GELU ending in %s is left alone: a value inside it is a graph output",
                             self.name, activation.output)
                continue
            if x.dtype not in _GELU_TYPES or out.dtype != x.dtype or not proven(model, activation, values):
                logger.debug("%s: the GELU ending in %s is not proven", self.name, activation.output)
                stats["unproven"] += 1
                continue
            chosen.append(activation)
        for activation in chosen:
            x, out = values[activation.input], values[activation.output]
            if not alive(x, graph) or not alive(out, graph) or not ctx.allow(self.name):
                continue
            approximate = _APPROXIMATE[activation.kind]
            gelu = ir.node("Gelu", [x], {"approximate": approximate} if approximate != "none" else None)
            graph.insert_before(out.producer(), gelu)
            take_over(out, gelu.outputs[0])
            values[activation.output] = gelu.outputs[0]  # a later match may read it by that name
            stats["tanh_gelus_fused" if approximate == "tanh" else "erf_gelus_fused"] += 1
        fused = stats["erf_gelus_fused"] + stats["tanh_gelus_fused"]
        return PassResult(model, fused > 0, stats)
