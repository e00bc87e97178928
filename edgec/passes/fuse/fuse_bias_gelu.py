"""fuse-bias-gelu (onnxruntime): Gelu of a projection plus its bias becomes com.microsoft.BiasGelu (exact
GELU) or FastGelu (tanh approximation), which add the bias inside the activation kernel."""

from __future__ import annotations

import onnx_ir as ir

from edgec.passes.cleanup._util import bypass, constant_tensor, ensure_shapes, is_onnx_op, remove_dead
from edgec.passes.core import Pass, PassContext, PassResult

MS_DOMAIN = "com.microsoft"
T = ir.DataType
_TYPES = (T.FLOAT16, T.BFLOAT16, T.FLOAT, T.DOUBLE)
_FUSED = {"none": "BiasGelu", "tanh": "FastGelu"}  # Gelu's approximate -> the contrib op computing it


def _biased(gelu: ir.Node) -> tuple[ir.Value, ir.Value] | None:
    """(x, bias) when the Gelu reads Add(x, bias), a constant vector as wide as x's last dim, and is
    the Add's only reader."""
    total = gelu.inputs[0]
    add = total.producer() if total is not None else None
    if add is None or not is_onnx_op(add, "Add") or add.graph is not gelu.graph:
        return None
    if len(total.uses()) != 1 or total.is_graph_output():
        return None
    for bias, x in ((add.inputs[1], add.inputs[0]), (add.inputs[0], add.inputs[1])):
        tensor = constant_tensor(bias)
        if tensor is None or len(tensor.shape) != 1 or constant_tensor(x) is not None:
            continue
        # The kernels add a bias of the last dim's width: a narrower x would have been broadcast up.
        if x.shape is not None and len(x.shape) > 0 and x.shape[-1] == tensor.shape[0] and x.dtype == bias.dtype:
            return x, bias
    return None


class FuseBiasGeluPass(Pass):
    """Fuses Gelu(x + bias) into com.microsoft.BiasGelu or FastGelu (onnxruntime)."""

    name = "fuse-bias-gelu"
    requires = ("shapes",)
    preserves = ("shapes",)  # every value a rewrite adds takes the type and shape of the one it replaces

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        stats = {"bias_gelus_fused": 0, "fast_gelus_fused": 0}
        ensure_shapes(model, ctx, {"Gelu"})
        for gelu in list(graph):
            if gelu.graph is not graph or not is_onnx_op(gelu, "Gelu"):
                continue
            op = _FUSED.get(gelu.attributes.get_string("approximate", "none"))
            found = _biased(gelu)
            if op is None or found is None or found[0].dtype not in _TYPES or not ctx.allow(self.name):
                continue
            x, bias = found
            total = gelu.inputs[0]
            fused = ir.node(op, [x, bias], domain=MS_DOMAIN)
            graph.insert_before(gelu, fused)
            out = gelu.outputs[0]
            fused.outputs[0].type, fused.outputs[0].shape = out.type, out.shape
            bypass(gelu, fused.outputs[0], out)
            remove_dead([total])
            stats["bias_gelus_fused" if op == "BiasGelu" else "fast_gelus_fused"] += 1
        fused_count = stats["bias_gelus_fused"] + stats["fast_gelus_fused"]
        if fused_count:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return PassResult(model, fused_count > 0, stats)
