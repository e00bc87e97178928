"""Shape arithmetic of real exports, resolved as far as shapes are known: Shape/Gather/Slice/Concat
chains become constants, Reshape targets become constant (0 = keep that dim, one -1), no-op Expands
go (here rather than in remove-identity: proving one usually takes the symbolic facts). Dims that
are truly dynamic stay computed at run time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
import onnx_ir as ir

from edgec.passes.cleanup._util import (
    ONNX_DOMAINS,
    add_initializer,
    bypass,
    constant_array,
    is_onnx_op,
    remove_dead,
    replace_with_initializer,
    same_shape,
)
from edgec.passes.core import NoOptions, Pass, PassContext, PassResult

# Shape tensors are short; longer integer constants are data, not shapes.
_MAX_ELEMENTS = 64


@dataclass(frozen=True)
class _Dim:
    """Axis `axis` of `value`: a dimension only known at run time."""

    value: ir.Value
    axis: int


Elem = Union[int, _Dim]


@dataclass(frozen=True)
class _Known:
    """What is known about a small integer tensor (0-D or 1-D): each element an int or a run-time dim."""

    elems: tuple[Elem, ...]
    scalar: bool
    dtype: ir.DataType

    @property
    def constant(self) -> bool:
        return all(isinstance(e, int) for e in self.elems)

    def array(self) -> np.ndarray:
        array = np.array(self.elems, dtype=self.dtype.numpy())
        return array.reshape(()) if self.scalar else array


def _dim(value: ir.Value, axis: int) -> int | ir.SymbolicDim | None:
    shape = value.shape
    if shape is None or not 0 <= axis < len(shape):
        return None
    return shape[axis]


def same_dim(a: Elem, b: Elem) -> bool:
    """True when two elements are provably the same size: equal ints, the same axis of the same
    value, or symbolic dims that shape inference gave the same name."""
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    if a == b:
        return True
    da, db = _dim(a.value, a.axis), _dim(b.value, b.axis)
    return isinstance(da, ir.SymbolicDim) and isinstance(db, ir.SymbolicDim) and da.value is not None and da.value == db.value


def _int_attr(node: ir.Node, name: str, default: int | None) -> int | None:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _axes(node: ir.Node, index: int) -> list[int] | None:
    """A constant axes input as a list (None when absent, [] for an empty tensor)."""
    value = node.inputs[index] if len(node.inputs) > index else None
    if value is None:
        return None
    array = constant_array(value)
    return None if array is None else [int(a) for a in array.reshape(-1)]


class _Facts:
    """Known contents of the graph's small integer tensors, computed in one topological sweep."""

    def __init__(self, graph: ir.Graph):
        self.known: dict[ir.Value, _Known] = {}
        for node in graph:
            if node.domain not in ONNX_DOMAINS or len(node.outputs) != 1:
                continue
            rule = _RULES.get(node.op_type)
            result = rule(self, node) if rule else None
            if result is not None and len(result.elems) <= _MAX_ELEMENTS:
                self.known[node.outputs[0]] = result

    def get(self, value: ir.Value | None) -> _Known | None:
        if value is None:
            return None
        if value in self.known:
            return self.known[value]
        array = constant_array(value, _MAX_ELEMENTS)
        if array is None or array.ndim > 1:
            return None
        if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
            return None
        known = _Known(tuple(int(x) for x in array.reshape(-1)), array.ndim == 0, ir.DataType.from_numpy(array.dtype))
        self.known[value] = known
        return known

    def inputs(self, node: ir.Node) -> list[_Known] | None:
        known = [self.get(v) for v in node.inputs]
        return None if any(k is None for k in known) else known


def _shape(facts: _Facts, node: ir.Node) -> _Known | None:
    x = node.inputs[0]
    if x is None or x.shape is None:
        return None
    rank = len(x.shape)
    start, end = _int_attr(node, "start", 0), _int_attr(node, "end", rank)
    start, end = (max(0, min(rank, i + rank if i < 0 else i)) for i in (start, end))
    elems = tuple(d if isinstance(d, int) else _Dim(x, i) for i, d in enumerate(x.shape) if start <= i < end)
    return _Known(elems, False, ir.DataType.INT64)


def _size(facts: _Facts, node: ir.Node) -> _Known | None:
    x = node.inputs[0]
    if x is None or x.shape is None or not x.shape.is_static():
        return None
    return _Known((int(np.prod(x.shape.numpy(), dtype=np.int64)),), True, ir.DataType.INT64)


def _gather(facts: _Facts, node: ir.Node) -> _Known | None:
    data = facts.get(node.inputs[0])
    indices = constant_array(node.inputs[1])
    if data is None or data.scalar or indices is None or indices.ndim > 1 or _int_attr(node, "axis", 0) not in (0, -1):
        return None
    n = len(data.elems)
    picked = []
    for i in indices.reshape(-1):
        i = int(i) + n if i < 0 else int(i)
        if not 0 <= i < n:
            return None
        picked.append(data.elems[i])
    return _Known(tuple(picked), indices.ndim == 0, data.dtype)


def _slice(facts: _Facts, node: ir.Node) -> _Known | None:
    data = facts.get(node.inputs[0])
    starts, ends = _axes(node, 1), _axes(node, 2)
    axes, steps = _axes(node, 3), _axes(node, 4)
    if data is None or data.scalar or starts is None or ends is None or len(starts) != 1 or len(ends) != 1:
        return None
    if (len(node.inputs) > 3 and node.inputs[3] is not None and axes not in ([0], [-1])) or (
        len(node.inputs) > 4 and node.inputs[4] is not None and (steps is None or len(steps) != 1 or steps[0] == 0)
    ):
        return None
    n, step = len(data.elems), steps[0] if steps else 1
    start, end = starts[0] + n if starts[0] < 0 else starts[0], ends[0] + n if ends[0] < 0 else ends[0]
    # ONNX clamps differently for negative steps: the end may sit one before the first element.
    if step > 0:
        start, end = min(max(start, 0), n), min(max(end, 0), n)
    else:
        start, end = min(max(start, 0), n - 1), min(max(end, -1), n - 1)
    return _Known(tuple(data.elems[i] for i in range(start, end, step)), False, data.dtype)


def _concat(facts: _Facts, node: ir.Node) -> _Known | None:
    parts = facts.inputs(node)
    if not parts or any(p.scalar for p in parts) or len({p.dtype for p in parts}) != 1:
        return None
    if _int_attr(node, "axis", 0) not in (0, -1):
        return None
    return _Known(tuple(e for p in parts for e in p.elems), False, parts[0].dtype)


def _unsqueeze(facts: _Facts, node: ir.Node) -> _Known | None:
    data = facts.get(node.inputs[0])
    if data is None or not data.scalar or _axes(node, 1) not in ([0], [-1]):
        return None
    return _Known(data.elems, False, data.dtype)


def _squeeze(facts: _Facts, node: ir.Node) -> _Known | None:
    data = facts.get(node.inputs[0])
    axes = _axes(node, 1)
    if data is None or data.scalar or len(data.elems) != 1 or (len(node.inputs) > 1 and node.inputs[1] is not None and axes not in ([0], [-1])):
        return None
    return _Known(data.elems, True, data.dtype)


def _cast(facts: _Facts, node: ir.Node) -> _Known | None:
    data = facts.get(node.inputs[0])
    to = ir.DataType(_int_attr(node, "to", 0))
    if data is None:
        return None
    if to == ir.DataType.INT64 or (to == ir.DataType.INT32 and all(-(2**31) <= e < 2**31 for e in data.elems if isinstance(e, int))):
        return _Known(data.elems, data.scalar, to)  # dims fit; run-time dims stay run-time dims
    if data.constant and (to.is_integer() or to == ir.DataType.BOOL):
        array = data.array().astype(to.numpy())
        if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
            return _Known(tuple(int(x) for x in array.reshape(-1)), data.scalar, to)
    return None


def _identity(facts: _Facts, node: ir.Node) -> _Known | None:
    return facts.get(node.inputs[0])


def _reshape(facts: _Facts, node: ir.Node) -> _Known | None:
    data = facts.get(node.inputs[0])
    shape = constant_array(node.inputs[1])
    if data is None or shape is None:
        return None
    if shape.size == 0 and len(data.elems) == 1:
        return _Known(data.elems, True, data.dtype)
    if shape.size == 1 and int(shape[0]) in (-1, len(data.elems)):
        return _Known(data.elems, False, data.dtype)
    return None


def _constant_of_shape(facts: _Facts, node: ir.Node) -> _Known | None:
    shape = facts.get(node.inputs[0])
    attr = node.attributes.get("value")
    if shape is None or not shape.constant or shape.scalar or len(shape.elems) != 1 or attr is None:
        return None
    if not 0 <= shape.elems[0] <= _MAX_ELEMENTS:
        return None
    fill = attr.as_tensor().numpy().reshape(-1)
    if fill.size != 1 or not (np.issubdtype(fill.dtype, np.integer) or fill.dtype == np.bool_):
        return None
    return _Known((int(fill[0]),) * shape.elems[0], False, ir.DataType.from_numpy(fill.dtype))


def _broadcast(*parts: _Known) -> tuple[list[tuple[Elem, ...]], bool] | None:
    n = max(len(p.elems) for p in parts)
    if any(len(p.elems) not in (1, n) for p in parts):
        return None
    rows = list(zip(*(p.elems * n if len(p.elems) == 1 else p.elems for p in parts)))
    return rows, all(p.scalar for p in parts)


def _equal_elems(a: Elem, b: Elem) -> int | None:
    if isinstance(a, int) and isinstance(b, int):
        return int(a == b)
    if same_dim(a, b):
        return 1
    if isinstance(a, int) or isinstance(b, int):
        other = a if isinstance(a, int) else b
        if other < 0:
            return 0  # a dim is never negative: the `-1` tests of torch's expand are decided here
    return None


def _equal(facts: _Facts, node: ir.Node) -> _Known | None:
    parts = facts.inputs(node)
    shaped = _broadcast(*parts) if parts else None
    if shaped is None:
        return None
    values = [_equal_elems(a, b) for a, b in shaped[0]]
    return None if None in values else _Known(tuple(values), shaped[1], ir.DataType.BOOL)


def _where(facts: _Facts, node: ir.Node) -> _Known | None:
    parts = facts.inputs(node)
    if not parts or not parts[0].constant or parts[1].dtype != parts[2].dtype:
        return None
    shaped = _broadcast(*parts)
    if shaped is None:
        return None
    return _Known(tuple(a if c else b for c, a, b in shaped[0]), shaped[1], parts[1].dtype)


def _arithmetic(
    op: Callable[[int, int], int], neutral: int | None, commutative: bool = False
) -> Callable[[_Facts, ir.Node], _Known | None]:
    """An integer op on known elements; a run-time dim survives only the neutral element (d+0, d*1)."""

    def rule(facts: _Facts, node: ir.Node) -> _Known | None:
        parts = facts.inputs(node)
        if not parts or len(parts) != 2 or parts[0].dtype != parts[1].dtype or parts[0].dtype == ir.DataType.BOOL:
            return None
        shaped = _broadcast(*parts)
        if shaped is None:
            return None
        out = []
        for a, b in shaped[0]:
            if isinstance(a, int) and isinstance(b, int):
                out.append(op(a, b))
            elif isinstance(b, int) and b == neutral:
                out.append(a)
            elif commutative and isinstance(a, int) and a == neutral:
                out.append(b)
            else:
                return None
        return _Known(tuple(out), shaped[1], parts[0].dtype)

    return rule


def _div(a: int, b: int) -> int:
    if b == 0 or a < 0 or b < 0:
        raise ZeroDivisionError  # signed integer division rounds differently across runtimes
    return a // b


def _safe(rule):
    def guarded(facts, node):
        try:
            return rule(facts, node)
        except (ZeroDivisionError, OverflowError, ValueError, IndexError):
            return None

    return guarded


_RULES: dict[str, Callable[[_Facts, ir.Node], _Known | None]] = {
    "Shape": _shape,
    "Size": _size,
    "Gather": _gather,
    "Slice": _slice,
    "Concat": _concat,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Cast": _cast,
    "Identity": _identity,
    "Reshape": _reshape,
    "ConstantOfShape": _constant_of_shape,
    "Equal": _equal,
    "Where": _where,
    "Add": _arithmetic(lambda a, b: a + b, 0, commutative=True),
    "Sub": _arithmetic(lambda a, b: a - b, 0),
    "Mul": _arithmetic(lambda a, b: a * b, 1, commutative=True),
    "Div": _arithmetic(_div, 1),
    "Max": _arithmetic(max, None),
    "Min": _arithmetic(min, None),
}
_RULES = {op: _safe(rule) for op, rule in _RULES.items()}


class SimplifyShapesPass(Pass):
    """Folds shape computations whose result is known (partly symbolic shapes included) and makes Reshape targets static."""

    name = "simplify-shapes"
    Options = NoOptions
    requires = ("shapes",)
    preserves = ("shapes",)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        ctx.analyses.get("shapes", model)  # annotates every value with its inferred shape
        facts = _Facts(graph)
        stats = {"shapes_folded": 0, "reshapes_made_static": 0, "expands_removed": 0, "nodes_removed": 0}
        for node in list(graph):
            if node.graph is not graph:  # removed with a chain that an earlier rewrite left dead
                continue
            if is_onnx_op(node, "Expand") and self._noop_expand(node, facts):
                if ctx.allow(self.name):
                    # Counted by the graph's size: at a graph output an Identity may take its place.
                    count, target = len(graph), node.inputs[1]
                    bypass(node, node.inputs[0])
                    remove_dead([target])
                    stats["nodes_removed"] += count - len(graph)
                    stats["expands_removed"] += 1
                continue
            if is_onnx_op(node, "Reshape"):
                target = self._static_target(node, facts)
                if target is not None and ctx.allow(self.name):
                    old = node.inputs[1]
                    node.replace_input_with(1, add_initializer(graph, np.array(target, dtype=np.int64)))
                    node.attributes.pop("allowzero", None)  # 0, the default: see _static_target
                    stats["nodes_removed"] += remove_dead([old])[0]
                    stats["reshapes_made_static"] += 1
            for value in node.outputs:
                if self._should_fold(value, facts) and ctx.allow(self.name):
                    replace_with_initializer(graph, value, facts.known[value].array())
                    stats["nodes_removed"] += remove_dead([value])[0]
                    stats["shapes_folded"] += 1
        return PassResult(model, any(stats.values()), stats)

    def _should_fold(self, value: ir.Value, facts: _Facts) -> bool:
        """A known value is folded where it is consumed by something that stays; values only feeding
        other foldable shape ops vanish with them."""
        known = facts.known.get(value)
        producer = value.producer()
        if known is None or not known.constant or producer is None or producer.op_type == "Constant":
            return False
        if producer.graph is None or value.is_graph_output() or not value.uses():
            return False
        return not all(self._vanishes(use.node, facts) for use in value.uses())

    def _vanishes(self, node: ir.Node, facts: _Facts) -> bool:
        return all(
            out in facts.known and facts.known[out].constant and not out.is_graph_output() for out in node.outputs
        )

    def _static_target(self, node: ir.Node, facts: _Facts) -> list[int] | None:
        """The Reshape's target as a constant (0 = copy the input's dim, at most one -1), when its
        run-time pieces are dims of the data at the same position."""
        data, shape = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
        known = facts.get(shape)
        if data is None or known is None or known.constant or known.scalar or constant_array(shape) is not None:
            return None
        # With allowzero=1 a literal 0 means an empty axis, so 0 cannot also mean "copy". Without
        # literal zeros the attribute changes nothing and the rewrite drops it.
        if _int_attr(node, "allowzero", 0) and 0 in known.elems:
            return None
        target: list[int] = []
        for i, elem in enumerate(known.elems):
            if isinstance(elem, int):
                target.append(elem)
            elif _dim(data, i) is not None and same_dim(elem, _Dim(data, i)):
                target.append(0)
            else:
                target.append(-1)
        return target if target.count(-1) <= 1 else None

    def _noop_expand(self, node: ir.Node, facts: _Facts) -> bool:
        """Whether the Expand gives back its input: every target element is 1 or the input's own dim
        there (a number, or a run-time dim the facts prove equal), or inference gave the output the
        input's shape."""
        x, out = node.inputs[0], node.outputs[0]
        if x is None or len(node.inputs) < 2:
            return False
        if same_shape(x.shape, out.shape):
            return True
        known = facts.get(node.inputs[1])
        if x.shape is None or known is None or known.scalar:
            return False
        rank = len(x.shape)
        if len(known.elems) > rank:
            return False  # Expand adds leading axes
        for j, elem in enumerate(known.elems):
            axis = rank - len(known.elems) + j
            if isinstance(elem, int) and elem == 1:
                continue
            if not same_dim(elem, x.shape[axis] if isinstance(x.shape[axis], int) else _Dim(x, axis)):
                return False
        return True
