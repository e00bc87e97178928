"""Rebuilding recognised attention blocks: what every attention rewrite shares.

A rewrite reads an `AttentionBlock` record (edgec.analysis.attention), builds the block anew from its
recorded weights, with the exporter's noise gone, and moves the readers of the old output to the new
one; the old nodes are then dead and removed. The pieces are the canonical ones of
`canonical_attention`: project, split heads, rotate, repeat K/V heads, the attention core, merge heads,
project out. A rewrite chooses the core (the exact decomposed one, a fused runtime op, a sliding
window, linear attention) and reuses the rest.

Only blocks proven by execution (`verify_blocks`) are rebuilt: a record that does not compute what
the original subgraph computes would silently change the model.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_ir as ir

from edgec import ir as eir
from edgec.analysis.attention import AttentionBlock, Projection, _values_by_name, verify_blocks
from edgec.ir.constants import MAX_CONSTANT_ELEMENTS, constant_array
from edgec.passes.cleanup._util import add_initializer, remove_dead
from edgec.passes.core import PassContext

# Node metadata that marks the Softmax (or fused op) of a block a pass built, with the form it built:
# a second run of that pass recognises its own work and leaves it alone.
FORM_KEY = "edgec.attention_form"

_FLOAT_MIN = {ir.DataType.FLOAT: np.finfo(np.float32).min, ir.DataType.FLOAT16: np.finfo(np.float16).min,
              ir.DataType.DOUBLE: np.finfo(np.float64).min}
_END = np.iinfo(np.int64).max  # a Slice end past any axis


def lowest(dtype: ir.DataType) -> float:
    """The lowest finite value of the float type `dtype` (-1e30 for a type not in the table)."""
    return float(_FLOAT_MIN.get(dtype, -1e30))


class Builder:
    """Adds nodes to a graph just before `anchor`, which comes after every value the new nodes read."""

    def __init__(self, model: ir.Model, anchor: ir.Node, dtype: ir.DataType, cache: dict | None = None):
        self.model = model
        self.dtype = dtype  # the float type the block computes in (new values carry no type yet)
        self.graph = model.graph
        self.anchor = anchor
        # Constants derived from weights (cut, transposed, packed), shared by every block of one pass
        # run: ALBERT's layers share one set of weights, and so must their rebuilt blocks.
        self.cache = cache if cache is not None else {}

    def op(self, op_type: str, *inputs: ir.Value | None, domain: str = "", outputs: int = 1,
           meta: dict[str, str] | None = None, **attributes) -> ir.Value | tuple[ir.Value, ...]:
        node = ir.node(op_type, list(inputs), {k: v for k, v in attributes.items() if v is not None},
                       domain=domain, num_outputs=outputs, metadata_props=meta)
        self.graph.insert_before(self.anchor, node)
        return node.outputs[0] if outputs == 1 else tuple(node.outputs)

    def const(self, array) -> ir.Value:
        return add_initializer(self.graph, np.asarray(array))

    def ints(self, *values: int) -> ir.Value:
        return self.const(np.array(values, dtype=np.int64))

    def scalar(self, value: float) -> ir.Value:
        return self.const(np.array(value, dtype=self.dtype.numpy()))

    def derived(self, key: tuple, make: Callable[[], np.ndarray]) -> ir.Value:
        """A constant computed from weights once per pass run (`key` names what it is made from)."""
        if key not in self.cache or not self.cache[key].is_initializer():
            self.cache[key] = self.const(make())
        return self.cache[key]


# --- the records, as arrays ------------------------------------------------------------------------------

def weight(values: dict[str, ir.Value], p: Projection, dtype=None) -> np.ndarray:
    """The projection's weight as [in, out], cut to the columns it uses (a copy: the original stays)."""
    w = constant_array(values[p.weight])
    if p.weight_transposed:
        w = w.T
    if p.columns is not None:
        w = w[:, p.columns[0]:p.columns[1]]
    return np.ascontiguousarray(w, dtype=dtype or w.dtype)


def bias(values: dict[str, ir.Value], p: Projection, dtype=None) -> np.ndarray | None:
    if not p.bias:
        return None
    b = constant_array(values[p.bias]).reshape(-1)
    if p.columns is not None and b.shape[-1] != p.width:  # a fused bias, as wide as the fused weight
        b = b[p.columns[0]:p.columns[1]]
    return np.ascontiguousarray(b, dtype=dtype or b.dtype)


# --- the pieces ------------------------------------------------------------------------------------------

def _scaled(array: np.ndarray, scale: float) -> np.ndarray:
    return array if scale == 1.0 else array * array.dtype.type(scale)


def weight_value(b: Builder, values: dict[str, ir.Value], p: Projection, scale: float = 1.0) -> ir.Value:
    """The projection's weight (times `scale`) as an [in, out] value: the original initializer when it
    already is one."""
    original = values[p.weight]
    if scale == 1.0 and not p.weight_transposed and p.columns is None and original.dtype == b.dtype:
        return original
    dtype = b.dtype.numpy()
    return b.derived(("weight", p.weight, p.columns, p.weight_transposed, str(dtype), scale),
                     lambda: _scaled(weight(values, p, dtype), scale))


def bias_value(b: Builder, values: dict[str, ir.Value], p: Projection, scale: float = 1.0) -> ir.Value | None:
    if not p.bias:
        return None
    original = values[p.bias]
    if scale == 1.0 and (p.columns is None or original.shape[-1] == p.width) and original.dtype == b.dtype:
        return original
    dtype = b.dtype.numpy()
    return b.derived(("bias", p.bias, p.columns, str(dtype), scale), lambda: _scaled(bias(values, p, dtype), scale))


def packed_weight(b: Builder, values: dict[str, ir.Value], parts: tuple[Projection, ...]) -> ir.Value:
    """The projections' weights side by side, [in, sum of widths]: one GEMM instead of several."""
    dtype = b.dtype.numpy()
    key = tuple((p.weight, p.columns, p.weight_transposed) for p in parts)
    return b.derived(("packed-weight", str(dtype)) + key, lambda: np.concatenate([weight(values, p, dtype) for p in parts], axis=1))


def packed_bias(b: Builder, values: dict[str, ir.Value], parts: tuple[Projection, ...]) -> ir.Value:
    """The projections' biases end to end (zeros for a projection without one)."""
    dtype = b.dtype.numpy()
    key = tuple((p.bias, p.columns, p.width) for p in parts)
    return b.derived(("packed-bias", str(dtype)) + key, lambda: np.concatenate(
        [bias(values, p, dtype) if p.bias else np.zeros(p.width, dtype) for p in parts]))


def project(b: Builder, x: ir.Value, p: Projection, values: dict[str, ir.Value], scale: float = 1.0) -> ir.Value:
    """x·W + bias; with `scale`, (x·W + bias)·scale by a scaled copy of W and bias (no Mul at run time)."""
    y = b.op("MatMul", x, weight_value(b, values, p, scale))
    bias_in = bias_value(b, values, p, scale)
    return y if bias_in is None else b.op("Add", y, bias_in)


def split_heads(b: Builder, y: ir.Value, heads: int, head_dim: int) -> ir.Value:
    """[B, S, heads*head_dim] -> [B, heads, S, head_dim]."""
    return b.op("Transpose", b.op("Reshape", y, b.ints(0, 0, heads, head_dim)), perm=[0, 2, 1, 3])


def merge_heads(b: Builder, t: ir.Value, width: int) -> ir.Value:
    """[B, heads, S, head_dim] -> [B, S, heads*head_dim]."""
    return b.op("Reshape", b.op("Transpose", t, perm=[0, 2, 1, 3]), b.ints(0, 0, width))


def rotate(b: Builder, t: ir.Value, cos: ir.Value, sin: ir.Value, head_dim: int) -> ir.Value:
    """t*cos + rotate_half(t)*sin, rotate_half(t) = concat(-t[..., d/2:], t[..., :d/2])."""
    half = head_dim // 2
    axis = b.ints(-1)
    first = b.op("Slice", t, b.ints(0), b.ints(half), axis)
    second = b.op("Slice", t, b.ints(half), b.ints(head_dim), axis)
    rotated = b.op("Concat", b.op("Neg", second), first, axis=-1)
    return b.op("Add", b.op("Mul", t, cos), b.op("Mul", rotated, sin))


def repeat_kv(b: Builder, t: ir.Value, groups: int, heads: int, head_dim: int) -> ir.Value:
    """[B, kv_heads, T, d] -> [B, heads, T, d], each K/V head shared by `groups` query heads in a row."""
    if groups == 1:
        return t
    wide = b.op("Expand", b.op("Unsqueeze", t, b.ints(2)), b.ints(1, 1, groups, 1, 1))
    return b.op("Reshape", wide, b.ints(0, heads, -1, head_dim))


def additive_mask(b: Builder, block: AttentionBlock, values: dict[str, ir.Value]) -> ir.Value | None:
    """The block's mask as a value added to the scores (a boolean mask becomes 0 / the lowest float)."""
    if block.mask_value is None:
        return None
    mask = values[block.mask_value]
    if block.mask_form == "boolean":
        return b.op("Where", mask, b.scalar(0.0), b.scalar(lowest(b.dtype)))
    if mask.dtype != b.dtype:
        return b.op("Cast", mask, to=b.dtype)
    return mask


def mask_problem(model: ir.Model, block: AttentionBlock) -> str | None:
    """Why the block's mask cannot be reduced to one row of key biases, or None when it can."""
    if block.mask_value is None:
        return None
    mask = _values_by_name(model)[block.mask_value]
    if mask.shape is None:
        return "the mask's rank is not known"
    if len(mask.shape) > 4:
        return f"the mask has rank {len(mask.shape)}"
    if len(mask.shape) == 0 or mask.shape[-1] == 1:
        return "the mask is broadcast over the keys"
    if block.mask == "constant":
        array = constant_array(mask, MAX_CONSTANT_ELEMENTS)
        if array is not None and array.ndim >= 2 and not (array == array[..., -1:, :]).all():
            return "the constant mask differs between queries"
    return None


def key_mask(b: Builder, mask: ir.Value, rank: int) -> ir.Value:
    """The additive mask's last query row, [B|1, H|1, 1, T]: the bias every key gets."""
    if rank < 4:
        mask = b.op("Unsqueeze", mask, b.ints(*range(4 - rank)))
    return b.op("Slice", mask, b.ints(-1), b.ints(_END), b.ints(2))


def mask_rank(model: ir.Model, block: AttentionBlock) -> int:
    if block.mask_value is None:
        return 0
    return len(_values_by_name(model)[block.mask_value].shape)


def heads_qkv(b: Builder, block: AttentionBlock, values: dict[str, ir.Value],
              scaled: bool = False) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Q, K, V as [B, heads, S, head_dim], rotated, with K/V heads repeated for grouped-query attention.
    `scaled`: Q comes out multiplied by the block's scale, which its projection's weights and bias carry
    (rotation is linear, so it commutes): the scores then need no Mul."""
    d = block.head_dim
    q = split_heads(b, project(b, values[block.q.input], block.q, values, block.scale if scaled else 1.0), block.heads, d)
    k = split_heads(b, project(b, values[block.k.input], block.k, values), block.kv_heads, d)
    v = split_heads(b, project(b, values[block.v.input], block.v, values), block.kv_heads, d)
    if block.rotary:
        cos, sin = values[block.rotary_cos], values[block.rotary_sin]
        q, k = rotate(b, q, cos, sin, d), rotate(b, k, cos, sin, d)
    groups = block.heads // block.kv_heads
    return q, repeat_kv(b, k, groups, block.heads, d), repeat_kv(b, v, groups, block.heads, d)


def exact_core(b: Builder, q: ir.Value, k: ir.Value, v: ir.Value, scale: float, mask: ir.Value | None,
               form: str = "decomposed") -> ir.Value:
    """softmax(q·kᵀ·scale + mask)·v with the scale on q (head_dim wide, cheaper than the scores); none
    for scale 1 (a q that `heads_qkv(scaled=True)` made)."""
    if scale != 1.0:
        q = b.op("Mul", q, b.scalar(scale))
    scores = b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2]))
    if mask is not None:
        scores = b.op("Add", scores, mask)
    probabilities = b.op("Softmax", scores, axis=-1, meta={FORM_KEY: form})
    return b.op("MatMul", probabilities, v)


Core = Callable[[Builder, ir.Value, ir.Value, ir.Value, float, "ir.Value | None"], ir.Value]


# --- whole blocks ----------------------------------------------------------------------------------------

def trusted_blocks(model: ir.Model, ctx: PassContext) -> tuple[list[AttentionBlock], int]:
    """The attention blocks proven by execution, and how many were found but not proven."""
    if eir.name_nodes(model):  # records name their nodes: a cached record of unnamed ones is stale
        ctx.analyses.invalidate()
    analysis = ctx.analyses.get("attention", model)
    unproven = [block for block in analysis if block.verified is None]
    if unproven:
        verify_blocks(model, unproven)
    trusted = [block for block in analysis if block.verified]
    return trusted, len(analysis) - len(trusted)


def built_form(model: ir.Model, block: AttentionBlock) -> str | None:
    """The form a pass built this block in, or None for a block as the exporter wrote it."""
    for node in model.graph:
        if node.name == block.softmax:
            return node.metadata_props.get(FORM_KEY)
    return None


def anchor(model: ir.Model, block: AttentionBlock) -> ir.Node:
    """The node the new nodes go before: the one producing the block's output comes after all its inputs."""
    node = _values_by_name(model)[block.output].producer()
    assert node is not None, f"block {block.layer} output {block.output} has no producer"
    return node


def builder(model: ir.Model, block: AttentionBlock, values: dict[str, ir.Value], cache: dict | None = None) -> Builder:
    """A Builder placing the block's new nodes before its old output's producer, in its input's type."""
    return Builder(model, anchor(model, block), values[block.q.input].dtype, cache)


def replace_output(model: ir.Model, block: AttentionBlock, new: ir.Value) -> int:
    """Moves the readers of the block's old output to `new` and removes what is left dead. A graph
    output keeps its name. Returns the number of nodes removed."""
    return replace_value(model, block.output, new)


def replace_value(model: ir.Model, output: str, new: ir.Value) -> int:
    """`replace_output` for any block's output value, named `output`."""
    old = _values_by_name(model)[output]
    if new.shape is None and old.shape is not None:
        new.shape, new.type = old.shape, old.type
    name = old.name if old.is_graph_output() else None
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    removed, _ = remove_dead([old])
    if name is not None:
        new.name = name
    return removed


def rebuild(model: ir.Model, block: AttentionBlock, core: Core, cache: dict | None = None) -> int:
    """Rebuilds the block around `core`; returns the number of old nodes removed."""
    values = _values_by_name(model)
    b = builder(model, block, values, cache)
    q, k, v = heads_qkv(b, block, values)
    mask = additive_mask(b, block, values)
    attended = core(b, q, k, v, block.scale, mask)
    merged = merge_heads(b, attended, block.heads * block.head_dim)
    return replace_output(model, block, project(b, merged, block.o, values))


def replace_blocks(model: ir.Model, ctx: PassContext, pass_name: str, form: str,
                   core_of: Callable[[AttentionBlock], Core],
                   skip: Callable[[AttentionBlock], str | None] = lambda block: None,
                   reasons: tuple[str, ...] = ()) -> dict[str, int]:
    """The loop of the passes that replace attention by another computation: every proven block not
    built in `form` yet is rebuilt around `core_of(block)`, unless `skip(block)` names a reason (one
    of `reasons`, a stats key) or its mask is one the new core cannot take. Returns the stats."""
    blocks, unproven = trusted_blocks(model, ctx)
    stats = {"blocks_replaced": 0, "causal_blocks": 0, "unproven": unproven, "skipped_unsupported_mask": 0,
             **{reason: 0 for reason in reasons}}
    cache: dict = {}
    for block in blocks:
        if built_form(model, block) == form:
            continue
        reason = skip(block)
        if reason is None and mask_problem(model, block) is not None:
            reason = "skipped_unsupported_mask"
        if reason is not None:
            stats[reason] += 1
            continue
        if not ctx.allow(pass_name):
            continue
        rebuild(model, block, core_of(block), cache)
        stats["blocks_replaced"] += 1
        stats["causal_blocks"] += "causal" in block.mask
    return stats
