"""sliding-window-attention: every proven attention block becomes local attention over a band of keys,
computed chunk by chunk so that it costs O(n·W), not O(n²). Approximate: a query no longer sees keys
further than W positions away.

Query i attends to keys j with |i - j| <= W (0 <= i - j <= W in causal blocks). The sequence, padded at
run time to a multiple of W, is cut into chunks of W queries; each chunk scores the keys of its own
chunk and of its neighbours (previous and next, previous only when causal): scores [B, H, n/W, W, 3W].
A constant band mask keeps the relative positions inside the window, a key mask the padding. When the
sequence is no longer than W the result is exact attention.

The key mask is the last row of the model's mask: a padding (or constant) mask has the same row for
every query, and the last row of a causal+padding mask is exactly the padding. The causal part is
rebuilt by the band.

With `sinks=G` every query also sees the first G keys (earlier ones only, when causal), scored beside
its chunk's neighbourhood: trained encoders park much of their attention on [CLS], and cutting it off
costs more accuracy than the window does (all-MiniLM-L6-v2 on 128 tokens, W=64: token cosine 0.84
without, 0.96 with one sink).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import onnx_ir as ir

from edgec.errors import UserError
from edgec.passes.blocks import FORM_KEY, Builder, key_mask, lowest, mask_rank, replace_blocks
from edgec.passes.core import Pass, PassContext, PassResult


@dataclass
class SlidingWindowOptions:
    window: int = 128  # keys each side of a query (before it only, in causal blocks)
    # The first `sinks` keys (at most `window`) are seen by every query as well: the tokens like [CLS]
    # that trained models park attention on. Cutting them off costs far more accuracy than the window.
    sinks: int = 0


# --- the core ---------------------------------------------------------------------------------------------

def _pads(b: Builder, rank: int, axis: int, front: int, back: ir.Value) -> ir.Value:
    """Pad's pads input: `front` (constant) before and `back` (a 1-element value) after `axis`."""
    begins = [0] * rank
    begins[axis] = front
    parts = [b.ints(*begins, *([0] * axis)), back]
    if axis < rank - 1:
        parts.append(b.ints(*([0] * (rank - 1 - axis))))
    return b.op("Concat", *parts, axis=0)


def _neighbourhood(b: Builder, chunks: ir.Value, indices: ir.Value, width: int, tail: tuple[int, ...]) -> ir.Value:
    """[A, B, n + slots - 1, W, *tail] chunks -> [A, B, n, slots*W = width, *tail]: each chunk beside the ones
    after it, by one Gather of the [n, slots] chunk `indices` (Slices would do as well, but onnxruntime's
    symbolic shape inference spends a tenth of a second simplifying each one's output shape)."""
    gathered = b.op("Gather", chunks, indices, axis=2)  # [A, B, n, slots, W, *tail]
    return b.op("Reshape", gathered, b.ints(0, 0, 0, width, *tail))


def band(window: int, causal: bool, dtype: np.dtype) -> np.ndarray:
    """[W, slots*W] additive mask over (query in chunk, key slot): 0 inside the window, lowest outside.

    Key slot c sits at c - W from the chunk start, so query a sees it when a <= c <= a + 2W
    (a <= c <= a + W when causal: the key is at most W before the query, never after it)."""
    slots = 2 if causal else 3
    a = np.arange(window)[:, None]
    c = np.arange(slots * window)[None, :]
    inside = (c >= a) & (c <= a + (window if causal else 2 * window))
    return np.where(inside, 0.0, np.finfo(dtype).min).astype(dtype)


def _range(b: Builder, length: ir.Value) -> ir.Value:
    """0, 1, ..., length - 1 for a one-element `length`."""
    zero, one = (b.const(np.array(i, dtype=np.int64)) for i in (0, 1))
    return b.op("Range", zero, b.op("Squeeze", length, b.ints(0)), one)


def _sink_bias(b: Builder, chunk_numbers: ir.Value, row: ir.Value, window: int, sinks: int, causal: bool) -> ir.Value:
    """[B|1, H|1, n, W, G] additive mask of the G sink keys: the key mask, and lowest where a sink is
    inside the query's window already (the band counts it there)."""
    w = window
    start = b.op("Mul", b.op("Unsqueeze", chunk_numbers, b.ints(1, 2)), b.ints(w))  # [n, 1, 1]
    query = b.op("Add", start, b.const(np.arange(w, dtype=np.int64).reshape(1, w, 1)))  # [n, W, 1]: absolute position
    distance = b.op("Sub", query, b.const(np.arange(sinks, dtype=np.int64).reshape(1, 1, sinks)))
    outside = b.op("Greater", distance if causal else b.op("Abs", distance), b.ints(w))  # [n, W, G]
    floor = b.scalar(lowest(b.dtype))
    local = b.op("Where", outside, b.scalar(0.0), floor)
    return b.op("Min", b.op("Unsqueeze", row, b.ints(2)), local)  # row [B|1, H|1, 1, G] -> [.., n, W, G]


def window_core(b: Builder, q: ir.Value, k: ir.Value, v: ir.Value, scale: float, mask: ir.Value | None, *,
                window: int, causal: bool, head_dim: int, rank: int, form: str, sinks: int = 0) -> ir.Value:
    """Banded softmax attention on [B, H, S, head_dim], chunk by chunk (see the module docstring)."""
    w, slots = window, 2 if causal else 3
    # n = ceil(S / W) chunks, S + pad = n·W. Div rather than Mod: onnxruntime's symbolic shape inference
    # follows Div, so the padded shapes stay expressions of S instead of fresh unknown dims.
    seq = b.op("Shape", q, start=2, end=3)
    chunks = b.op("Div", b.op("Add", seq, b.ints(w - 1)), b.ints(w))
    pad = b.op("Sub", b.op("Mul", chunks, b.ints(w)), seq)
    key_pad = b.op("Add", pad, b.ints(w)) if not causal else pad  # and one chunk past the end
    chunk_numbers = _range(b, chunks)
    indices = b.op("Add", b.op("Unsqueeze", chunk_numbers, b.ints(1)), b.ints(*range(slots)))  # [n, slots]
    chunk_shape = b.ints(0, 0, -1, w, head_dim)

    queries = b.op("Reshape", b.op("Pad", q, _pads(b, 4, 2, 0, pad)), chunk_shape)  # [B, H, n, W, d]
    queries = b.op("Mul", queries, b.scalar(scale))
    padded_k, padded_v = (b.op("Pad", t, _pads(b, 4, 2, w, key_pad)) for t in (k, v))
    keys, values = (_neighbourhood(b, b.op("Reshape", t, chunk_shape), indices, slots * w, (head_dim,))
                    for t in (padded_k, padded_v))  # [B, H, n, slots*W, d]
    scores = b.op("MatMul", queries, b.op("Transpose", keys, perm=[0, 1, 2, 4, 3]))  # [B, H, n, W, slots*W]

    if mask is None:  # no mask, but the padded keys still need one
        zeros = ir.tensor(np.zeros(1, dtype=b.dtype.numpy()))
        row = b.op("ConstantOfShape", b.op("Concat", b.ints(1, 1, 1), seq, axis=0), value=zeros)
    else:
        row = key_mask(b, mask, rank)
    floor = b.scalar(lowest(b.dtype))
    padded_row = b.op("Pad", row, _pads(b, 4, 3, w, key_pad), floor)  # [B|1, H|1, 1, L]
    row = _neighbourhood(b, b.op("Reshape", padded_row, b.ints(0, 0, -1, w)), indices, slots * w, ())
    dtype = b.dtype.numpy()
    local = b.derived(("band", w, causal, str(dtype)), lambda: band(w, causal, dtype))
    # Min, not Add: two lowest floats would add up to -inf, and a row with every key masked to NaN.
    bias = b.op("Min", b.op("Unsqueeze", row, b.ints(3)), local)  # [B|1, H|1, n, W, slots*W]
    if sinks:
        # Sinks are read from the padded keys (W in front), where there are always G <= W of them: any
        # past the end of a short sequence are padding, masked. Gather, not Slice: its shape needs no proof.
        sink_positions = b.const(np.arange(w, w + sinks, dtype=np.int64))
        sink_keys = b.op("Gather", padded_k, sink_positions, axis=2)  # [B, H, G, d]
        sink_scores = b.op("MatMul", queries, b.op("Unsqueeze", b.op("Transpose", sink_keys, perm=[0, 1, 3, 2]), b.ints(2)))
        sink_bias = _sink_bias(b, chunk_numbers, b.op("Gather", padded_row, sink_positions, axis=3), w, sinks, causal)
        scores = b.op("Concat", sink_scores, scores, axis=-1)  # the G sinks first, then the neighbourhood
        bias = b.op("Concat", sink_bias, bias, axis=-1)
    probabilities = b.op("Softmax", b.op("Add", scores, bias), axis=-1, meta={FORM_KEY: form})
    if sinks:
        last = b.ints(-1)
        sink_values = b.op("Unsqueeze", b.op("Gather", padded_v, sink_positions, axis=2), b.ints(2))  # [B, H, 1, G, d]
        attended = b.op("Add", b.op("MatMul", b.op("Slice", probabilities, b.ints(0), b.ints(sinks), last), sink_values),
                        b.op("MatMul", b.op("Slice", probabilities, b.ints(sinks), b.ints(sinks + slots * w), last), values))
    else:
        attended = b.op("MatMul", probabilities, values)
    attended = b.op("Reshape", attended, b.ints(0, 0, -1, head_dim))
    # Gather, not Slice, drops the padded queries: symbolic shape inference cannot prove S <= n·W for a
    # Slice, takes the two as equal and from there mislabels the block's shapes; Range(0, S) is S long.
    return b.op("Gather", attended, _range(b, seq), axis=2)


# --- the pass ---------------------------------------------------------------------------------------------

class SlidingWindowAttentionPass(Pass):
    """Replaces every proven attention block by sliding-window attention, W keys each side (approximate)."""

    name = "sliding-window-attention"
    Options = SlidingWindowOptions
    requires = ("attention",)
    approximate = True

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        w, sinks = self.options.window, self.options.sinks
        if w < 1:
            raise UserError(f"sliding-window-attention window={w} is not a positive number of keys", "use window=64, for example")
        if not 0 <= sinks <= w:
            raise UserError(f"sliding-window-attention sinks={sinks} is not between 0 and the window ({w})", "use sinks=1, for example")
        form = f"sliding-window:{w}" + (f"+sinks:{sinks}" if sinks else "")
        # A window is relative positions within one sequence: cross-attention has none.
        skip = lambda block: "skipped_cross_attention" if block.q.input != block.k.input else None  # noqa: E731
        stats = replace_blocks(model, ctx, self.name, form, skip=skip, reasons=("skipped_cross_attention",),
                               core_of=lambda block: partial(window_core, window=w, causal="causal" in block.mask,
                                                             head_dim=block.head_dim, rank=mask_rank(model, block),
                                                             form=form, sinks=sinks))
        return PassResult(model, stats["blocks_replaced"] > 0, stats)
