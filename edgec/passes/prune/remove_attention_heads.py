"""remove-attention-heads: structured pruning of attention heads, without retraining.

The heads to remove are the least important over all layers (edgec.passes.prune.common: the energy a
head adds to the residual stream on calibration data, relative to the stream's own), `ratio` of the
model's original head count (`allocation=even`: the same share of every layer); or exactly the ones
listed in `heads`. Each recognised attention block that loses heads is rebuilt from its record with
the kept heads' Q/K/V columns and O rows: the head
count is rewritten everywhere the export encoded it (reshape constants, scales, fused QKV weights),
whatever shape the exporter gave the block, because the block is built anew. With grouped-query
attention a key/value head goes with all the query heads that share it.

With `reconstruct` (the default) the O projection of each pruned block is refit by least squares on
calibration data, layer by layer, so that the block reproduces the original block's output. A block
that loses every head becomes a constant: its O bias (refit: the original output's mean), and the
layer is a residual pass-through.

The model's metadata keeps the original head count and how many are gone: a second run with the
same ratio removes nothing, and a larger ratio removes only the difference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgec.analysis.attention import AttentionBlock, Projection, _values_by_name
from edgec.errors import UserError
from edgec.passes import blocks as blk
from edgec.passes.cleanup._util import add_initializer
from edgec.passes.core import Pass, PassContext, PassResult
from edgec.passes.prune import common

KIND = "heads"


@dataclass
class RemoveAttentionHeadsOptions:
    ratio: float = 0.25  # share of the model's original heads to remove, the least important first
    heads: tuple[str, ...] = ()  # exactly these instead, as LAYER.HEAD (0.1:0.3:2.5); layers count from 0
    reconstruct: bool = True  # refit each pruned block's O projection by least squares on calibration data
    allocation: str = "global"  # global: the least important over all layers; even: every layer loses the same share


def _head_columns(heads: list[int], head_dim: int) -> np.ndarray:
    return np.concatenate([np.arange(h * head_dim, (h + 1) * head_dim) for h in heads]) if heads else np.zeros(0, np.int64)


def _query_heads(block: AttentionBlock, kv_heads: list[int]) -> list[int]:
    """The query heads that share the key/value heads `kv_heads`."""
    groups = block.heads // block.kv_heads
    return [h for g in kv_heads for h in range(g * groups, (g + 1) * groups)]


def _units(block: AttentionBlock) -> list[list[int]]:
    """The removable units: query heads, grouped by the key/value head they share."""
    return [_query_heads(block, [g]) for g in range(block.kv_heads)]


def _new_projection(model: ir.Model, p: Projection, w: np.ndarray, b: np.ndarray | None) -> Projection:
    graph = model.graph
    weight = add_initializer(graph, np.ascontiguousarray(w))
    bias = add_initializer(graph, np.ascontiguousarray(b)) if b is not None else None
    return Projection(p.node, p.input, weight.name, bias.name if bias is not None else None, False, None, w.shape[1])


def rebuild_with_heads(model: ir.Model, block: AttentionBlock, kept_units: list[int],
                       o_weight: np.ndarray | None = None, o_bias: np.ndarray | None = None) -> None:
    """Rebuilds `block` with the key/value groups `kept_units` (all when it keeps them all), with the
    O projection given (refit) or cut from the original. No kept unit: the block becomes its O bias."""
    values = _values_by_name(model)
    d = block.head_dim
    kv_kept = sorted(kept_units)
    q_kept = _query_heads(block, kv_kept)
    q_cols, kv_cols = _head_columns(q_kept, d), _head_columns(kv_kept, d)
    wo = blk.weight(values, block.o)
    bo = blk.bias(values, block.o)
    if o_weight is None:
        o_weight = wo[q_cols]
    if o_bias is None:
        o_bias = bo
    if not q_kept:
        constant = o_bias if o_bias is not None else np.zeros(wo.shape[1], wo.dtype)
        common.replace_by_constant(model, block.output, block.q.input, constant)
        return

    def cut(p: Projection, cols: np.ndarray) -> Projection:
        b = blk.bias(values, p)
        return _new_projection(model, p, blk.weight(values, p)[:, cols], b[cols] if b is not None else None)

    pruned = dataclasses.replace(
        block, heads=len(q_kept), kv_heads=len(kv_kept), q=cut(block.q, q_cols), k=cut(block.k, kv_cols),
        v=cut(block.v, kv_cols), o=_new_projection(model, block.o, o_weight, o_bias))
    blk.rebuild(model, pruned, blk.exact_core)


class RemoveAttentionHeadsPass(Pass):
    """Removes the least important attention heads (a share of all: ranked over all layers, or of every layer) and refits the O projections."""

    name = "remove-attention-heads"
    Options = RemoveAttentionHeadsOptions
    requires = ("attention",)
    approximate = True

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        opts = self.options
        common.check_ratio(opts.ratio, self.name)
        common.check_allocation(opts.allocation, self.name)
        blocks, unproven = blk.trusted_blocks(model, ctx)
        blocks = sorted(blocks, key=lambda block: block.layer)
        # Layers are numbered by position among the proven blocks; a block whose mask has a head axis
        # keeps its heads (cutting them would mean cutting the mask too) and is not counted in the ratio.
        masked = [_per_head_mask(model, block) for block in blocks]
        ledger = common.Ledger.read(model, KIND, sum(block.heads for block, m in zip(blocks, masked) if not m))
        stats = {"heads_removed": 0, "blocks_pruned": 0, "blocks_emptied": 0, "unproven": unproven,
                 "skipped_per_head_mask": sum(masked)}
        removed = self._choose(model, ctx, blocks, masked, ledger)
        plan = [(layer, block, units) for layer, (block, units) in enumerate(zip(blocks, removed))
                if units and ctx.allow(self.name)]
        if not plan:
            return PassResult(model, False, stats)

        progress = common.progress_of(ctx)
        feeds = common.calibration_feeds(ctx, self.name) if opts.reconstruct else None
        original = None
        skips = [common.skip_of(model, block.output) for _, block, _ in plan]
        if opts.reconstruct:
            fetch = [block.o.input for _, block, _ in plan] + [skip[0] for skip in skips if skip is not None]
            original = common.reference(model, ctx, fetch)
        carry = common.Carry()  # each refit starts from the residual stream the last one computed
        for i, (layer, block, units) in enumerate(plan):
            kept = [u for u in range(block.kv_heads) if u not in units]
            o_weight = o_bias = None
            if opts.reconstruct:
                kept_cols = _head_columns(_query_heads(block, kept), block.head_dim)
                values = _values_by_name(model)
                o_weight, o_bias = common.refit(model, feeds, block.o.input, kept_cols, blk.weight(values, block.o),
                                                blk.bias(values, block.o), original, skips[i], progress,
                                                f"attention {i + 1}/{len(plan)}", carry)
            gone = _query_heads(block, units)
            heads_gone = len(gone)
            common.record(ctx, KIND, {"layer": layer, "heads": block.heads, "removed": heads_gone,
                                      "kept": block.heads - heads_gone, "removed_heads": gone,
                                      "reconstructed": opts.reconstruct})
            rebuild_with_heads(model, block, kept, o_weight, o_bias)
            stats["heads_removed"] += heads_gone
            stats["blocks_pruned"] += 1
            stats["blocks_emptied"] += not kept
        ledger.removed += stats["heads_removed"]
        if opts.heads:
            ledger.specs.append(":".join(opts.heads))
        ledger.write(model)
        return PassResult(model, True, stats)

    def _choose(self, model: ir.Model, ctx: PassContext, blocks: list[AttentionBlock], masked: list[bool],
                ledger: common.Ledger) -> list[list[int]]:
        """Per block, the key/value groups to remove."""
        opts = self.options
        if opts.heads:
            if ":".join(opts.heads) in ledger.specs:
                return [[] for _ in blocks]
            wanted = common.parse_units(opts.heads, self.name, "heads")
            bad = [f"{layer}" for layer in wanted if layer >= len(blocks)]
            if bad:
                raise UserError(f"{self.name} heads= names layer {', '.join(bad)}, but the model has {len(blocks)} "
                                "attention layers", f"use layers 0 to {len(blocks) - 1}")
            removed = []
            for i, block in enumerate(blocks):
                heads = wanted.get(i, set())
                if heads and masked[i]:
                    raise UserError(f"{self.name} heads= names layer {i}, whose mask has a head axis that the pass does "
                                    "not cut", "leave that layer's heads")
                if any(h >= block.heads for h in heads):
                    raise UserError(f"{self.name} heads= names a head past layer {i}'s {block.heads}",
                                    f"use heads 0 to {block.heads - 1}")
                groups = block.heads // block.kv_heads
                removed.append(sorted({h // groups for h in heads}))
            return removed
        count_heads = ledger.to_remove(opts.ratio)
        positions = [i for i, m in enumerate(masked) if not m]
        if count_heads == 0 or not positions:
            return [[] for _ in blocks]
        chosen = self._rank(model, ctx, [blocks[i] for i in positions], count_heads)
        removed = [[] for _ in blocks]
        for i, units in zip(positions, chosen):
            removed[i] = units
        return removed

    def _rank(self, model: ir.Model, ctx: PassContext, blocks: list[AttentionBlock], count_heads: int) -> list[list[int]]:
        """The key/value groups that hold `count_heads` heads, least important first over all `blocks`."""
        opts = self.options
        feeds = common.calibration_feeds(ctx, self.name)
        residuals = [common.residual_of(model, block.output) for block in blocks]
        measured = common.measure(model, feeds, [block.o.input for block in blocks], residuals,
                                  common.progress_of(ctx), "attention heads")
        values = _values_by_name(model)
        units = [[_head_columns(heads, block.head_dim) for heads in _units(block)] for block in blocks]
        # Units are whole key/value groups: remove as many groups as hold the heads asked for.
        per_group = max(block.heads // block.kv_heads for block in blocks)
        groups = int(round(count_heads / per_group))
        shares = common.even_shares([len(u) for u in units], groups)
        if not opts.reconstruct:
            scores = [common.unit_scores(m, blk.weight(values, block.o), u, False) for block, m, u in zip(blocks, measured, units)]
            return common.allocate(opts.allocation, *common.score_orders(scores), shares, groups)
        orders, costs = zip(*(common.surgeon_order(m, blk.weight(values, block.o), blk.bias(values, block.o), u, len(u))
                              for block, m, u in zip(blocks, measured, units)))
        return common.allocate(opts.allocation, list(orders), list(costs), shares, groups)


def removable_heads(model: ir.Model, ctx: PassContext) -> int:
    """How many heads the pass can remove: those of the proven blocks whose mask has no head axis."""
    return sum(block.heads for block in blk.trusted_blocks(model, ctx)[0] if not _per_head_mask(model, block))


def _per_head_mask(model: ir.Model, block: AttentionBlock) -> bool:
    """A mask with a head axis of the block's head count: cutting heads would need cutting it too."""
    if block.mask_value is None:
        return False
    shape = _values_by_name(model)[block.mask_value].shape
    return shape is not None and len(shape) == 4 and shape[1] == block.heads and block.heads > 1
