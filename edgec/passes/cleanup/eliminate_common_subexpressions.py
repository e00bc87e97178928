"""Common subexpression elimination: identical small constants and identical nodes (same op,
attributes and inputs) are computed once."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgec.passes.cleanup._util import NON_DETERMINISTIC_OPS, ONNX_DOMAINS, has_subgraph, remove_dead
from edgec.passes.core import Pass, PassContext, PassResult

# Two-input ops whose operands may be swapped without changing a single bit of the result (not
# Max/Min: which NaN wins depends on the order in some runtimes).
_COMMUTATIVE = frozenset({"Add", "Mul", "And", "Or", "Xor", "Equal", "BitwiseAnd", "BitwiseOr", "BitwiseXor"})


@dataclass
class CseOptions:
    # 64 KiB covers what exporters duplicate (shape vectors, axes, scalars, position-id and mask
    # tables) while never reading and hashing the model's weights on every fixpoint round.
    max_bytes: int = 1 << 16


def _tensor_key(tensor: ir.TensorProtocol) -> tuple | None:
    try:
        array = tensor.numpy()
    except Exception:
        return None
    data = np.array(array, dtype=np.bytes_).tobytes() if array.dtype.kind in "OSU" else array.tobytes()
    return (str(tensor.dtype), tuple(array.shape), data)


class EliminateCommonSubexpressionsPass(Pass):
    """Merges identical nodes and identical small constant initializers."""

    name = "cse"
    Options = CseOptions
    preserves = ("shapes",)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        stats = {"constants_merged": self._merge_constants(graph, ctx), "nodes_merged": 0}
        seen: dict[tuple, ir.Node] = {}
        for node in list(graph):
            if node.graph is not graph:
                continue
            key = self._node_key(node)
            if key is None:
                continue
            kept = seen.setdefault(key, node)
            if kept is node or any(out.is_graph_output() for out in node.outputs):
                continue  # a graph output keeps its own producer (and its name)
            if not ctx.allow(self.name):
                continue
            for old, new in zip(node.outputs, kept.outputs):
                old.replace_all_uses_with(new)
            remove_dead(node.outputs)
            stats["nodes_merged"] += 1
        return PassResult(model, any(stats.values()), stats)

    def _merge_constants(self, graph: ir.Graph, ctx: PassContext) -> int:
        merged = 0
        seen: dict[tuple, ir.Value] = {}
        for value in list(graph.initializers.values()):
            # A graph input may be fed a different value by the caller; an output keeps its name.
            if value.is_graph_input() or value.is_graph_output() or value.const_value is None:
                continue
            if value.const_value.nbytes > self.options.max_bytes:
                continue
            key = _tensor_key(value.const_value)
            if key is None:
                continue
            kept = seen.setdefault(key, value)
            if kept is value or not ctx.allow(self.name):
                continue
            value.replace_all_uses_with(kept)
            del graph.initializers[value.name]
            merged += 1
        return merged

    def _node_key(self, node: ir.Node) -> tuple | None:
        # Only default-domain ops are known to be pure; a custom op may count calls or read a device.
        if node.domain not in ONNX_DOMAINS or node.op_type in NON_DETERMINISTIC_OPS or has_subgraph(node):
            return None
        attrs = []
        for name, attr in sorted(node.attributes.items()):
            if attr.is_ref():
                return None
            value = attr.value
            if attr.type == ir.AttributeType.TENSOR:
                if value.nbytes > self.options.max_bytes:
                    return None
                value = _tensor_key(value)
                if value is None:
                    return None
            elif isinstance(value, (list, tuple)):
                value = tuple(value)
            attrs.append((name, attr.type, value))
        inputs = tuple(id(v) if v is not None else None for v in node.inputs)
        if node.op_type in _COMMUTATIVE and len(inputs) == 2 and None not in inputs:
            inputs = tuple(sorted(inputs))
        return ("", node.op_type, node.overload, len(node.outputs), inputs, tuple(attrs))
