"""Reading constants and op identity off the IR: what passes and analyses both need."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

ONNX_DOMAINS = ("", "ai.onnx")
# Same inputs, different outputs on every run: folding (or merging) them changes the model's meaning.
# Dropout is one when its training_mode input is true (a model exported in training mode).
NON_DETERMINISTIC_OPS = frozenset(
    {"RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Bernoulli", "Multinomial", "Dropout"}
)
# A pass that only inspects a constant (is it all ones? a shape vector?) does not read one bigger
# than this: what it looks for is at most as big as a bias, and reading a weight costs memory and time.
MAX_CONSTANT_ELEMENTS = 1 << 20


def is_onnx_op(node: ir.Node, *op_types: str) -> bool:
    return node.domain in ONNX_DOMAINS and node.op_type in op_types


def has_subgraph(node: ir.Node) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())


# --- constants -------------------------------------------------------------------------------------

def constant_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The value's tensor when it is fixed at compile time: an initializer that is not also a graph
    input (a caller may override those), or the output of a well-formed Constant node."""
    if value is None or value.is_graph_input():
        return None
    if value.is_initializer():
        return value.const_value
    producer = value.producer()
    if producer is None or not is_onnx_op(producer, "Constant") or len(producer.attributes) != 1:
        return None
    if "sparse_value" in producer.attributes:
        return None
    try:
        return ir.convenience.get_const_tensor(value)
    except ValueError:
        return None


def constant_array(value: ir.Value | None, max_elements: int | None = None) -> np.ndarray | None:
    """The content of a constant (see constant_tensor), or None; also None when it has more than
    `max_elements` elements, which are then never read."""
    tensor = constant_tensor(value)
    if tensor is None:
        return None
    if max_elements is not None and math.prod(tensor.shape) > max_elements:
        return None
    try:
        return tensor.numpy()
    except Exception:  # external data that cannot be read, exotic dtypes: not usable
        return None


def constant_ints(value: ir.Value | None) -> list[int] | None:
    """A constant integer scalar or vector (a shape, axes, pads) as a list."""
    array = constant_array(value, MAX_CONSTANT_ELEMENTS)
    if array is None or array.ndim > 1 or not np.issubdtype(array.dtype, np.integer):
        return None
    return [int(v) for v in array.reshape(-1)]


# --- shapes -----------------------------------------------------------------------------------------
