"""linear-attention: every proven attention block becomes kernelised linear attention (Katharopoulos et
al. 2020), O(n·d²) instead of O(n²·d). Approximate: the softmax kernel is replaced by another one.

    out_i = φ(q_i)·Σ_j w_j φ(k_j) v_jᵀ / φ(q_i)·Σ_j w_j φ(k_j),   φ(x) = elu(x) + 1

φ takes q and k as projected (and rotated), without the softmax scale: the normalisation makes a
common factor irrelevant, and the paper applies none. w_j = exp(key bias_j), the key bias being the
last query row of the model's additive mask (as in sliding-window-attention): 1 for a kept key, 0 for a
padded one (any bias below about -104 underflows to 0 in float32), and for a soft per-key bias exactly
the factor it puts on exp(score) in softmax attention. Causal blocks sum over j <= i with prefix sums
(CumSum of the φ(k_j) v_jᵀ outer products, [B, H, S, d, d]: S·d² floats per head, which `causal=false`
avoids by leaving causal blocks alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import onnx_ir as ir

from edgec.passes.blocks import FORM_KEY, Builder, key_mask, mask_rank, replace_blocks
from edgec.passes.core import Pass, PassContext, PassResult

FORM = "linear"


@dataclass
class LinearAttentionOptions:
    causal: bool = True  # rebuild causal blocks too (their prefix sums hold S·d² floats per head)


def _feature(b: Builder, t: ir.Value) -> ir.Value:
    return b.op("Add", b.op("Elu", t), b.scalar(1.0))


def linear_core(b: Builder, q: ir.Value, k: ir.Value, v: ir.Value, scale: float, mask: ir.Value | None, *,
                causal: bool, rank: int) -> ir.Value:
    """φ(q)(φ(k)ᵀv) / φ(q)Σφ(k) on [B, H, S, head_dim] (`scale` is not used: see the module docstring)."""
    queries, keys = _feature(b, q), _feature(b, k)
    if mask is not None:
        weights = b.op("Exp", b.op("Transpose", key_mask(b, mask, rank), perm=[0, 1, 3, 2]))  # [B|1, H|1, T, 1]
        keys = b.op("Mul", keys, weights)
    if causal:
        axis = b.const(np.array(2, dtype=np.int64))
        outer = b.op("Mul", b.op("Unsqueeze", keys, b.ints(-1)), b.op("Unsqueeze", v, b.ints(-2)))  # [B, H, S, d, d]
        state = b.op("CumSum", outer, axis)
        numerator = b.op("Squeeze", b.op("MatMul", b.op("Unsqueeze", queries, b.ints(-2)), state), b.ints(-2))
        normaliser = b.op("CumSum", keys, axis)  # [B, H, S, d]
    else:
        state = b.op("MatMul", b.op("Transpose", keys, perm=[0, 1, 3, 2]), v)  # [B, H, d, d]
        numerator = b.op("MatMul", queries, state)
        normaliser = b.op("ReduceSum", keys, b.ints(2), keepdims=1)  # [B, H, 1, d]
    denominator = b.op("ReduceSum", b.op("Mul", queries, normaliser), b.ints(-1), keepdims=1)
    # A query with every key masked has 0 / 0: make it 0, as a row of zero weights would give.
    tiny = b.scalar(float(np.finfo(b.dtype.numpy()).tiny))
    return b.op("Div", numerator, b.op("Max", denominator, tiny), meta={FORM_KEY: FORM})


class LinearAttentionPass(Pass):
    """Replaces every proven attention block by linear attention with φ(x) = elu(x) + 1 (approximate)."""

    name = "linear-attention"
    Options = LinearAttentionOptions
    requires = ("attention",)
    approximate = True

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        def skip(block) -> str | None:
            return "skipped_causal" if "causal" in block.mask and not self.options.causal else None

        stats = replace_blocks(model, ctx, self.name, FORM, skip=skip, reasons=("skipped_causal",), core_of=lambda block: partial(
            linear_core, causal="causal" in block.mask, rank=mask_rank(model, block)))
        return PassResult(model, stats["blocks_replaced"] > 0, stats)
