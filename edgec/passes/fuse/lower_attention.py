"""lower-attention: every proven attention block in the form one runtime runs best.

Forms (a backend names its form in its lowering pipeline):
  onnxruntime  com.microsoft.Attention: one GEMM on packed Q/K/V weights and onnxruntime's fused
               attention kernel, where Q, K and V read one hidden state with as many K/V heads as
               query heads and no rotary embedding. Other blocks (grouped-query, rotary, cross
               attention) get com.microsoft.MultiHeadAttention on their rotated, repeated heads.
  decomposed   MatMul, Softmax, MatMul on [B, heads, S, head_dim], with the exporter's noise gone
               (IsNaN/Where guards, split scales, casts) and the 1/sqrt(d) scale in Q's weights and
               bias: TFLite's BATCH_MATMUL + SOFTMAX, and the pattern TensorRT's builder fuses into one
               kernel.
  sdpa         one call of the model-local function ai.edgec.ScaledDotProductAttention(q, k, v, bias)
               on [B, heads, S, head_dim] (q already scaled, by Q's weights): a backend with an
               attention op maps the call one to one (Core ML's scaled_dot_product_attention, TVM
               Relax's nn.attention); onnxruntime and every other ONNX consumer run the function's body.
The mask always arrives as an additive bias on the scores (a boolean mask is turned into one), which
keeps padding, causal and mixed masks exact in every form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import onnx_ir as ir

from edgec.analysis.attention import AttentionBlock, _values_by_name
from edgec.passes.blocks import (
    FORM_KEY, Builder, additive_mask, builder, built_form, exact_core, heads_qkv, merge_heads, packed_bias, packed_weight,
    project, replace_output, trusted_blocks,
)
from edgec.passes.core import Pass, PassContext, PassResult

MS_DOMAIN = "com.microsoft"
EDGEC_DOMAIN = "ai.edgec"
SDPA = "ScaledDotProductAttention"
FORMS = ("onnxruntime", "decomposed", "sdpa")


@dataclass
class LowerAttentionOptions:
    form: Literal["onnxruntime", "decomposed", "sdpa"] = "decomposed"


def packable(block: AttentionBlock) -> str | None:
    """Why the block cannot be one com.microsoft.Attention (packed Q/K/V), or None when it can."""
    if len({block.q.input, block.k.input, block.v.input}) != 1:
        return "Q, K and V read different inputs"
    if block.kv_heads != block.heads:
        return "grouped-query attention"
    if block.rotary:
        return "rotary embedding"
    return None


def _mask_shape(block: AttentionBlock, values: dict[str, ir.Value]) -> ir.Shape | None:
    return values[block.mask_value].shape if block.mask_value is not None else None


def unfit(block: AttentionBlock, values: dict[str, ir.Value]) -> str | None:
    """Why onnxruntime's attention ops cannot take the block's mask, or None when they can."""
    shape = _mask_shape(block, values)
    if block.mask_value is not None and (shape is None or len(shape) > 4):
        return f"mask {block.mask_value} has no known rank of at most 4"
    return None


def _bias_4d(b: Builder, block: AttentionBlock, values: dict[str, ir.Value], masks: dict) -> ir.Value | None:
    """The mask as onnxruntime's attention_bias: [B or 1, heads or 1, S, T], made once per mask."""
    if block.mask_value is None:
        return None
    key = (block.mask_value, block.q.input, block.k.input)
    if key in masks:
        return masks[key]
    mask = additive_mask(b, block, values)
    shape = _mask_shape(block, values)
    rank = len(shape)
    if rank < 4:
        mask = b.op("Unsqueeze", mask, b.ints(*range(4 - rank)))
    rows = shape[-2] if rank >= 2 else 1
    columns = shape[-1] if rank >= 1 else 1
    if rows == 1 or columns == 1:  # a row (or column) mask broadcast over the scores: onnxruntime wants them whole
        query, key_ = values[block.q.input], values[block.k.input]
        sizes = b.op("Concat", b.ints(1, 1), b.op("Shape", query, start=1, end=2), b.op("Shape", key_, start=1, end=2), axis=0)
        mask = b.op("Expand", mask, sizes)
    masks[key] = mask
    return mask


def _onnxruntime(b: Builder, block: AttentionBlock, values: dict[str, ir.Value], masks: dict) -> ir.Value:
    x = values[block.q.input]
    width = block.heads * block.head_dim
    attention_bias = _bias_4d(b, block, values, masks)
    if packable(block) is None:
        parts = (block.q, block.k, block.v)
        inputs = [x, packed_weight(b, values, parts), packed_bias(b, values, parts)] + ([None, None, attention_bias] if attention_bias is not None else [])
        attended = b.op("Attention", *inputs, domain=MS_DOMAIN, num_heads=block.heads, scale=block.scale,
                        meta={FORM_KEY: "onnxruntime"})
    else:
        q, k, v = heads_qkv(b, block, values)
        q, k, v = (merge_heads(b, t, width) for t in (q, k, v))
        inputs = [q, k, v] + ([None, None, attention_bias] if attention_bias is not None else [])
        attended = b.op("MultiHeadAttention", *inputs, domain=MS_DOMAIN, num_heads=block.heads, scale=block.scale,
                        meta={FORM_KEY: "onnxruntime"})
    # ONNX shape inference knows no contrib op: the output's shape is given here, for the analyses
    # after it (the cost of the O projection reading it).
    if x.shape is not None:
        attended.shape = ir.Shape([*x.shape[:-1], width])
    attended.dtype = x.dtype
    return project(b, attended, block.o, values)


def _decomposed(b: Builder, block: AttentionBlock, values: dict[str, ir.Value], masks: dict) -> ir.Value:
    q, k, v = heads_qkv(b, block, values, scaled=True)
    mask = additive_mask(b, block, values)
    attended = exact_core(b, q, k, v, 1.0, mask, form="decomposed")
    return project(b, merge_heads(b, attended, block.heads * block.head_dim), block.o, values)


def add_sdpa_function(model: ir.Model) -> None:
    """Declares ai.edgec.ScaledDotProductAttention(q, k, v, bias) = softmax(q·kᵀ + bias)·v in the model."""
    key = (EDGEC_DOMAIN, SDPA, "")
    if key in model.functions:
        return
    q, k, v, bias_in = (ir.Value(name=name) for name in ("q", "k", "v", "bias"))
    transposed = ir.node("Transpose", [k], {"perm": [0, 1, 3, 2]})
    scores = ir.node("MatMul", [q, transposed.outputs[0]])
    masked = ir.node("Add", [scores.outputs[0], bias_in])
    probabilities = ir.node("Softmax", [masked.outputs[0]], {"axis": -1})
    attended = ir.node("MatMul", [probabilities.outputs[0], v])
    body = ir.Graph([q, k, v, bias_in], [attended.outputs[0]], nodes=[transposed, scores, masked, probabilities, attended],
                    opset_imports={"": model.opset_imports.get("", 20)}, name=SDPA)
    model.functions[key] = ir.Function(EDGEC_DOMAIN, SDPA, graph=body, attributes=[])
    model.opset_imports.setdefault(EDGEC_DOMAIN, 1)


def _sdpa(b: Builder, block: AttentionBlock, values: dict[str, ir.Value], masks: dict) -> ir.Value:
    add_sdpa_function(b.model)
    q, k, v = heads_qkv(b, block, values, scaled=True)
    mask = additive_mask(b, block, values)
    attended = b.op(SDPA, q, k, v, mask if mask is not None else b.scalar(0.0), domain=EDGEC_DOMAIN,
                    meta={FORM_KEY: "sdpa"})
    return project(b, merge_heads(b, attended, block.heads * block.head_dim), block.o, values)


_BUILD = {"onnxruntime": _onnxruntime, "decomposed": _decomposed, "sdpa": _sdpa}


class LowerAttentionPass(Pass):
    """Rebuilds every proven attention block in the form a runtime runs best (fused op or decomposed)."""

    name = "lower-attention"
    Options = LowerAttentionOptions
    requires = ("attention",)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        form = self.options.form
        blocks, unproven = trusted_blocks(model, ctx)
        stats = {"blocks_lowered": 0, "packed_attention": 0, "unproven": unproven, "unfit": 0}
        cache: dict = {}
        masks: dict = {}
        for block in blocks:
            if built_form(model, block) == form:
                continue
            values = _values_by_name(model)
            if form == "onnxruntime" and unfit(block, values):
                stats["unfit"] += 1
                continue
            if not ctx.allow(self.name):
                continue
            b = builder(model, block, values, cache)
            new = _BUILD[form](b, block, values, masks)
            replace_output(model, block, new)
            stats["blocks_lowered"] += 1
            stats["packed_attention"] += form == "onnxruntime" and packable(block) is None
        if form == "onnxruntime" and stats["blocks_lowered"]:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return PassResult(model, stats["blocks_lowered"] > 0, stats)
