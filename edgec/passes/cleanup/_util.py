"""What the cleanup passes share: recognising ops and constants, comparing shapes, and the rewrites
they all make (bypass a node, add an initializer, remove what a rewrite left dead)."""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import onnx_ir as ir

from edgec.ir.constants import (  # noqa: F401  (re-exported for the passes)
    MAX_CONSTANT_ELEMENTS,
    NON_DETERMINISTIC_OPS,
    ONNX_DOMAINS,
    constant_array,
    constant_ints,
    constant_tensor,
    has_subgraph,
    is_onnx_op,
)
from edgec.passes.core import PassContext

def known_dim(dim) -> bool:
    """Whether a dim names a definite size: an int, or a named symbol (equal names, equal sizes)."""
    return isinstance(dim, int) or (isinstance(dim, ir.SymbolicDim) and bool(dim.value))


def same_shape(a: ir.Shape | None, b: ir.Shape | None) -> bool:
    """Whether two shapes are provably equal: same rank, every dim the same int or the same named symbol.

    Unknown dims (no name) never compare equal, although onnx-ir's SymbolicDim(None) == SymbolicDim(None).
    """
    if a is None or b is None or len(a) != len(b):
        return False
    return all(known_dim(x) and known_dim(y) and x == y for x, y in zip(a, b))


def rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


def ensure_shapes(model: ir.Model, ctx: PassContext, ops: set[str]) -> None:
    """Has the values annotated with shapes and types (the "shapes" analysis, in place) when the model
    has any node of `ops`: inference is not free, and most models lack some of the ops."""
    if any(is_onnx_op(node, *ops) for node in model.graph.all_nodes()):
        ctx.analyses.get("shapes", model)


# --- rewrites ---------------------------------------------------------------------------------------

def can_take_name(value: ir.Value, graph: ir.Graph) -> bool:
    """Whether `value` may be renamed to become an output of `graph` (an intermediate of that graph)."""
    producer = value.producer()
    return (
        producer is not None
        and producer.graph is graph
        and not value.is_graph_output()
        and not value.is_graph_input()
        and not value.is_initializer()
    )


def bypass(node: ir.Node, replacement: ir.Value, output: ir.Value | None = None) -> None:
    """Makes the readers of `output` (default: the node's first output) read `replacement`, then
    removes `node`, whose other outputs must be unused.

    A graph output keeps its name, which is the model's API: `replacement` takes the name when it is
    an intermediate of the same graph; otherwise (a graph input, an initializer, another graph
    output, a value of an outer scope) an Identity carrying the name replaces `node`.
    """
    output = node.outputs[0] if output is None else output
    graph = node.graph
    assert graph is not None, "bypass of a node that is not in a graph"
    if not output.is_graph_output():
        output.replace_all_uses_with(replacement)
        graph.remove(node, safe=True)
        return
    if can_take_name(replacement, graph):
        name = output.name
        # The graph output's declared type and shape are part of the API too.
        if output.type is not None:
            replacement.type = output.type
        if output.shape is not None:
            replacement.shape = output.shape
        output.replace_all_uses_with(replacement, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        replacement.name = name
        return
    identity = ir.node("Identity", [replacement])
    ir.convenience.replace_nodes_and_values(graph, node, [node], [identity], [output], [identity.outputs[0]])


def _initializer(name: str, data: np.ndarray | ir.TensorProtocol) -> ir.Value:
    tensor = ir.tensor(data) if isinstance(data, (np.ndarray, np.generic)) else data
    tensor.name = name
    return ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(tensor.shape), const_value=tensor)


def add_initializer(graph: ir.Graph, array: np.ndarray) -> ir.Value:
    """A new initializer holding `array`, named by onnx-ir's name authority (names are never made up here)."""
    probe = ir.node("Constant", [], {"value": ir.tensor(array)})
    graph.append(probe)  # onnx-ir names a value when its node joins a graph
    name = probe.outputs[0].name
    graph.remove(probe, safe=True)
    value = _initializer(name, array)
    graph.register_initializer(value)
    return value


def replace_with_initializer(graph: ir.Graph, value: ir.Value, data: np.ndarray | ir.TensorProtocol) -> ir.Value:
    """Moves every use of `value` to a new initializer that takes over its name; the caller removes
    the node that produced `value`, which is left without uses."""
    init = _initializer(value.name, data)
    value.replace_all_uses_with(init)
    # Two values may not share a name: the old one gives it up before its producer goes.
    value.name = None
    graph.register_initializer(init)
    return init


def remove_dead(values: Iterable[ir.Value | None], only: Callable[[ir.Node], bool] | None = None) -> tuple[int, int]:
    """Removes what a rewrite left without readers: the producers of `values` and the initializers
    among them, then what those read, in turn. Graph inputs and outputs stay. With `only`, nodes it
    rejects stay too (a pass whose stat counts its own ops leaves the rest to remove-dead-code).
    Returns (nodes removed, initializers removed)."""
    nodes = inits = 0
    stack = [v for v in values if v is not None]
    while stack:
        value = stack.pop()
        if value.uses() or value.is_graph_output() or value.is_graph_input():
            continue
        if value.is_initializer():
            graph = value.graph
            if graph is not None and graph.initializers.get(value.name) is value:
                del graph.initializers[value.name]
                inits += 1
            continue
        producer = value.producer()
        if producer is None or producer.graph is None or (only is not None and not only(producer)):
            continue
        if any(out.uses() or out.is_graph_output() for out in producer.outputs):
            continue
        inputs = list(producer.inputs)
        producer.graph.remove(producer, safe=True)
        nodes += 1
        stack.extend(v for v in inputs if v is not None)
    return nodes, inits


def take_over(out: ir.Value, new: ir.Value) -> None:
    """Moves the readers of `out` to `new` (a graph output keeps its name) and removes the nodes that
    computed `out` and nothing still read: the subgraph a fused op replaces."""
    new.type, new.shape = out.type, out.shape
    last = out.producer()
    dead = list(last.inputs)
    bypass(last, new, out)
    remove_dead(dead)
