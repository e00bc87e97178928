"""Attention blocks recognised by meaning: from each Softmax outward to the QK^T and ·V MatMuls, the
scale, the mask, the head split/merge and the Q/K/V/O projections, whatever shape the exporter gave them.

Every Softmax that is not recognised comes back with the first check it failed, so a user can see why
an attention was not found. `check_block` proves a record by running the original subgraph against
edgec's canonical attention in numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from edgec.analysis import analysis
from edgec.ir.constants import MAX_CONSTANT_ELEMENTS, constant_array, constant_ints, constant_tensor, is_onnx_op

# Ops that only move or relabel data between a projection and the attention matmuls: followed through
# their first input. Reshape/Expand read a shape as the second input; that input is not data.
_PASS_THROUGH = ("Transpose", "Reshape", "Cast", "Unsqueeze", "Squeeze", "Identity", "Expand", "Flatten", "Tile")
_COMPARISONS = ("Less", "LessOrEqual", "Greater", "GreaterOrEqual")
_MAX_STEPS = 64
# A score filled with at most this much is masked out: exp(-1e4) is 0 in every float type.
_MASKED_SCORE = -1e4


@dataclass
class Projection:
    """A MatMul (or Gemm) of a hidden state by a constant weight, with an optional constant bias."""

    node: str
    input: str  # the hidden state it reads
    weight: str
    bias: str | None = None
    weight_transposed: bool = False  # Gemm transB=1: the weight is stored [out, in]
    columns: tuple[int, int] | None = None  # the output columns used, when one weight is fused (QKV)
    width: int = 0  # output features used


@dataclass
class AttentionBlock:
    layer: int
    softmax: str
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    mask: str  # "none", "padding", "causal" or "causal+padding"
    mask_value: str | None  # the value that masks the scores: added to them, or the condition of a Where
    mask_form: str | None  # "additive" or "boolean"
    rotary: bool
    rotary_cos: str | None
    rotary_sin: str | None
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    qk_matmul: str
    av_matmul: str
    output: str  # the block's result: the O projection (after its bias, and a reshape back to rank 3)
    nodes: list[str] = field(default_factory=list)
    verified: bool | None = None  # set by verify_blocks


@dataclass
class AttentionAnalysis:
    blocks: list[AttentionBlock]
    unrecognised: list[tuple[str, str]]  # (softmax node name, the first check that failed)

    def __iter__(self):
        return iter(self.blocks)

    def __len__(self):
        return len(self.blocks)


class _Miss(Exception):
    """A check that failed; its message is the reason reported for the Softmax."""


# --- small helpers ------------------------------------------------------------------------------------

def _scalar(value: ir.Value | None) -> float | None:
    array = constant_array(value, 1)
    if array is None or array.size != 1 or not np.issubdtype(array.dtype, np.floating):
        return None
    return float(array.reshape(-1)[0])


def _is_weight(value: ir.Value | None) -> bool:
    tensor = constant_tensor(value)
    return tensor is not None and len(tensor.shape) == 2


def _readers(value: ir.Value) -> list[ir.Node]:
    # A Shape only reads the size of a value: it is not where the data goes.
    return [user for user, _ in value.uses() if not is_onnx_op(user, "Shape", "Size")]


def _single_reader(value: ir.Value) -> ir.Node | None:
    readers = {id(n): n for n in _readers(value)}
    return next(iter(readers.values())) if len(readers) == 1 else None


def _name(node: ir.Node) -> str:
    return node.name or f"<{node.op_type}>"


# --- backward: from an attention operand to its projection ----------------------------------------------

@dataclass
class _Trace:
    projection: Projection
    scale: float = 1.0
    rotary: tuple[ir.Value, ir.Value] | None = None  # (cos, sin)
    split_dims: list[int] | None = None  # the head split Reshape's target, when constant


def _match_rotary(node: ir.Node):
    """Add(Mul(x, cos), Mul(rotate_half(x), sin)) with rotate_half made of Slice/Neg/Concat: (x, cos, sin)."""
    if not is_onnx_op(node, "Add"):
        return None
    muls = [v.producer() for v in node.inputs]
    if any(m is None or not is_onnx_op(m, "Mul") for m in muls):
        return None
    for first, second in ((muls[0], muls[1]), (muls[1], muls[0])):
        for i in (0, 1):
            x, cos = first.inputs[i], first.inputs[1 - i]
            for j in (0, 1):
                rotated, sin = second.inputs[j], second.inputs[1 - j]
                concat = rotated.producer() if rotated is not None else None
                if concat is None or not is_onnx_op(concat, "Concat"):
                    continue
                if all(_reaches(v, x, ("Slice", "Neg", "Split")) for v in concat.inputs):
                    return x, cos, sin
    return None


def _reaches(value: ir.Value | None, target: ir.Value, ops: tuple[str, ...]) -> bool:
    for _ in range(4):
        if value is target:
            return True
        producer = value.producer() if value is not None else None
        if producer is None or not is_onnx_op(producer, *ops):
            return False
        value = producer.inputs[0]
    return value is target


def _trace_projection(value: ir.Value, role: str) -> _Trace:
    """Walks from an operand of an attention MatMul back to the projection that made it."""
    scale = 1.0
    rotary = None
    split_dims = None
    columns = None
    bias = None
    for _ in range(_MAX_STEPS):
        node = value.producer()
        if node is None:
            raise _Miss(f"{role} path reaches a graph input before a projection")
        op = node.op_type
        if is_onnx_op(node, "MatMul") and _is_weight(node.inputs[1]):
            width = constant_tensor(node.inputs[1]).shape[1]
            return _Trace(_projection(node, node.inputs[0], node.inputs[1].name, bias, False, columns, width), scale, rotary, split_dims)
        if is_onnx_op(node, "Gemm") and _is_weight(node.inputs[1]) and not node.attributes.get_int("transA", 0):
            transposed = bool(node.attributes.get_int("transB", 0))
            gemm_bias = node.inputs[2] if len(node.inputs) > 2 else None
            if gemm_bias is not None and bias is not None:
                raise _Miss(f"{role} projection {_name(node)} has two biases")
            if gemm_bias is not None:
                if constant_tensor(gemm_bias) is None:
                    raise _Miss(f"{role} projection {_name(node)} has a bias that is not constant")
                if node.attributes.get_float("beta", 1.0) != 1.0 or node.attributes.get_float("alpha", 1.0) != 1.0:
                    raise _Miss(f"{role} projection {_name(node)} scales its operands (alpha/beta)")
                bias = gemm_bias
            shape = constant_tensor(node.inputs[1]).shape
            width = shape[0] if transposed else shape[1]
            return _Trace(_projection(node, node.inputs[0], node.inputs[1].name, bias, transposed, columns, width), scale, rotary, split_dims)
        if is_onnx_op(node, "MatMul", "Gemm"):
            raise _Miss(f"{role} projection {_name(node)} has no constant weight")
        if is_onnx_op(node, "Mul", "Div"):
            c = _scalar(node.inputs[1])
            if c is None and op == "Mul":
                c = _scalar(node.inputs[0])
                if c is not None:
                    value = node.inputs[1]
                    scale *= c
                    continue
            if c is None:
                raise _Miss(f"{role} path has {op} {_name(node)} by something that is not a constant scalar")
            scale *= c if op == "Mul" else 1.0 / c
            value = node.inputs[0]
            continue
        if is_onnx_op(node, "Add"):
            match = _match_rotary(node)
            if match is not None:
                if rotary is not None:
                    raise _Miss(f"{role} path applies rotary embedding twice")
                x, cos, sin = match
                rotary = (cos, sin)
                value = x
                continue
            constant = [i for i, v in enumerate(node.inputs) if constant_tensor(v) is not None]
            if len(constant) != 1:
                raise _Miss(f"{role} path has Add {_name(node)} that is neither a bias nor rotary embedding")
            if bias is not None:
                raise _Miss(f"{role} path adds two biases")
            bias = node.inputs[constant[0]]
            value = node.inputs[1 - constant[0]]
            continue
        if is_onnx_op(node, "Split"):
            columns = _split_columns(node, value, columns)
            if columns is None:
                raise _Miss(f"{role} path splits with {_name(node)} along an axis other than the last")
            value = node.inputs[0]
            continue
        if is_onnx_op(node, "Slice"):
            columns = _slice_columns(node, columns)
            if columns is None:
                raise _Miss(f"{role} path slices with {_name(node)} in a way edgec does not follow")
            value = node.inputs[0]
            continue
        if is_onnx_op(node, *_PASS_THROUGH):
            if op == "Reshape" and split_dims is None:
                dims = constant_ints(node.inputs[1])
                if dims is not None and len(dims) >= 4:
                    split_dims = dims
            value = node.inputs[0]
            continue
        raise _Miss(f"{role} path reaches {op} {_name(node)} before a projection")
    raise _Miss(f"{role} path is longer than {_MAX_STEPS} steps")


def _last_axis(node: ir.Node, axis: int) -> bool:
    rank = node.inputs[0].shape and len(node.inputs[0].shape)
    return axis == -1 or (rank is not None and axis == rank - 1)


def _split_columns(node: ir.Node, value: ir.Value, columns):
    if columns is not None or not _last_axis(node, node.attributes.get_int("axis", 0)):
        return None
    index = list(node.outputs).index(value)
    sizes = constant_ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if sizes is None:
        shape = node.inputs[0].shape
        if shape is None or not isinstance(shape[-1], int):
            return None
        parts = node.attributes.get_int("num_outputs", len(node.outputs))
        sizes = [math.ceil(shape[-1] / parts)] * parts
        sizes[-1] = shape[-1] - sum(sizes[:-1])
    start = sum(sizes[:index])
    return (start, start + sizes[index])


def _slice_columns(node: ir.Node, columns):
    if columns is not None or len(node.inputs) < 4:
        return None
    starts, ends, axes = (constant_ints(v) for v in node.inputs[1:4])
    steps = constant_ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
    if None in (starts, ends, axes) or len(axes) != 1 or steps != [1] or not _last_axis(node, axes[0]):
        return None
    width = node.inputs[0].shape[-1] if node.inputs[0].shape is not None else None
    if not isinstance(width, int) or starts[0] < 0:
        return None
    return (starts[0], min(ends[0], width))


def _projection(node, x, weight, bias, transposed, columns, width) -> Projection:
    # A projection flattened to rank 2 (Gemm) reads a Reshape of the hidden state: the hidden state is the input.
    producer = x.producer()
    if producer is not None and is_onnx_op(producer, "Reshape") and producer.inputs[0].shape is not None and len(producer.inputs[0].shape) >= 3:
        x = producer.inputs[0]
    if columns is not None:
        width = columns[1] - columns[0]
    return Projection(_name(node), x.name, weight, bias.name if bias is not None else None, transposed, columns, width)


# --- the scores: softmax input back to QK^T ---------------------------------------------------------------

def _scores(softmax: ir.Node):
    """(QK^T MatMul, scale, mask value, mask form) feeding the softmax."""
    value = softmax.inputs[0]
    scale = 1.0
    mask, form = None, None
    for _ in range(_MAX_STEPS):
        node = value.producer()
        if node is None:
            raise _Miss("no MatMul feeds the softmax")
        if is_onnx_op(node, "MatMul"):
            if any(constant_tensor(v) is not None for v in node.inputs):
                raise _Miss(f"the MatMul {_name(node)} feeding the softmax has a constant operand (not QK^T)")
            return node, scale, mask, form
        if is_onnx_op(node, "Mul", "Div"):
            c = _scalar(node.inputs[1])
            if c is None and node.op_type == "Mul" and _scalar(node.inputs[0]) is not None:
                scale *= _scalar(node.inputs[0])
                value = node.inputs[1]
                continue
            if c is None:
                raise _Miss(f"the scores are scaled by {node.op_type} {_name(node)} with something not a constant scalar")
            scale *= c if node.op_type == "Mul" else 1.0 / c
            value = node.inputs[0]
            continue
        if is_onnx_op(node, "Add"):
            if mask is not None:
                raise _Miss("the scores are masked twice")
            scores = [i for i, v in enumerate(node.inputs) if _leads_to_qk(v)]
            if len(scores) != 1:
                raise _Miss(f"no MatMul feeds the softmax through Add {_name(node)}")
            value, mask, form = node.inputs[scores[0]], node.inputs[1 - scores[0]], "additive"
            continue
        if is_onnx_op(node, "Where"):
            if mask is not None:
                raise _Miss("the scores are masked twice")
            cond, a, b = node.inputs
            if _scalar(b) is not None and _leads_to_qk(a):
                if _scalar(b) > _MASKED_SCORE:
                    raise _Miss(f"Where {_name(node)} fills masked scores with {_scalar(b):g}, which does not mask them")
                value = a
            elif _scalar(a) is not None and _leads_to_qk(b):
                raise _Miss(f"Where {_name(node)} keeps the scores where its mask is false (not supported yet)")
            else:
                raise _Miss(f"no MatMul feeds the softmax through Where {_name(node)}")
            mask, form = cond, "boolean"
            continue
        if is_onnx_op(node, "Cast", "Identity"):
            value = node.inputs[0]
            continue
        raise _Miss(f"no MatMul feeds the softmax: it reads {node.op_type} {_name(node)}")
    raise _Miss("no MatMul feeds the softmax")


def _leads_to_qk(value: ir.Value | None) -> bool:
    for _ in range(8):
        node = value.producer() if value is not None else None
        if node is None:
            return False
        if is_onnx_op(node, "MatMul"):
            return all(constant_tensor(v) is None for v in node.inputs)
        if is_onnx_op(node, "Mul", "Div") and (_scalar(node.inputs[1]) is not None or _scalar(node.inputs[0]) is not None):
            value = node.inputs[0] if _scalar(node.inputs[1]) is not None else node.inputs[1]
        elif is_onnx_op(node, "Cast", "Identity"):
            value = node.inputs[0]
        else:
            return False
    return False


def _mask_kind(mask: ir.Value | None) -> str:
    """"causal" when the mask is built from a triangle (Trilu, a comparison of two ranges, a triangular
    constant); "padding" when its data comes from a graph input; both may hold; "constant" otherwise."""
    if mask is None:
        return "none"
    causal = padding = False
    seen: set[int] = set()
    stack = [mask]
    while stack and len(seen) < 400:
        value = stack.pop()
        if value is None or id(value) in seen:
            continue
        seen.add(id(value))
        if value.is_graph_input():
            padding = True
            continue
        array = constant_array(value, MAX_CONSTANT_ELEMENTS)
        if array is not None:
            causal |= _triangular(array)
            continue
        node = value.producer()
        if node is None or is_onnx_op(node, "Shape", "Size", "ConstantOfShape"):
            continue  # what reads only a size carries no mask data
        if is_onnx_op(node, "Trilu"):
            causal = True
        if is_onnx_op(node, *_COMPARISONS) and all(constant_tensor(v) is None and _from_range(v) for v in node.inputs):
            causal = True
        stack.extend(node.inputs[:1] if is_onnx_op(node, "Expand", "Reshape", "Tile") else node.inputs)
    if causal:
        return "causal+padding" if padding else "causal"
    # A mask that reads no input and no triangle is the same for every run.
    return "padding" if padding else "constant"


def _from_range(value: ir.Value | None) -> bool:
    for _ in range(8):
        node = value.producer() if value is not None else None
        if node is None:
            return False
        if is_onnx_op(node, "Range"):
            return True
        value = node.inputs[0]
    return False


def _triangular(array: np.ndarray) -> bool:
    if array.ndim < 2 or array.shape[-1] != array.shape[-2] or array.shape[-1] < 2:
        return False
    square = array.reshape(-1, *array.shape[-2:])[0].astype(np.float64)
    return bool((np.triu(square, 1) == square.flat[1]).all() and (np.tril(square) == square[0, 0]).all() and square.flat[1] != square[0, 0])


# --- forward: softmax output to ·V and the O projection ---------------------------------------------------

def _probabilities_matmul(softmax: ir.Node) -> ir.Node:
    value = softmax.outputs[0]
    for _ in range(8):
        readers = {id(n): n for n in _readers(value)}
        nodes = list(readers.values())
        # Where(IsNaN(p), 0, p): the masked softmax of exporters that fear fully masked rows.
        isnan = [n for n in nodes if is_onnx_op(n, "IsNaN")]
        where = [n for n in nodes if is_onnx_op(n, "Where")]
        if len(nodes) == 2 and len(isnan) == 1 and len(where) == 1 and where[0].inputs[0] is isnan[0].outputs[0]:
            value = where[0].outputs[0]
            continue
        if len(nodes) != 1:
            raise _Miss("the softmax output is read by more than one node")
        node = nodes[0]
        if is_onnx_op(node, "MatMul") and node.inputs[0] is value:
            return node
        if is_onnx_op(node, "Cast", "Identity", "Dropout"):
            value = node.outputs[0]
            continue
        raise _Miss(f"the softmax output reaches {node.op_type} {_name(node)}, not a MatMul with V")
    raise _Miss("the softmax output does not reach a MatMul with V")


def _merge_and_output(av: ir.Node) -> tuple[Projection, ir.Value]:
    value = av.outputs[0]
    for _ in range(_MAX_STEPS):
        node = _single_reader(value)
        if node is None:
            raise _Miss("the attention output is read by more than one node before the O projection")
        if is_onnx_op(node, "Transpose", "Reshape", "Cast", "Identity", "Flatten"):
            value = node.outputs[0]
            continue
        if is_onnx_op(node, "MatMul", "Gemm") and node.inputs[0] is value:
            if not _is_weight(node.inputs[1]):
                raise _Miss(f"O projection {_name(node)} has no constant weight")
            transposed = is_onnx_op(node, "Gemm") and bool(node.attributes.get_int("transB", 0))
            bias = node.inputs[2] if is_onnx_op(node, "Gemm") and len(node.inputs) > 2 else None
            out = node.outputs[0]
            after = _single_reader(out)
            if bias is None and after is not None and is_onnx_op(after, "Add"):
                other = after.inputs[1] if after.inputs[0] is out else after.inputs[0]
                tensor = constant_tensor(other)
                if tensor is not None and len(tensor.shape) == 1:
                    bias, out = other, after.outputs[0]
                    after = _single_reader(out)
            if out.shape is not None and len(out.shape) == 2 and after is not None and is_onnx_op(after, "Reshape"):
                out = after.outputs[0]
            shape = constant_tensor(node.inputs[1]).shape
            width = shape[0] if transposed else shape[1]
            projection = Projection(_name(node), value.name, node.inputs[1].name, bias.name if bias is not None else None, transposed, None, width)
            return projection, out
        raise _Miss(f"the attention output reaches {node.op_type} {_name(node)}, not an O projection")
    raise _Miss("the attention output does not reach an O projection")


# --- the block -------------------------------------------------------------------------------------------

def _recognise(model: ir.Model, softmax: ir.Node, layer: int) -> AttentionBlock:
    axis = softmax.attributes.get_int("axis", -1)
    if not _last_axis(softmax, axis):
        raise _Miss("softmax axis is not the last")
    qk, scale, mask, form = _scores(softmax)
    av = _probabilities_matmul(softmax)
    q = _trace_projection(qk.inputs[0], "Q")
    k = _trace_projection(qk.inputs[1], "K")
    v = _trace_projection(av.inputs[1], "V")
    if v.scale != 1.0 or v.rotary is not None:
        raise _Miss("V path is scaled or rotated")
    o, output = _merge_and_output(av)
    head_dim = _head_dim(qk.inputs[0], q.split_dims)
    if head_dim is None:
        raise _Miss("head_dim is not known (Q has no static last dim)")
    if q.projection.width % head_dim or k.projection.width % head_dim:
        raise _Miss(f"projection widths {q.projection.width}/{k.projection.width} are not multiples of head_dim {head_dim}")
    heads, kv_heads = q.projection.width // head_dim, k.projection.width // head_dim
    if v.projection.width != k.projection.width:
        raise _Miss("K and V projections have different widths")
    if kv_heads == 0 or heads % kv_heads:
        raise _Miss(f"{heads} query heads cannot share {kv_heads} key/value heads")
    if (q.rotary is None) != (k.rotary is None):
        raise _Miss("rotary embedding is applied to only one of Q and K")
    cos, sin = q.rotary if q.rotary is not None else (None, None)
    block = AttentionBlock(
        layer=layer, softmax=_name(softmax), heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        scale=scale * q.scale * k.scale, mask=_mask_kind(mask), mask_value=mask.name if mask is not None else None,
        mask_form=form, rotary=q.rotary is not None, rotary_cos=cos.name if cos is not None else None,
        rotary_sin=sin.name if sin is not None else None, q=q.projection, k=k.projection, v=v.projection, o=o,
        qk_matmul=_name(qk), av_matmul=_name(av), output=output.name,
    )
    block.nodes = [_name(n) for n in _block_nodes(model, block)[0]]
    return block


def _head_dim(q: ir.Value, split_dims: list[int] | None) -> int | None:
    if q.shape is not None and len(q.shape) >= 3 and isinstance(q.shape[-1], int):
        return q.shape[-1]
    if split_dims and split_dims[-1] > 0:
        return split_dims[-1]
    return None


def _values_by_name(model: ir.Model) -> dict[str, ir.Value]:
    values = {v.name: v for v in model.graph.inputs}
    values.update(model.graph.initializers)
    for node in model.graph:
        for v in list(node.inputs) + list(node.outputs):
            if v is not None and v.name:
                values.setdefault(v.name, v)
    return values


def block_inputs(block: AttentionBlock) -> list[str]:
    """The values a block reads from the rest of the model: hidden states, the mask, rotary cos/sin."""
    names = [block.q.input, block.k.input, block.v.input, block.mask_value, block.rotary_cos, block.rotary_sin]
    return list(dict.fromkeys(n for n in names if n))


def _block_nodes(model: ir.Model, block: AttentionBlock) -> tuple[list[ir.Node], list[str]]:
    return nodes_between(model, block_inputs(block), block.output)


def nodes_between(model: ir.Model, inputs: list[str], output: str) -> tuple[list[ir.Node], list[str]]:
    """The nodes computing `output` from `inputs`, in graph order, and any other value (not a constant)
    they read from outside."""
    values = _values_by_name(model)
    stop = set(inputs)
    chosen: dict[int, ir.Node] = {}
    outside: list[str] = []
    stack = [values[output]]
    seen: set[int] = set()
    while stack:
        value = stack.pop()
        if value is None or id(value) in seen:
            continue
        seen.add(id(value))
        if value.name in stop or value.is_initializer():
            continue
        node = value.producer()
        if node is None:
            outside.append(value.name)
            continue
        if id(node) not in chosen:
            chosen[id(node)] = node
            stack.extend(node.inputs)
    order = [n for n in model.graph if id(n) in chosen]
    return order, outside


@analysis("attention")
def find_attention(model: ir.Model) -> AttentionAnalysis:
    from edgec.analysis.shapes import ensure_shapes

    ensure_shapes(model)
    blocks: list[AttentionBlock] = []
    unrecognised: list[tuple[str, str]] = []
    for node in model.graph.all_nodes():
        if not is_onnx_op(node, "Softmax"):
            continue
        try:
            blocks.append(_recognise(model, node, len(blocks)))
        except _Miss as miss:
            unrecognised.append((_name(node), str(miss)))
    return AttentionAnalysis(blocks, unrecognised)


# --- proof by execution -------------------------------------------------------------------------------------

def _bind(shape, batch: int, sequence: int) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else (batch if i == 0 else sequence) for i, d in enumerate(shape))


def _weights(values: dict[str, ir.Value], p: Projection) -> tuple[np.ndarray, np.ndarray | None]:
    """The projection's weight as [in, out] and its bias, cut to the columns it uses, in float64."""
    w = constant_array(values[p.weight])
    if p.weight_transposed:
        w = w.T
    b = constant_array(values[p.bias]) if p.bias else None
    if p.columns is not None:
        start, end = p.columns
        # A fused bias is as wide as the fused weight; a bias added after the split is already cut.
        if b is not None and b.shape[-1] == w.shape[1]:
            b = b[..., start:end]
        w = w[:, start:end]
    return w.astype(np.float64), (b.astype(np.float64) if b is not None else None)


def canonical_attention(block: AttentionBlock, values: dict[str, ir.Value], feeds: dict[str, np.ndarray]) -> np.ndarray:
    """edgec's meaning of an attention block, in float64 numpy, from its recorded weights."""

    def project(p: Projection, x):
        w, b = _weights(values, p)
        y = x.astype(np.float64) @ w
        return y + b if b is not None else y

    def split(y, heads):
        return np.moveaxis(y.reshape(*y.shape[:-1], heads, block.head_dim), -2, -3)

    def rotate(t, cos, sin):
        half = t.shape[-1] // 2
        return t * cos + np.concatenate([-t[..., half:], t[..., :half]], axis=-1) * sin

    q = split(project(block.q, feeds[block.q.input]), block.heads)
    k = split(project(block.k, feeds[block.k.input]), block.kv_heads)
    v = split(project(block.v, feeds[block.v.input]), block.kv_heads)
    if block.rotary:
        cos, sin = feeds[block.rotary_cos].astype(np.float64), feeds[block.rotary_sin].astype(np.float64)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    if block.kv_heads != block.heads:
        k = np.repeat(k, block.heads // block.kv_heads, axis=-3)
        v = np.repeat(v, block.heads // block.kv_heads, axis=-3)
    scores = q @ np.swapaxes(k, -1, -2) * block.scale
    if block.mask_form == "additive":
        scores = scores + feeds[block.mask_value]
    elif block.mask_form == "boolean":
        scores = np.where(feeds[block.mask_value], scores, -np.inf)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probabilities = scores / scores.sum(axis=-1, keepdims=True)
    merged = np.moveaxis(probabilities @ v, -3, -2)
    merged = merged.reshape(*merged.shape[:-2], -1)
    return project(block.o, merged)


def _subgraph_inputs(model: ir.Model, block: AttentionBlock) -> list[str]:
    """The block's inputs, and the model inputs it reads (exporters take sizes from input_ids)."""
    _, outside = _block_nodes(model, block)
    values = _values_by_name(model)
    foreign = [name for name in outside if not values[name].is_graph_input()]
    if foreign:
        raise ValueError(f"block {block.layer} reads {', '.join(foreign)}, which is neither its input nor a model input")
    return block_inputs(block) + [n for n in dict.fromkeys(outside) if n not in block_inputs(block)]


def block_subgraph(model: ir.Model, block: AttentionBlock):
    """The original nodes of the block as a standalone onnx model whose inputs are the block's inputs."""
    return extract_subgraph(model, _subgraph_inputs(model, block), block.output, "attention_block")


def extract_subgraph(model: ir.Model, inputs: list[str], output: str, name: str = "subgraph"):
    """The original nodes computing `output` from `inputs` as a standalone onnx model. Only those nodes
    and the constants they read are serialised, not the whole model."""
    import onnx

    nodes, _ = nodes_between(model, inputs, output)
    values = _values_by_name(model)
    chosen = [ir.serde.serialize_node(n) for n in nodes]
    produced = {o for n in chosen for o in n.output}
    read = list(dict.fromkeys(i for n in chosen for i in n.input if i and i not in produced))
    initializers = []
    for r in read:
        if r in values and values[r].is_initializer() and values[r].const_value is not None:
            tensor = ir.serde.serialize_tensor(values[r].const_value)
            tensor.name = r  # the tensor may carry an older name than its value
            initializers.append(tensor)
    graph_inputs = []
    for input_name in inputs:
        value = values[input_name]
        dims = [d if isinstance(d, int) else (getattr(d, "value", None) or f"d{i}") for i, d in enumerate(value.shape)]
        graph_inputs.append(onnx.helper.make_tensor_value_info(input_name, int(value.dtype.value), dims))
    result = onnx.helper.make_tensor_value_info(output, int(values[output].dtype.value), None)
    graph = onnx.helper.make_graph(chosen, name, graph_inputs, [result], initializers)
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    return onnx.helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version)


def block_feeds(model: ir.Model, block: AttentionBlock, rng: np.random.Generator, *, batch: int = 2, sequence: int = 5) -> dict[str, np.ndarray]:
    """Random hidden states, rotary tables of random angles, and a random mask."""
    values = _values_by_name(model)
    feeds = {}
    for name in _subgraph_inputs(model, block):
        value = values[name]
        shape = _bind(value.shape, batch, sequence)
        dtype = value.dtype.numpy()
        if name == block.mask_value:
            feeds[name] = _random_mask(rng, shape, dtype, block.mask_form)
        elif name == block.rotary_cos:
            angles = rng.uniform(-math.pi, math.pi, shape)
            feeds[name] = np.cos(angles).astype(dtype)
            feeds[block.rotary_sin] = np.sin(angles).astype(dtype)
        elif name in (block.q.input, block.k.input, block.v.input):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif name != block.rotary_sin:  # a model input the block reads only the size of
            feeds[name] = np.zeros(shape, dtype)
    return feeds


def _random_mask(rng: np.random.Generator, shape: tuple[int, ...], dtype, form: str | None) -> np.ndarray:
    """A mask that hides about a third of the keys, never the first: the proof then checks what the
    block does with a mask, not only that it runs."""
    keep = rng.random(shape) >= 1 / 3
    keep[..., 0] = True
    if form == "boolean":
        return keep.astype(dtype)
    return np.where(keep, 0.0, np.finfo(dtype).min if np.issubdtype(dtype, np.floating) else -1e9).astype(dtype)


def run_subgraph(subgraph, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
    """One output of an onnx model from onnxruntime on CPU, with its graph optimizations off so that
    the original nodes are what runs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(subgraph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (result,) = session.run([output], feeds)
    return result


def _run_block(model: ir.Model, block: AttentionBlock, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(the original subgraph's output from onnxruntime, canonical_attention's) on the same random feeds."""
    feeds = block_feeds(model, block, rng)
    actual = run_subgraph(block_subgraph(model, block), feeds, block.output)
    expected = canonical_attention(block, _values_by_name(model), feeds)
    if actual.size != expected.size:
        raise ValueError(f"block {block.layer}: the subgraph gives {actual.shape}, the canonical block {expected.shape}")
    return actual.reshape(expected.shape).astype(np.float64), expected


def check_block(model: ir.Model, block: AttentionBlock, rng: np.random.Generator) -> float:
    """Max abs difference between the block's original subgraph (onnxruntime) and canonical_attention."""
    actual, expected = _run_block(model, block, rng)
    return float(np.abs(actual - expected).max())


def verify_blocks(model: ir.Model, blocks, rng: np.random.Generator | None = None, *, rtol: float = 1e-4) -> None:
    """Sets `verified` on each block: True when its subgraph matches edgec's canonical attention
    within `rtol` of the output's magnitude."""
    rng = rng if rng is not None else np.random.default_rng(0)
    for block in blocks:
        try:
            actual, expected = _run_block(model, block, rng)
        except Exception:  # a subgraph onnxruntime cannot run is simply not proven
            block.verified = False
            continue
        block.verified = bool(np.abs(actual - expected).max() <= rtol * max(1.0, float(np.abs(expected).max())))
