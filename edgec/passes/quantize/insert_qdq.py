"""insert-qdq: static, full-integer quantization written as standard QDQ ONNX. Weights become int8
initializers behind DequantizeLinear, every activation a quantized op reads gets one
QuantizeLinear/DequantizeLinear pair with scales from calibration ranges, and embedding tables are
gathered as int8 then dequantized. onnxruntime, TensorRT and QNN all read this form.

Mixed precision names ops that take a wider rung: `wide` ops read their activations on a 16-bit grid
with int8 weights (A16W8, which Hexagon's HTP runs), `half` ops compute in fp16 (their weights stored
in fp16, their float inputs cast to fp16 and their result cast back), `exclude` ops stay as they
are. An activation read by ops of two precisions gets a pair for each.

With `outputs`, the result of each quantized MatMul/Gemm/Conv (after its bias Add, when a constant bias
follows) gets a pair too: runtimes whose integer kernels write integers (TFLite's int8 FULLY_CONNECTED
and BATCH_MATMUL) need the output's scale, and that is where it comes from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Mapping

import numpy as np
import onnx_ir as ir

from edgec.analysis.shapes import infer_shapes
from edgec.errors import UserError
from edgec.passes.cleanup._util import (
    add_initializer,
    bypass,
    constant_array,
    constant_tensor,
    ensure_shapes,
    is_onnx_op,
    remove_dead,
)
from edgec.passes.core import Pass, PassContext, PassResult

# ctx.options key: value name -> (low, high) measured by calibration for quantizable_activations().
RANGES_KEY = "activation_ranges"

T = ir.DataType
_FLOATS = (T.FLOAT, T.FLOAT16)  # what QuantizeLinear/DequantizeLinear-19 take as scale type
_OPS = {"MatMul", "Gemm", "Conv", "Gather"}

# scheme -> (storage type, qmin, qmax, symmetric). The signed schemes leave the lowest code unused so
# that +x and -x quantize alike (zero point 0), as TensorRT and the NPUs expect.
SCHEMES: dict[str, tuple[type, int, int, bool]] = {
    "uint8": (np.uint8, 0, 255, False),
    "int8": (np.int8, -127, 127, True),
    # int8 with a zero point: all 256 levels for one-sided ranges (softmax, GELU); TFLite's int8 kernels
    # take it, with weights still symmetric
    "int8-asym": (np.int8, -128, 127, False),
    "uint16": (np.uint16, 0, 65535, False),
    "int16": (np.int16, -32767, 32767, True),
}
# weight scheme -> the largest code of the symmetric grid. int7 is int8 storage with codes in
# [-63, 63]: x86 CPUs without VNNI multiply u8 x s8 with VPMADDUBSW, whose 16-bit sum of two products
# saturates for 8-bit weights (255 * 127 * 2 > 32767) but not for 7-bit ones (255 * 63 * 2 < 32767).
WEIGHT_QMAX = {"int8": 127, "int7": 63}
# The 16-bit scheme of A16W8 ops for each 8-bit scheme (TFLite's and QNN's 16-bit activations are
# symmetric int16 or asymmetric uint16).
WIDE = {"uint8": "uint16", "int8": "int16", "int8-asym": "int16", "uint16": "uint16", "int16": "int16"}
# ctx.options key: like RANGES_KEY, the ranges of the activations `wide` ops read (16-bit grids need
# no clipping: min/max); RANGES_KEY's serve where it is absent.
WIDE_RANGES_KEY = "activation_ranges_16bit"
_FP16_MAX = float(np.finfo(np.float16).max)
# QuantizeLinear takes 16-bit types from opset 21; before that onnxruntime's contrib ops do.
_STANDARD_16BIT_OPSET = 21
_CONTRIB = "com.microsoft"


@dataclass
class InsertQdqOptions:
    # activation scheme: uint8 asymmetric, int8 symmetric, or 16-bit (Hexagon's A16W8, say)
    activations: Literal["uint8", "int8", "int8-asym", "uint16", "int16"] = "uint8"
    weights: Literal["int8", "int7"] = "int8"  # symmetric; int7 for x86 without VNNI (WEIGHT_QMAX)
    per_channel: bool = True
    # also quantize MatMuls of two activations (Q·Kᵀ and P·V) when the target runs them in integers
    attention: bool = True
    # weight-only int8 for Gather from a constant table (half of MiniLM's bytes are embeddings)
    embeddings: bool = True
    exclude: tuple[str, ...] = ()  # node names kept in float (mixed precision chooses them)
    # also quantize what each quantized op computes (see the module's docstring), except the results
    # of `float_outputs` (node names: results whose int8 error calibration found too large)
    outputs: bool = False
    float_outputs: tuple[str, ...] = ()
    # mixed precision's wider rungs (node names): 16-bit activations with int8 weights; fp16
    wide: tuple[str, ...] = ()
    half: tuple[str, ...] = ()


@dataclass
class _Rewrite:
    """What quantizing one node takes."""

    node: ir.Node
    kind: Literal["linear", "attention", "embedding"]
    dtype: ir.DataType  # the float type it computes in
    activations: tuple[ir.Value, ...] = ()
    weight: ir.Value | None = None  # linear: the constant weight input; embedding: the table
    axis: int | None = None  # the weight's per-channel axis; None: one scale for the tensor
    output: ir.Value | None = None  # with `outputs`: the value whose pair carries the result's scale
    precision: Literal["int8", "int16", "fp16"] = "int8"


# --- matching ----------------------------------------------------------------------------------------

def _from_dequantize(value: ir.Value | None) -> bool:
    producer = None if value is None else value.producer()
    return producer is not None and producer.op_type == "DequantizeLinear" and producer.domain in ("", "ai.onnx", _CONTRIB)


def _weight_axis(node: ir.Node, rank: int) -> int:
    """The weight's output-channel axis: MatMul [.., in, out] the last, Gemm B [out, in] under transB, Conv 0."""
    if node.op_type == "MatMul":
        return rank - 1
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    return 0


def _match_linear(node: ir.Node, options: InsertQdqOptions) -> _Rewrite | str:
    x, w = node.inputs[0], node.inputs[1]
    if x is None or w is None:
        return "missing input"
    if _from_dequantize(x) or _from_dequantize(w):
        return "already quantized: an input comes from DequantizeLinear"
    if constant_tensor(w) is None:
        if node.op_type != "MatMul":
            return f"{node.op_type} weight is not constant"
        if not options.attention:
            return "MatMul of two activations (attention=false)"
        if constant_tensor(x) is not None:
            return "constant on the left of a MatMul"
        if not (x.dtype in _FLOATS and w.dtype == x.dtype):
            return "inputs are not float (or their types are unknown)"
        return _Rewrite(node, "attention", x.dtype, activations=(x, w))
    if constant_tensor(x) is not None:
        return "both inputs are constant (fold-constants folds it)"
    weight = constant_array(w)
    if weight is None or weight.dtype not in (np.float32, np.float16):
        return f"weight is {'unreadable' if weight is None else weight.dtype}, not float"
    if weight.ndim < 2 or (node.op_type == "Conv" and weight.ndim < 3):
        return f"weight is {weight.ndim}-D"
    if not np.isfinite(weight).all():
        return "weight has non-finite values"
    if (x.dtype or w.dtype) != w.dtype:
        return "activation and weight types differ"
    axis = _weight_axis(node, weight.ndim) if options.per_channel else None
    return _Rewrite(node, "linear", w.dtype, activations=(x,), weight=w, axis=axis)


def _match_gather(node: ir.Node, options: InsertQdqOptions) -> _Rewrite | str | None:
    table = node.inputs[0]
    if table is None or table.dtype not in _FLOATS or constant_tensor(table) is None:
        return None  # shape gathers and gathers of activations are no candidates
    if not options.embeddings:
        return "embeddings=false"
    rank = len(constant_tensor(table).shape)
    if rank < 2:
        return "table is not a matrix"
    if table.is_graph_output():
        return "table is a graph output"
    if node.attributes.get_int("axis", 0) % rank == rank - 1:
        return "gathers along the table's last axis"
    return _Rewrite(node, "embedding", table.dtype, weight=table, axis=rank - 1 if options.per_channel else None)


def _output_point(r: _Rewrite) -> ir.Value | None:
    """Where a quantized op's result is quantized: after the Add of a constant bias [n] that alone
    reads a MatMul's product (integer kernels add the bias in int32), else the op's own output. None
    for a graph output, which keeps its float type and name."""
    y = r.node.outputs[0]
    consumers = {use.node for use in y.uses()}
    n = constant_tensor(r.weight).shape[-1] if r.node.op_type == "MatMul" and r.weight is not None else None
    if n is not None and len(consumers) == 1 and not y.is_graph_output():
        add = consumers.pop()
        other = (add.inputs[1] if add.inputs[0] is y else add.inputs[0]) if is_onnx_op(add, "Add") else None
        bias = constant_array(other) if other is not None else None
        if bias is not None and bias.ndim <= 1 and bias.size == n:
            y = add.outputs[0]
    return None if y.is_graph_output() else y


def _match(node: ir.Node, options: InsertQdqOptions) -> _Rewrite | str | None:
    """What quantizing `node` takes, why it stays float, or None when it is no candidate."""
    if not is_onnx_op(node, *_OPS):
        return None
    if node.op_type == "Gather":
        result = _match_gather(node, options)
    elif len(node.inputs) < 2:
        return None
    else:
        result = _match_linear(node, options)
    if not isinstance(result, _Rewrite):
        return result
    if node.name in options.exclude:
        return "excluded"
    if node.name in options.half:
        if result.dtype != T.FLOAT:
            return "computes in fp16 already"
        result.precision = "fp16"
        return result
    if node.name in options.wide and result.kind != "embedding":  # a table's int8 rows have no activation
        result.precision = "int16"
    if options.outputs and result.kind != "embedding" and node.name not in options.float_outputs:
        result.output = _output_point(result)
    return result


def _plan(model: ir.Model, options: InsertQdqOptions, allow: Callable[[], bool] = lambda: True):
    """The rewrites of one run in graph order, and why each other candidate stays float (by node).

    `allow` (the debug counter) is asked once per matched node, in graph order."""
    rewrites: list[_Rewrite] = []
    misses: dict[ir.Node, str] = {}
    for node in model.graph:
        result = _match(node, options)
        if isinstance(result, str):
            misses[node] = result
        elif result is not None and allow():
            rewrites.append(result)
    # An embedding table is gathered in int8 only when its float copy goes: when every reader of it
    # is quantized with it as weight (tied output embeddings get their own per-row copy). Otherwise
    # the int8 rows would add bytes beside a float table that stays.
    while True:
        weights = {(id(r.node), id(r.weight)) for r in rewrites if r.weight is not None}
        blocked = next(((r, use.node) for r in rewrites if r.kind == "embedding" for use in r.weight.uses()
                        if (id(use.node), id(r.weight)) not in weights), None)
        if blocked is None:
            return rewrites, misses
        r, reader = blocked
        misses[r.node] = f"table is also read by {reader.op_type} {reader.name!r}, which keeps it float"
        rewrites = [x for x in rewrites if x is not r]


def _activation_names(rewrites: list[_Rewrite]) -> list[str]:
    values = [x for r in rewrites if r.precision != "fp16" for x in (*r.activations, r.output) if x is not None]
    return list(dict.fromkeys(x.name for x in values))


def _typed(model: ir.Model) -> None:
    """Infers types (in place) when a MatMul input lacks one: a MatMul of two activations is
    quantized only when both are known to be float, and the pass itself always infers them."""
    if any(is_onnx_op(n, "MatMul") and any(v is not None and v.dtype is None for v in n.inputs) for n in model.graph):
        infer_shapes(model)


def quantizable_activations(model: ir.Model, options: InsertQdqOptions) -> list[str]:
    """The activations insert-qdq quantizes with `options` (what calibration must measure), in graph order."""
    _typed(model)
    return _activation_names(_plan(model, options)[0])


def quantized_outputs(model: ir.Model, options: InsertQdqOptions) -> dict[str, str]:
    """node name -> the result insert-qdq quantizes for that node with `options` (see `outputs`)."""
    _typed(model)
    return {r.node.name: r.output.name for r in _plan(model, options)[0] if r.output is not None}


def near_misses(model: ir.Model, options: InsertQdqOptions) -> dict[str, str]:
    """node name -> why insert-qdq leaves that MatMul/Gemm/Conv/embedding Gather in float."""
    _typed(model)
    return {node.name: why for node, why in _plan(model, options)[1].items()}


# --- numbers -------------------------------------------------------------------------------------------

def _positive(scale: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Scales in `dtype`: where there is nothing to represent (all zeros) 1.0, never 0 (Q divides by it)."""
    scale = np.where(scale > 0, scale, 1.0).astype(dtype)
    return np.maximum(scale, np.finfo(dtype).tiny).astype(dtype)


def quantize_weight(w: np.ndarray, axis: int | None, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8: (codes, scales) with scale = max|w| / qmax along `axis` (None: one for the
    tensor); codes in [-qmax, qmax]."""
    w32 = w.astype(np.float32)
    if axis is None:
        scale = _positive(np.asarray(np.abs(w32).max() / qmax), w.dtype)
        broadcast = scale.astype(np.float32)
    else:
        others = tuple(i for i in range(w.ndim) if i != axis)
        scale = _positive(np.abs(w32).max(axis=others) / qmax, w.dtype)
        shape = [1] * w.ndim
        shape[axis] = -1
        broadcast = scale.astype(np.float32).reshape(shape)
    codes = np.clip(np.rint(w32 / broadcast), -qmax, qmax).astype(np.int8)
    return codes, scale


def activation_params(low: float, high: float, scheme: str, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) scalars for an activation calibrated to [low, high] under `scheme`.

    The range is widened to include 0, so that zero (padding, ReLU's floor) is exact."""
    storage, qmin, qmax, symmetric = SCHEMES[scheme]
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if symmetric:
        scale = _positive(np.asarray(max(-low, high) / qmax), dtype)
        return scale, np.zeros((), storage)
    scale = _positive(np.asarray((high - low) / (qmax - qmin)), dtype)
    zero = np.clip(np.rint(qmin - low / float(scale)), qmin, qmax)
    return scale, np.asarray(zero, storage)


def _check_range(name: str, value) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        low = high = float("nan")
    if not (np.isfinite(low) and np.isfinite(high) and low <= high):
        raise UserError(f"calibration range of {name!r} is {value!r}",
                        "recalibrate: every range must be finite (low, high) with low <= high")
    return low, high


# --- rewriting -----------------------------------------------------------------------------------------

class _Builder:
    """Adds the Q/DQ nodes of one pass run, sharing a pair per activation and scheme and a DQ per weight."""

    def __init__(self, model: ir.Model, options: InsertQdqOptions, ranges: Mapping[str, tuple[float, float]],
                 wide_ranges: Mapping[str, tuple[float, float]] | None = None):
        self.model, self.graph, self.options, self.ranges = model, model.graph, options, ranges
        self.wide_ranges = wide_ranges or ranges
        self.pairs: dict[tuple[int, str], ir.Value] = {}  # (activation, scheme) -> its pair's output
        self.weights: dict[tuple[int, int | None], ir.Value] = {}
        self.tables: dict[int, tuple[ir.Value, ir.Value]] = {}
        self.halves: dict[int, ir.Value] = {}  # float value -> its fp16 copy (initializer or Cast)
        self.added_bytes = 0

    def scheme(self, r: _Rewrite) -> str:
        return WIDE[self.options.activations] if r.precision == "int16" else self.options.activations

    def _domain(self, scheme: str) -> str:
        """QuantizeLinear's domain: the standard one, except for 16-bit types before opset 21."""
        wide = SCHEMES[scheme][0] in (np.uint16, np.int16)
        return _CONTRIB if wide and self.model.opset_imports.get("", 0) < _STANDARD_16BIT_OPSET else ""

    def _node(self, anchor: ir.Node, op: str, inputs, like: ir.Value, dtype: ir.DataType, domain: str = "",
              *, after: bool = False, **attrs) -> ir.Value:
        """A new node placed before `anchor` (after it with `after`)."""
        node = ir.node(op, inputs, attrs, domain=domain)
        (self.graph.insert_after if after else self.graph.insert_before)(anchor, node)
        out = node.outputs[0]
        out.type = ir.TensorType(dtype)
        if like.shape is not None:
            out.shape = like.shape.copy()
        return out

    def _const(self, array: np.ndarray) -> ir.Value:
        self.added_bytes += array.nbytes
        return add_initializer(self.graph, array)

    def activation(self, x: ir.Value, dtype: ir.DataType, reader: ir.Node, scheme: str, *,
                   after: bool = False) -> ir.Value:
        """x through its QuantizeLinear/DequantizeLinear pair of `scheme`, built before `reader` the
        first time (after it with `after`: `reader` is then x's producer)."""
        key = (id(x), scheme)
        if key not in self.pairs:
            wide = SCHEMES[scheme][0] in (np.uint16, np.int16) and scheme != self.options.activations
            low, high = (self.wide_ranges if wide else self.ranges)[x.name]
            scale, zero = activation_params(low, high, scheme, dtype.numpy())
            s, z = add_initializer(self.graph, scale), add_initializer(self.graph, zero)
            domain = self._domain(scheme)
            if domain:
                self.model.opset_imports.setdefault(domain, 1)
            q = self._node(reader, "QuantizeLinear", [x, s, z], x, ir.DataType.from_numpy(zero.dtype), domain,
                           after=after)
            self.pairs[key] = self._node(q.producer() if after else reader, "DequantizeLinear", [q, s, z], x, dtype,
                                         domain, after=after)
        return self.pairs[key]

    def output(self, y: ir.Value, dtype: ir.DataType, scheme: str) -> None:
        """Puts y's pair right after its producer and has every reader of y read the pair instead
        (the result is quantized once, as the integer kernel writes it); a quantized op reading y
        later finds the pair built."""
        if (id(y), scheme) in self.pairs:
            return
        readers = [(use.node, use.idx) for use in y.uses()]
        dq = self.activation(y, dtype, y.producer(), scheme, after=True)
        for node, index in readers:
            node.replace_input_with(index, dq)

    def _half_of(self, value: ir.Value, reader: ir.Node) -> ir.Value:
        """The fp16 copy of a float value: a constant converted once (clipped to fp16's range), an
        activation cast once, before its first fp16 reader."""
        if id(value) not in self.halves:
            array = constant_array(value)
            if array is not None:
                self.halves[id(value)] = self._const(np.clip(array, -_FP16_MAX, _FP16_MAX).astype(np.float16))
            else:
                self.halves[id(value)] = self._node(reader, "Cast", [value], value, T.FLOAT16, to=T.FLOAT16)
        return self.halves[id(value)]

    def half(self, r: _Rewrite) -> None:
        """The node again, computing in fp16 from fp16 copies of its float inputs, its result cast back
        to float (under the old name where it is a graph output)."""
        node = r.node
        inputs = [v if v is None or v.dtype != T.FLOAT else self._half_of(v, node) for v in node.inputs]
        same = {name: attr.value for name, attr in node.attributes.items()}
        old = node.outputs[0]
        computed = self._node(node, node.op_type, inputs, old, T.FLOAT16, node.domain, **same)
        computed.producer().name = node.name  # the node keeps its name (mixed precision chose it by name)
        bypass(node, self._node(node, "Cast", [computed], old, T.FLOAT, to=T.FLOAT))

    def _codes(self, w: ir.Value, axis: int | None, qmax: int = 127) -> tuple[ir.Value, ir.Value]:
        codes, scale = quantize_weight(constant_array(w), axis, qmax)
        return self._const(codes), self._const(scale)

    def weight(self, w: ir.Value, axis: int | None, reader: ir.Node) -> ir.Value:
        """The int8 weight (codes on the options' weight grid; tables keep all of int8: a Gather does
        no integer arithmetic) behind its DequantizeLinear, shared by the readers of `w`."""
        key = (id(w), axis)
        if key not in self.weights:
            codes, scale = self._codes(w, axis, WEIGHT_QMAX[self.options.weights])
            attrs = {} if axis is None else {"axis": axis}
            self.weights[key] = self._node(reader, "DequantizeLinear", [codes, scale], w, w.dtype, **attrs)
        return self.weights[key]

    def embedding(self, r: _Rewrite) -> None:
        """Gather(table, ids) becomes DequantizeLinear(Gather(int8 table, ids)): rows are dequantized
        after the gather, so the float table never exists at run time."""
        gather, table = r.node, r.weight
        if id(table) not in self.tables:
            self.tables[id(table)] = self._codes(table, r.axis)
        codes, scale = self.tables[id(table)]
        old = gather.outputs[0]
        ids = gather.inputs[1]
        same = {name: attr.value for name, attr in gather.attributes.items()}
        rows = self._node(gather, "Gather", [codes, ids], old, T.INT8, **same)
        attrs = {}
        if r.axis is not None:
            rank = len(old.shape) if old.shape is not None else None
            if rank is None and ids.shape is not None:
                rank = len(ids.shape) + len(constant_tensor(table).shape) - 1
            attrs["axis"] = -1 if rank is None else rank - 1
        bypass(gather, self._node(gather, "DequantizeLinear", [rows, scale], old, table.dtype, **attrs))


class InsertQdqPass(Pass):
    """Quantizes MatMul/Gemm/Conv (int8 per-channel weights, calibrated activations), attention
    MatMuls and embedding tables into standard QuantizeLinear/DequantizeLinear form."""

    name = "insert-qdq"
    Options = InsertQdqOptions
    requires = ("shapes",)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        ensure_shapes(model, ctx, _OPS)
        rewrites, _ = _plan(model, self.options, lambda: ctx.allow(self.name))
        stats = dict.fromkeys(("ops_quantized", "weights_quantized", "activations_quantized", "attention_matmuls",
                               "embeddings_quantized", "outputs_quantized", "ops_int16", "ops_fp16",
                               "weight_bytes_saved"), 0)
        if not rewrites:
            return PassResult(model, False, stats)
        given = ctx.options.get(RANGES_KEY) or {}
        needed = _activation_names(rewrites)
        missing = [name for name in needed if name not in given]
        if missing:
            shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise UserError(f"insert-qdq needs calibration ranges for {len(missing)} tensors ({shown})",
                            "compile with --precision int8 --calib DATA.npz")
        ranges = {name: _check_range(name, given[name]) for name in needed}
        if model.opset_imports.get("", 0) < 19:
            raise UserError(f"insert-qdq writes opset-19 QDQ but the model imports ONNX opset {model.opset_imports.get('')}",
                            "load it through edgec's ONNX frontend, which converts it to opset 20")

        wide = ctx.options.get(WIDE_RANGES_KEY)
        wide_ranges = {name: _check_range(name, wide[name]) for name in needed if name in wide} if wide else None
        b = _Builder(model, self.options, ranges, wide_ranges)
        floats: dict[int, ir.Value] = {}
        # Embeddings last: replacing a Gather renames its output, which a quantized op may read (and
        # calibration measured under the old name); the pair built on it moves along with the uses.
        for r in sorted(rewrites, key=lambda r: r.kind == "embedding"):
            node = r.node
            if r.precision == "fp16":
                floats.update((id(v), v) for v in node.inputs if v is not None and v.dtype == T.FLOAT
                              and constant_tensor(v) is not None)
                b.half(r)
                stats["ops_fp16"] += 1
                continue
            stats["ops_int16"] += r.precision == "int16"
            if r.kind == "embedding":
                floats[id(r.weight)] = r.weight
                b.embedding(r)
                stats["embeddings_quantized"] += 1
            else:
                for index, value in enumerate(list(node.inputs)):
                    if value is not None and any(value is x for x in r.activations):
                        node.replace_input_with(index, b.activation(value, r.dtype, node, b.scheme(r)))
                if r.weight is not None:
                    floats[id(r.weight)] = r.weight
                    node.replace_input_with(1, b.weight(r.weight, r.axis, node))
                if r.output is not None:
                    b.output(r.output, r.dtype, b.scheme(r))
                    stats["outputs_quantized"] += 1
                stats["attention_matmuls"] += r.kind == "attention"
            stats["ops_quantized"] += 1
        sizes = {key: _nbytes(w) for key, w in floats.items()}
        remove_dead(floats.values())
        freed = sum(sizes[key] for key, w in floats.items() if not w.uses() and not w.is_graph_output())
        stats["weights_quantized"] = len(floats)
        stats["activations_quantized"] = len(b.pairs)
        stats["weight_bytes_saved"] = freed - b.added_bytes
        return PassResult(model, True, stats)


def _nbytes(value: ir.Value) -> int:
    tensor = constant_tensor(value)
    return 0 if tensor is None else tensor.nbytes
