"""remove-ffn-neurons: structured pruning of feed-forward intermediate neurons, without retraining.

The neurons to remove are `ratio` of the model's original count, the least important
(edgec.passes.prune.common: the energy a neuron adds to the residual stream on calibration data,
relative to the stream's own; with the refit, what the refit cannot make up) either the same share of
every layer (`allocation=even`, the default with the refit) or over all layers (`global`, the default
without); or exactly the ones listed in `neurons`. Each recognised feed-forward block (up, optional
gate, activation, down: edgec.analysis.structure) keeps the up/gate columns and the down rows of its
kept neurons, in place; constants on the way between them that are as wide as the intermediate layer
(a bias, a reshape's target) are cut to match. Shared weights are forked, never
edited in place.

With `reconstruct` (the default) each pruned block's down projection (and its bias: the mean the
removed neurons contributed) is refit by least squares on calibration data, layer by layer, so that
the block reproduces the original block's output. A block that loses every neuron becomes a
constant, its refit bias.

The model's metadata keeps the original neuron count and how many are gone (see
remove-attention-heads): a second run with the same ratio removes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgec.analysis.attention import Projection, _values_by_name
from edgec.analysis.structure import FeedForward
from edgec.errors import UserError
from edgec.ir.constants import constant_array, is_onnx_op
from edgec.passes import blocks as blk
from edgec.passes.cleanup._util import add_initializer
from edgec.passes.core import Pass, PassContext, PassResult
from edgec.passes.prune import common

KIND = "ffn"
# Neurons leave a layer in this many rounds of the greedy surgeon at most (a round re-ranks the rest).
SURGEON_STEPS = 128


@dataclass
class RemoveFfnNeuronsOptions:
    ratio: float = 0.25  # share of the model's original FFN neurons to remove, the least important first
    neurons: tuple[str, ...] = ()  # exactly these instead, as LAYER.NEURON (0.7:1.12); layers count from 0
    reconstruct: bool = True  # refit each pruned block's down projection by least squares on calibration data
    # even: every layer loses the same share; global: the least important over all layers; auto: even
    # with reconstruction, global without (what measured best on MiniLM, see the module's docstring)
    allocation: str = "auto"


def _nodes_by_name(model: ir.Model) -> dict[str, ir.Node]:
    return {node.name: node for node in model.graph if node.name}


def _set_input(model: ir.Model, readers: list[ir.Node], old: ir.Value, array: np.ndarray) -> ir.Value:
    """Points the inputs of `readers` that read `old` at a new initializer holding `array` (a fork:
    other readers of `old`, another layer sharing the weight say, keep it)."""
    new = add_initializer(model.graph, np.ascontiguousarray(array.astype(constant_array(old).dtype)))
    for node in readers:
        for i, value in enumerate(node.inputs):
            if value is old:
                node.replace_input_with(i, new)
    return new


def _cut_projection_in(model: ir.Model, block_nodes: list[ir.Node], p: Projection, kept: np.ndarray) -> None:
    """An up or gate projection keeps the output columns `kept` (its bias too)."""
    values = _values_by_name(model)
    w = constant_array(values[p.weight])
    _set_input(model, block_nodes, values[p.weight], w[kept] if p.weight_transposed else w[:, kept])
    if p.bias:
        _set_input(model, block_nodes, values[p.bias], constant_array(values[p.bias]).reshape(-1)[kept])


def _set_down(model: ir.Model, block: FeedForward, block_nodes: list[ir.Node], weight: np.ndarray,
              bias: np.ndarray | None) -> None:
    """The down projection takes `weight` [kept, out] and, when given, `bias` [out] (an Add is put
    after it when it had none)."""
    values = _values_by_name(model)
    p = block.down
    _set_input(model, block_nodes, values[p.weight], weight.T if p.weight_transposed else weight)
    if bias is None:
        return
    if p.bias:
        _set_input(model, block_nodes, values[p.bias], bias)
        return
    node = _nodes_by_name(model)[p.node]
    out = node.outputs[0]
    b = blk.Builder(model, node, out.dtype)
    readers = list(out.uses())
    add = ir.node("Add", [out, b.const(bias.astype(out.dtype.numpy()))])
    model.graph.insert_after(node, add)
    for user, index in readers:
        user.replace_input_with(index, add.outputs[0])
    if out.is_graph_output():
        name = out.name
        out.replace_all_uses_with(add.outputs[0], replace_graph_outputs=True)
        add.outputs[0].name = name


def _cut_between(model: ir.Model, block: FeedForward, block_nodes: list[ir.Node], kept: int) -> None:
    """Constants as wide as the intermediate layer read by the block's other nodes: a reshape target
    naming the width gets the new one, a constant of that last dim (a fused bias) is cut."""
    skip = {block.up.weight, block.up.bias, block.down.weight, block.down.bias}
    skip |= {block.gate.weight, block.gate.bias} if block.gate is not None else set()
    values = _values_by_name(model)
    # Only the nodes between the up (and gate) projections and the down one compute at the intermediate
    # width: the flattening before the up projection and the reshape back after the down one work at
    # the hidden width, which may be the same number. A Shape's result is not data: not followed.
    starts = {block.up.node} | ({block.gate.node} if block.gate is not None else set())
    inside = {id(n) for n in block_nodes}
    middle: set[int] = set()
    for node in (n for n in model.graph if id(n) in inside):
        if node.name == block.down.node or is_onnx_op(node, "Shape"):
            continue
        if node.name in starts or any(v is not None and v.producer() is not None and id(v.producer()) in middle
                                      for v in node.inputs):
            middle.add(id(node))
    for node in list(block_nodes):
        if id(node) not in middle and not is_onnx_op(node, "Concat"):
            continue
        for i, value in enumerate(node.inputs):
            if value is None or value.name in skip or not value.is_initializer() and value.const_value is None:
                continue
            array = constant_array(value)
            if array is None or array.ndim == 0:
                continue
            if is_onnx_op(node, "Concat") and i == len(node.inputs) - 1 and _reshape_target(node, block_nodes, middle):
                # A reshape target assembled at run time (GPT-2's Conv1D: [batch, sequence] + [width]).
                if np.issubdtype(array.dtype, np.integer) and array.size and int(array[-1]) == block.intermediate:
                    shape = array.copy()
                    shape[-1] = kept
                    _set_input(model, [_own_concat(model, node, block_nodes)], values[value.name], shape)
            elif id(node) not in middle:
                continue
            elif is_onnx_op(node, "Reshape") and i == 1:
                if array.size and int(array[-1]) == block.intermediate:
                    shape = array.copy()
                    shape[-1] = kept
                    _set_input(model, [node], values[value.name], shape)
            elif np.issubdtype(array.dtype, np.floating) and array.shape[-1] == block.intermediate:
                raise UserError(f"feed-forward block {block.down.node} reads a constant {value.name} as wide as "
                                "its intermediate layer, which remove-ffn-neurons does not know how to cut",
                                "run remove-ffn-neurons before passes that fuse the feed-forward block")


def _reshape_target(concat: ir.Node, block_nodes: list[ir.Node], middle: set[int]) -> bool:
    """Whether the Concat's result is the shape that Reshapes between the block's up and down projections take."""
    inside = {id(n) for n in block_nodes}
    readers = [(user, index) for user, index in concat.outputs[0].uses() if id(user) in inside]
    return bool(readers) and all(is_onnx_op(user, "Reshape") and index == 1 and id(user) in middle
                                 for user, index in readers)


def _own_concat(model: ir.Model, concat: ir.Node, block_nodes: list[ir.Node]) -> ir.Node:
    """The Concat itself when only the block reads it, else a copy the block's readers move to (the
    exporter's dedup may share one target between the layers)."""
    inside = {id(n) for n in block_nodes}
    if all(id(user) in inside for user, _ in concat.outputs[0].uses()) and not concat.outputs[0].is_graph_output():
        return concat
    copy = ir.node("Concat", list(concat.inputs), {"axis": concat.attributes.get_int("axis", 0)})
    model.graph.insert_after(concat, copy)
    copy.outputs[0].shape, copy.outputs[0].type = concat.outputs[0].shape, concat.outputs[0].type
    for user, index in list(concat.outputs[0].uses()):
        if id(user) in inside:
            user.replace_input_with(index, copy.outputs[0])
    block_nodes[block_nodes.index(concat)] = copy
    return copy


def rebuild_with_neurons(model: ir.Model, block: FeedForward, kept: np.ndarray,
                         down_weight: np.ndarray | None = None, down_bias: np.ndarray | None = None) -> None:
    """Cuts `block` to the neurons `kept`, with the down projection given (refit) or cut from the
    original. No kept neuron: the block becomes its down bias."""
    values = _values_by_name(model)
    w_down = blk.weight(values, block.down)
    if down_weight is None:
        down_weight = w_down[kept]
    if len(kept) == 0:
        bias = down_bias if down_bias is not None else blk.bias(values, block.down)
        common.replace_by_constant(model, block.output, block.input,
                                   bias if bias is not None else np.zeros(w_down.shape[1], w_down.dtype))
        return
    nodes = _nodes_by_name(model)
    names = [block.up.node, *([block.gate.node] if block.gate is not None else []), *block.nodes, block.down.node]
    block_nodes = [nodes[name] for name in dict.fromkeys(names) if name in nodes]
    _cut_between(model, block, block_nodes, len(kept))
    _cut_projection_in(model, block_nodes, block.up, kept)
    if block.gate is not None:
        _cut_projection_in(model, block_nodes, block.gate, kept)
    _set_down(model, block, block_nodes, down_weight, down_bias)
    for node in block_nodes:  # the intermediate values' shapes are stale: inference fills them again
        if node.name != block.down.node:
            for out in node.outputs:
                out.shape = None


class RemoveFfnNeuronsPass(Pass):
    """Removes the least important FFN intermediate neurons (a share of all: of every layer, or ranked over all) and refits the down projections."""

    name = "remove-ffn-neurons"
    Options = RemoveFfnNeuronsOptions
    requires = ("ffn",)
    approximate = True

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        from edgec import ir as eir
        from edgec.analysis.shapes import infer_shapes

        opts = self.options
        common.check_ratio(opts.ratio, self.name)
        common.check_allocation(opts.allocation, self.name, auto=True)
        if eir.name_nodes(model):  # the blocks are rewired by node name: a cached record of unnamed ones is stale
            ctx.analyses.invalidate()
        blocks = list(ctx.analyses.get("ffn", model))
        ledger = common.Ledger.read(model, KIND, sum(block.intermediate for block in blocks))
        stats = {"neurons_removed": 0, "blocks_pruned": 0, "blocks_emptied": 0}
        removed = self._choose(model, ctx, blocks, ledger)
        plan = [(block, units) for block, units in zip(blocks, removed) if units and ctx.allow(self.name)]
        if not plan:
            return PassResult(model, False, stats)

        progress = common.progress_of(ctx)
        feeds = common.calibration_feeds(ctx, self.name) if opts.reconstruct else None
        skips = [common.skip_of(model, block.output) for block, _ in plan]
        fetch = [block.down.input for block, _ in plan] + [skip[0] for skip in skips if skip is not None]
        original = common.reference(model, ctx, fetch) if opts.reconstruct else None
        carry = common.Carry()  # each refit starts from the residual stream the last one computed
        for i, (block, units) in enumerate(plan):
            kept = np.setdiff1d(np.arange(block.intermediate), units)
            weight = bias = None
            if opts.reconstruct:
                values = _values_by_name(model)
                weight, bias = common.refit(model, feeds, block.down.input, kept, blk.weight(values, block.down),
                                            blk.bias(values, block.down), original, skips[i], progress,
                                            f"feed-forward {i + 1}/{len(plan)}", carry)
            common.record(ctx, KIND, {"layer": blocks.index(block), "neurons": block.intermediate, "removed": len(units),
                                      "kept": len(kept), "reconstructed": opts.reconstruct})
            rebuild_with_neurons(model, block, kept, weight, bias)
            stats["neurons_removed"] += len(units)
            stats["blocks_pruned"] += 1
            stats["blocks_emptied"] += not len(kept)
        ledger.removed += stats["neurons_removed"]
        if opts.neurons:
            ledger.specs.append(":".join(opts.neurons))
        ledger.write(model)
        infer_shapes(model)
        return PassResult(model, True, stats)

    def _choose(self, model: ir.Model, ctx: PassContext, blocks: list[FeedForward], ledger: common.Ledger) -> list[list[int]]:
        opts = self.options
        if opts.neurons:
            if ":".join(opts.neurons) in ledger.specs:
                return [[] for _ in blocks]
            wanted = common.parse_units(opts.neurons, self.name, "neurons")
            bad = [str(layer) for layer in wanted if layer >= len(blocks)]
            if bad:
                raise UserError(f"{self.name} neurons= names layer {', '.join(bad)}, but the model has {len(blocks)} "
                                "feed-forward layers", f"use layers 0 to {len(blocks) - 1}")
            removed = []
            for i, block in enumerate(blocks):
                units = wanted.get(i, set())
                if any(u >= block.intermediate for u in units):
                    raise UserError(f"{self.name} neurons= names a neuron past layer {i}'s {block.intermediate}",
                                    f"use neurons 0 to {block.intermediate - 1}")
                removed.append(sorted(units))
            return removed
        count = ledger.to_remove(opts.ratio)
        if count == 0 or not blocks:
            return [[] for _ in blocks]
        feeds = common.calibration_feeds(ctx, self.name)
        residuals = [common.residual_of(model, block.output) for block in blocks]
        measured = common.measure(model, feeds, [block.down.input for block in blocks], residuals,
                                  common.progress_of(ctx), "feed-forward neurons")
        values = _values_by_name(model)
        # With `even`, each block gives up its share of what is left (after a resumed run, of its present width).
        allocation = "even" if opts.allocation == "even" or (opts.allocation == "auto" and opts.reconstruct) else "global"
        shares = common.even_shares([block.intermediate for block in blocks], count)
        if not opts.reconstruct:
            scores = [common.neuron_scores(m, blk.weight(values, block.down), False) for block, m in zip(blocks, measured)]
            return common.allocate(allocation, *common.score_orders(scores), shares, count)
        orders, costs = [], []
        for block, m, share in zip(blocks, measured, shares):
            units = [np.array([j]) for j in range(block.intermediate)]
            # An even share needs each block's order only as far as its share (the surgeon's work grows with it).
            limit = share if allocation == "even" else min(count, block.intermediate)
            order, cost = common.surgeon_order(m, blk.weight(values, block.down), blk.bias(values, block.down), units,
                                               limit, step=max(1, block.intermediate // SURGEON_STEPS))
            orders.append(order)
            costs.append(cost)
        return common.allocate(allocation, orders, costs, shares, count)
