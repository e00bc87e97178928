"""Norms, activations and feed-forward blocks recognised by meaning, whether the exporter wrote one op
(LayerNormalization, Gelu) or its arithmetic (ReduceMean/Sqrt/Div, Erf or Tanh polynomials).

Each decomposed-norm candidate that is not recognised comes back with the first check it failed;
`check_norm` proves a record by running its original subgraph against edgec's canonical norm in numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from edgec.analysis import analysis
from edgec.analysis.attention import (
    Projection, _bind, _Miss, _name, _readers, _scalar, _single_reader, _trace_projection, _values_by_name,
    extract_subgraph, nodes_between, run_subgraph,
)
from edgec.ir.constants import constant_array, constant_ints, constant_tensor, is_onnx_op

_CARRY = ("Reshape", "Cast", "Identity", "Flatten", "Dropout")  # between an activation and its down projection


@dataclass
class Norm:
    kind: str  # "layernorm" or "rmsnorm"
    form: str  # "op" or "decomposed"
    axis: int
    epsilon: float
    weight: str | None
    bias: str | None
    input: str
    output: str
    nodes: list[str] = field(default_factory=list)


@dataclass
class NormAnalysis:
    norms: list[Norm]
    unrecognised: list[tuple[str, str]]  # (ReduceMean of a square, the first check that failed)

    def __iter__(self):
        return iter(self.norms)

    def __len__(self):
        return len(self.norms)


@dataclass
class Activation:
    kind: str  # "gelu", "gelu_tanh", "silu", "relu", "hardswish"
    form: str  # "op" or "decomposed"
    input: str
    output: str
    nodes: list[str] = field(default_factory=list)


@dataclass
class FeedForward:
    up: Projection
    gate: Projection | None  # gated (GLU) blocks: activation(gate(x)) * up(x)
    down: Projection
    activation: str
    hidden: int
    intermediate: int
    input: str
    output: str
    nodes: list[str] = field(default_factory=list)

    @property
    def gated(self) -> bool:
        return self.gate is not None


# --- small helpers ------------------------------------------------------------------------------------

def _other(node: ir.Node, value: ir.Value) -> ir.Value:
    return node.inputs[1] if node.inputs[0] is value else node.inputs[0]


def _close(a: float | None, b: float, rel: float = 1e-3) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=rel)


def _closed(nodes: list[ir.Node], output: ir.Value) -> bool:
    """No value inside the match but its output is read from outside it."""
    inside = {id(n) for n in nodes}
    return all(
        all(id(r) in inside for r in _readers(v)) for n in nodes for v in n.outputs if v is not output
    )


def _factors(value: ir.Value, stop: ir.Value, depth: int = 6) -> tuple[list[ir.Value], float, list[ir.Node]]:
    """`value` as a product: its non-constant factors, its constant coefficient, and the Mul/Div/Pow
    nodes opened to see them. `stop` is never opened: it is the variable the caller looks for."""
    c = _scalar(value)
    if c is not None:
        return [], c, []
    node = value.producer()
    if value is stop or node is None or depth == 0:
        return [value], 1.0, []
    if is_onnx_op(node, "Mul"):
        a, b = (_factors(v, stop, depth - 1) for v in node.inputs)
        return a[0] + b[0], a[1] * b[1], a[2] + b[2] + [node]
    if is_onnx_op(node, "Div") and _scalar(node.inputs[1]):
        a = _factors(node.inputs[0], stop, depth - 1)
        return a[0], a[1] / _scalar(node.inputs[1]), a[2] + [node]
    if is_onnx_op(node, "Pow") and _scalar(node.inputs[1]) in (2.0, 3.0):
        a = _factors(node.inputs[0], stop, depth - 1)
        k = int(_scalar(node.inputs[1]))
        return a[0] * k, a[1] ** k, a[2] + [node]
    return [value], 1.0, []


def _scaled(value: ir.Value) -> tuple[ir.Value, float, ir.Node] | None:
    """(x, c, node) when value is x*c, c*x or x/c for a constant scalar c."""
    node = value.producer()
    if node is None or not is_onnx_op(node, "Mul", "Div"):
        return None
    for i in ((0, 1) if node.op_type == "Mul" else (1,)):
        c = _scalar(node.inputs[i])
        if c:
            return node.inputs[1 - i], (c if node.op_type == "Mul" else 1.0 / c), node
    return None


def _plus_one(value: ir.Value) -> ir.Node | None:
    node = _single_reader(value)
    if node is not None and is_onnx_op(node, "Add") and _close(_scalar(_other(node, value)), 1.0, 1e-6):
        return node
    return None


def _times(value: ir.Value, x: ir.Value, coefficient: float) -> tuple[ir.Value, list[ir.Node]] | None:
    """Follows Muls from `value` until it has been multiplied by exactly x * coefficient, in any order
    or association: (the product, the nodes used)."""
    leaves: list[ir.Value] = []
    c, nodes = 1.0, []
    for _ in range(4):
        node = _single_reader(value)
        if node is None or not is_onnx_op(node, "Mul"):
            return None
        more, k, opened = _factors(_other(node, value), x)
        leaves += more
        c *= k
        nodes += opened + [node]
        value = node.outputs[0]
        if any(v is not x for v in leaves) or len(leaves) > 1:
            return None
        if leaves and _close(c, coefficient):
            return value, nodes
    return None


# --- activations ------------------------------------------------------------------------------------------

def _gelu_erf(erf: ir.Node):
    scaled = _scaled(erf.inputs[0])
    if scaled is None or not _close(scaled[1], 1 / math.sqrt(2)):
        return None
    x, _, scale = scaled
    add = _plus_one(erf.outputs[0])
    product = _times(add.outputs[0], x, 0.5) if add is not None else None
    if product is None:
        return None
    return "gelu", x, product[0], [scale, erf, add] + product[1]


def _gelu_tanh(tanh: ir.Node):
    scaled = _scaled(tanh.inputs[0])
    if scaled is None or not _close(scaled[1], math.sqrt(2 / math.pi)):
        return None
    inner, _, scale = scaled
    add = inner.producer()
    if add is None or not is_onnx_op(add, "Add"):
        return None
    for x in add.inputs:
        cube, c, opened = _factors(_other(add, x), x)
        if len(cube) == 3 and all(v is x for v in cube) and _close(c, 0.044715):
            one = _plus_one(tanh.outputs[0])
            product = _times(one.outputs[0], x, 0.5) if one is not None else None
            if product is not None:
                return "gelu_tanh", x, product[0], opened + [add, scale, tanh, one] + product[1]
    return None


def _silu(sigmoid: ir.Node):
    x = sigmoid.inputs[0]
    mul = _single_reader(sigmoid.outputs[0])
    if mul is None or not is_onnx_op(mul, "Mul") or _other(mul, sigmoid.outputs[0]) is not x:
        return None
    return "silu", x, mul.outputs[0], [sigmoid, mul]


_DECOMPOSED = {"Erf": _gelu_erf, "Tanh": _gelu_tanh, "Sigmoid": _silu}
_OPS = {"Relu": "relu", "HardSwish": "hardswish"}


@analysis("activations")
def find_activations(model: ir.Model) -> list[Activation]:
    found = []
    for node in model.graph:
        if is_onnx_op(node, "Gelu"):
            kind = "gelu_tanh" if node.attributes.get_string("approximate", "none") == "tanh" else "gelu"
            found.append(Activation(kind, "op", node.inputs[0].name, node.outputs[0].name, [_name(node)]))
        elif is_onnx_op(node, *_OPS):
            found.append(Activation(_OPS[node.op_type], "op", node.inputs[0].name, node.outputs[0].name, [_name(node)]))
        elif is_onnx_op(node, *_DECOMPOSED):
            match = _DECOMPOSED[node.op_type](node)
            if match is not None and _closed(match[3], match[2]):
                kind, x, out, nodes = match
                order = {id(n) for n in nodes}
                found.append(Activation(kind, "decomposed", x.name, out.name, [_name(n) for n in model.graph if id(n) in order]))
    return found


# --- norms --------------------------------------------------------------------------------------------------

def _reduced_axes(node: ir.Node) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        return constant_ints(node.inputs[1])
    axes = node.attributes.get_ints("axes", None)
    return list(axes) if axes is not None else None


def _last_axis_mean(node: ir.Node) -> bool:
    axes = _reduced_axes(node)
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    return (node.attributes.get_int("keepdims", 1) == 1 and axes is not None and len(axes) == 1
            and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1)))


def _square_of(value: ir.Value) -> ir.Value | None:
    node = value.producer()
    if node is not None and is_onnx_op(node, "Pow") and _scalar(node.inputs[1]) == 2.0:
        return node.inputs[0]
    if node is not None and is_onnx_op(node, "Mul") and node.inputs[0] is node.inputs[1]:
        return node.inputs[0]
    return None


def _affine(value: ir.Value, nodes: list[ir.Node]) -> tuple[ir.Value, ir.Value | None, ir.Value | None]:
    """The optional Mul(gamma) then Add(beta) after a normalization, past a Cast back to the model's type."""
    weight = bias = None
    for op in ("Cast", "Mul", "Add"):
        node = _single_reader(value)
        if node is None or not is_onnx_op(node, op):
            continue
        if op == "Cast":
            nodes.append(node)
            value = node.outputs[0]
            continue
        other = _other(node, value)
        if constant_tensor(other) is None or len(constant_tensor(other).shape) > 1:
            continue
        nodes.append(node)
        weight, bias = (other, bias) if op == "Mul" else (weight, other)
        value = node.outputs[0]
    return value, weight, bias


def _decomposed_norm(variance: ir.Node) -> tuple[Norm, list[ir.Node]]:
    """From the ReduceMean of a square: mean(v^2) + eps -> sqrt -> v / sqrt, with v = x - mean(x) for a
    LayerNorm, or v = x for an RMSNorm."""
    if not _last_axis_mean(variance):
        raise _Miss("the mean of squares is not over the last axis alone")
    square = variance.inputs[0].producer()
    v = _square_of(variance.inputs[0])
    nodes = [square, variance]
    kind, x = "rmsnorm", v
    centre = v.producer()
    if centre is not None and is_onnx_op(centre, "Sub"):
        mean = centre.inputs[1].producer()
        if mean is None or not is_onnx_op(mean, "ReduceMean") or mean.inputs[0] is not centre.inputs[0]:
            raise _Miss("x - something that is not mean(x) is squared")
        if not _last_axis_mean(mean):
            raise _Miss("the mean subtracted is not over the last axis alone")
        kind, x = "layernorm", centre.inputs[0]
        nodes = [mean, centre] + nodes
    add = _single_reader(variance.outputs[0])
    epsilon = _scalar(_other(add, variance.outputs[0])) if add is not None and is_onnx_op(add, "Add") else None
    if epsilon is None or epsilon < 0:
        raise _Miss("the variance is not plus a constant epsilon")
    nodes.append(add)
    root = _single_reader(add.outputs[0])
    if root is None:
        raise _Miss("the variance plus epsilon is read by more than one node")
    normalized = None
    if is_onnx_op(root, "Pow") and _scalar(root.inputs[1]) == -0.5:
        inverse = root
    elif is_onnx_op(root, "Sqrt"):
        nodes.append(root)
        inverse = _single_reader(root.outputs[0])
        if inverse is not None and is_onnx_op(inverse, "Div") and inverse.inputs[1] is root.outputs[0]:
            if inverse.inputs[0] is v:
                normalized = inverse
            elif _scalar(inverse.inputs[0]) != 1.0:
                raise _Miss(f"{_name(inverse)} divides something other than the normalized value")
        elif inverse is None or not is_onnx_op(inverse, "Reciprocal"):
            raise _Miss("the square root is not divided into the value")
    else:
        raise _Miss("the variance plus epsilon is not square-rooted")
    if normalized is None:
        nodes.append(inverse)
        normalized = _single_reader(inverse.outputs[0])
        if normalized is None or not is_onnx_op(normalized, "Mul") or _other(normalized, inverse.outputs[0]) is not v:
            raise _Miss("the inverse square root does not multiply the value")
    nodes.append(normalized)
    output, weight, bias = _affine(normalized.outputs[0], nodes)
    if not _closed(nodes, output):
        raise _Miss("a value inside the norm is read from outside it")
    norm = Norm(kind, "decomposed", -1, epsilon, weight.name if weight is not None else None,
                bias.name if bias is not None else None, x.name, output.name)
    return norm, nodes


@analysis("norms")
def find_norms(model: ir.Model) -> NormAnalysis:
    from edgec.analysis.shapes import ensure_shapes

    ensure_shapes(model)
    norms: list[Norm] = []
    unrecognised: list[tuple[str, str]] = []
    for node in model.graph:
        if is_onnx_op(node, "LayerNormalization", "RMSNormalization"):
            kind = "layernorm" if node.op_type == "LayerNormalization" else "rmsnorm"
            weight = node.inputs[1] if len(node.inputs) > 1 else None
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            norms.append(Norm(kind, "op", node.attributes.get_int("axis", -1), node.attributes.get_float("epsilon", 1e-5),
                              weight.name if weight is not None else None, bias.name if bias is not None else None,
                              node.inputs[0].name, node.outputs[0].name, [_name(node)]))
        elif is_onnx_op(node, "ReduceMean") and _square_of(node.inputs[0]) is not None:
            try:
                norm, nodes = _decomposed_norm(node)
            except _Miss as miss:
                unrecognised.append((_name(node), str(miss)))
                continue
            chosen = {id(n) for n in nodes}
            norm.nodes = [_name(n) for n in model.graph if id(n) in chosen]
            norms.append(norm)
    return NormAnalysis(norms, unrecognised)


def canonical_norm(norm: Norm, values: dict[str, ir.Value], x: np.ndarray) -> np.ndarray:
    """edgec's meaning of a norm, in float64 numpy, from its recorded weights."""
    x = x.astype(np.float64)
    axes = tuple(range(norm.axis % x.ndim, x.ndim))
    if norm.kind == "layernorm":
        x = x - x.mean(axis=axes, keepdims=True)
    y = x / np.sqrt((x * x).mean(axis=axes, keepdims=True) + norm.epsilon)
    if norm.weight:
        y = y * constant_array(values[norm.weight]).astype(np.float64)
    if norm.bias:
        y = y + constant_array(values[norm.bias]).astype(np.float64)
    return y


def check_norm(model: ir.Model, norm: Norm, rng: np.random.Generator, *, batch: int = 2, sequence: int = 5) -> float:
    """Max abs difference between the norm's original subgraph (onnxruntime) and canonical_norm."""
    values = _values_by_name(model)
    source = values[norm.input]
    x = rng.standard_normal(_bind(source.shape, batch, sequence)).astype(source.dtype.numpy())
    _, outside = nodes_between(model, [norm.input], norm.output)
    if outside:
        raise ValueError(f"norm {norm.output} reads {', '.join(outside)}, which is not its input")
    actual = run_subgraph(extract_subgraph(model, [norm.input], norm.output, "norm"), {norm.input: x}, norm.output)
    expected = canonical_norm(norm, values, x)
    return float(np.abs(actual.astype(np.float64) - expected).max())


# --- feed-forward blocks ------------------------------------------------------------------------------------

def _up(value: ir.Value, role: str) -> Projection:
    trace = _trace_projection(value, role)
    if trace.scale != 1.0 or trace.rotary is not None or trace.projection.columns is not None:
        raise _Miss(f"the {role} path is scaled, rotated or split")
    return trace.projection


def _in_features(values: dict[str, ir.Value], p: Projection) -> int:
    shape = constant_tensor(values[p.weight]).shape
    return shape[1] if p.weight_transposed else shape[0]


def _down(value: ir.Value) -> tuple[Projection, ir.Value]:
    """The projection reading `value` (past reshapes and casts), and its result after a bias and a
    reshape back to rank 3."""
    for _ in range(8):
        node = _single_reader(value)
        if node is None:
            raise _Miss("the activation is read by more than one node")
        if is_onnx_op(node, *_CARRY):
            value = node.outputs[0]
            continue
        if not is_onnx_op(node, "MatMul", "Gemm") or node.inputs[0] is not value or constant_tensor(node.inputs[1]) is None:
            raise _Miss(f"the activation reaches {node.op_type} {_name(node)}, not a projection with a constant weight")
        transposed = is_onnx_op(node, "Gemm") and bool(node.attributes.get_int("transB", 0))
        bias = node.inputs[2] if is_onnx_op(node, "Gemm") and len(node.inputs) > 2 else None
        out = node.outputs[0]
        after = _single_reader(out)
        if bias is None and after is not None and is_onnx_op(after, "Add"):
            other = _other(after, out)
            if constant_tensor(other) is not None and len(constant_tensor(other).shape) == 1:
                bias, out = other, after.outputs[0]
                after = _single_reader(out)
        if out.shape is not None and len(out.shape) == 2 and after is not None and is_onnx_op(after, "Reshape"):
            out = after.outputs[0]
        shape = constant_tensor(node.inputs[1]).shape
        width = shape[0] if transposed else shape[1]
        return Projection(_name(node), value.name, node.inputs[1].name, bias.name if bias is not None else None, transposed, None, width), out
    raise _Miss("the activation does not reach a projection")


def _feed_forward(model: ir.Model, activation: Activation, values: dict[str, ir.Value]) -> FeedForward:
    first = values[activation.input]
    gate = None
    up = _up(first, "up")
    value = values[activation.output]
    mul = _single_reader(value)
    if mul is not None and is_onnx_op(mul, "Mul"):
        try:
            other = _up(_other(mul, value), "up")
        except _Miss:
            other = None
        if other is not None and other.input == up.input:
            gate, up, value = up, other, mul.outputs[0]
    down, output = _down(value)
    hidden = _in_features(values, up)
    if gate is not None and gate.width != up.width:
        raise _Miss("the gate and up projections have different widths")
    if _in_features(values, down) != up.width or down.width != hidden:
        raise _Miss(f"the down projection {down.node} does not map {up.width} back to {hidden}")
    block = FeedForward(up, gate, down, activation.kind, hidden, up.width, up.input, output.name)
    block.nodes = [_name(n) for n in nodes_between(model, [up.input], output.name)[0]]
    return block


@analysis("ffn")
def find_feed_forward(model: ir.Model) -> list[FeedForward]:
    from edgec.analysis.shapes import ensure_shapes

    ensure_shapes(model)
    values = _values_by_name(model)
    blocks = []
    for activation in find_activations(model):
        try:
            blocks.append(_feed_forward(model, activation, values))
        except _Miss:
            continue  # a convolution's activation, or one outside any MLP
    return blocks
