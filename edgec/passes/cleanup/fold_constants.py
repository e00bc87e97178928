"""Constant folding: nodes whose inputs are all fixed at compile time become initializers, and so do
Constant nodes."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import onnx.reference.ops
import onnx_ir as ir

from edgec.passes.cleanup._util import (
    NON_DETERMINISTIC_OPS,
    ONNX_DOMAINS,
    constant_array,
    constant_tensor,
    has_subgraph,
    is_onnx_op,
    remove_dead,
    replace_with_initializer,
)
from edgec.passes.core import Pass, PassContext, PassResult

logger = logging.getLogger(__name__)

# Quantize/dequantize pairs on weights are the quantization format itself (QDQ ONNX for TensorRT
# and ORT); Identity of a weight would only copy it (remove-identity reroutes its users instead).
_NEVER_FOLD = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Identity"})
# A fold that keeps a bigger constant input alive (a tied embedding also read by a Gather) may only
# produce a result this small: anything larger is a second copy of the weight.
_SHARED_INPUT_BYTES = 1024


@dataclass
class FoldConstantsOptions:
    # 1 MiB: every shape, index, position-id and mask table a transformer export computes from
    # constants is far smaller; beyond it a fold is usually a ConstantOfShape/Expand/Tile whose
    # result is cheaper to compute at load time than to store. A fold that frees at least as many
    # bytes as it adds (a Transpose of a weight nothing else reads) is never limited.
    max_output_bytes: int = 1 << 20


class FoldConstantsPass(Pass):
    """Evaluates nodes whose inputs are all constants and lifts Constant nodes into initializers."""

    name = "fold-constants"
    Options = FoldConstantsOptions
    preserves = ("shapes",)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        opset = model.opset_imports.get("", 20)
        stats = {"nodes_folded": 0, "constants_lifted": 0, "initializers_removed": 0}
        for node in list(graph):
            if node.graph is not graph:  # removed as dead by an earlier fold
                continue
            if is_onnx_op(node, "Constant"):
                if self._lift(graph, node, ctx):
                    stats["constants_lifted"] += 1
                continue
            arrays = self._foldable_inputs(node)
            if arrays is None:
                continue
            results = self._evaluate(node, arrays, opset)
            if results is None or not self._worth_it(node, results):
                continue
            if not ctx.allow(self.name):
                continue
            for out, array in zip(node.outputs, results):
                if out.name and (out.uses() or out.is_graph_output()):
                    replace_with_initializer(graph, out, array)
            inputs = list(node.inputs)
            graph.remove(node, safe=True)
            stats["nodes_folded"] += 1
            stats["initializers_removed"] += remove_dead(inputs)[1]
        modified = any(stats.values())
        return PassResult(model, modified, stats)

    def _lift(self, graph: ir.Graph, node: ir.Node, ctx: PassContext) -> bool:
        out = node.outputs[0]
        if out.is_graph_output():
            return False
        tensor = constant_tensor(out)
        if tensor is None or not ctx.allow(self.name):
            return False
        replace_with_initializer(graph, out, tensor)
        graph.remove(node, safe=True)
        return True

    def _foldable_inputs(self, node: ir.Node) -> list[np.ndarray | None] | None:
        if node.domain not in ONNX_DOMAINS or node.op_type in NON_DETERMINISTIC_OPS or node.op_type in _NEVER_FOLD:
            return None
        if has_subgraph(node) or not any(v is not None for v in node.inputs):
            return None
        if any(out.type is not None and not isinstance(out.type, ir.TensorType) for out in node.outputs):
            return None  # sequences and optionals stay: initializers hold tensors only
        if "Sequence" in node.op_type or "Optional" in node.op_type:
            return None
        if any(out.is_graph_output() for out in node.outputs):
            return None  # a graph output keeps its producer; a constant output is the model's business
        arrays = []
        for value in node.inputs:
            if value is None:
                arrays.append(None)
                continue
            array = constant_array(value)
            if array is None or array.dtype.kind == "V":
                # bfloat16, float8, int4 (ml_dtypes): onnx's reference ops read them wrongly
                return None
            arrays.append(array)
        if self._predicted_bytes(node, arrays) > max(self.options.max_output_bytes, self._freed_bytes(node)):
            return None  # do not even materialise it
        return arrays

    def _evaluate(self, node: ir.Node, arrays: list, opset: int) -> list[np.ndarray] | None:
        try:
            impl = onnx.reference.ops.load_op("", node.op_type, opset)
        except Exception:
            return None
        attrs = {}
        for name, attr in node.attributes.items():
            if attr.is_ref():
                return None
            attrs[name] = ir.serde.serialize_tensor(attr.value) if attr.type == ir.AttributeType.TENSOR else attr.value
        try:
            outputs = impl.eval(*arrays, **attrs)
        except Exception as exc:  # the reference evaluator lacks a case: leave the node to the runtime
            logger.debug("cannot fold %s: %s", node.op_type, exc)
            return None
        outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
        if len(outputs) != len(node.outputs):
            return None
        results = []
        for out, array in zip(node.outputs, outputs):
            if not isinstance(array, (np.ndarray, np.generic)):
                return None
            array = np.asarray(array)
            if array.dtype.kind == "V" or out.dtype is not None and (out.dtype.itemsize < 1 or out.dtype.numpy().kind == "V"):
                return None  # the ml_dtypes types again, as results
            if out.dtype is not None and out.dtype.numpy() != array.dtype:
                # The reference evaluator widened or narrowed; the graph's declared type wins.
                array = array.astype(out.dtype.numpy())
            results.append(array)
        return results

    def _freed_bytes(self, node: ir.Node) -> int:
        """Bytes of constant inputs that only this node reads, which folding it drops."""
        freed = 0
        for value in {v for v in node.inputs if v is not None}:
            if value.is_graph_output() or any(use.node is not node for use in value.uses()):
                continue
            tensor = constant_tensor(value)
            freed += tensor.nbytes if tensor is not None else 0
        return freed

    def _predicted_bytes(self, node: ir.Node, arrays: list) -> int:
        """The result's size before computing it, for ops that blow small inputs up; 0 if unknown."""
        # Python ints: a bogus shape must not wrap around in int64 and look small.
        try:
            if node.op_type == "ConstantOfShape":
                value = node.attributes.get("value")
                itemsize = value.value.numpy().itemsize if value is not None else 4
                return math.prod(int(d) for d in arrays[0].reshape(-1)) * itemsize
            if node.op_type == "Expand":
                shape = np.broadcast_shapes(arrays[0].shape, tuple(int(d) for d in arrays[1].reshape(-1)))
                return math.prod(shape) * arrays[0].itemsize
            if node.op_type == "Tile":
                return arrays[0].nbytes * math.prod(int(r) for r in arrays[1].reshape(-1))
        except (ValueError, TypeError, IndexError, AttributeError):
            return 0
        total = 0
        for out in node.outputs:
            if out.dtype is not None and out.shape is not None and out.shape.is_static():
                total += int(np.prod(out.shape.numpy(), dtype=np.int64) * out.dtype.itemsize)
        return total

    def _worth_it(self, node: ir.Node, results: list[np.ndarray]) -> bool:
        produced = sum(a.nbytes for a in results)
        if produced <= self._freed_bytes(node):
            return True  # e.g. a Transpose of a weight nothing else reads: no model growth
        if produced > self.options.max_output_bytes:
            return False
        for value in node.inputs:
            tensor = constant_tensor(value)
            if tensor is None or all(use.node is node for use in value.uses()):
                continue
            if tensor.nbytes > _SHARED_INPUT_BYTES and produced > _SHARED_INPUT_BYTES:
                return False  # the input stays (tied weights): the result would be a second copy
        return True
