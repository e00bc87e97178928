"""Roofline latency estimates from a target's peak throughput and memory bandwidth.

Estimates only: peaks are assumed reached; launch overhead, caches and unit-to-unit transfers are ignored.
"""

from __future__ import annotations

from edgec.errors import UserError
from edgec.targets import ComputeUnit, Target


def best_unit(target: Target, precision: str) -> ComputeUnit:
    """The unit with the highest peak at `precision`; memory is shared, so it is also the fastest."""
    units = [u for u in target.units if precision in u.peak_ops]
    if not units:
        raise UserError(
            f"target {target.name!r} has no unit that computes in {precision}",
            f"choose one of: {', '.join(target.precisions)}",
        )
    return max(units, key=lambda u: u.peak_ops[precision])


def estimate_node_seconds(
    flops: float, bytes_moved: float, target: Target, precision: str, unit: str | None = None
) -> float:
    """Roofline estimate of one node: max(compute time, memory time) on `unit`, or on the best unit."""
    if flops < 0 or bytes_moved < 0:
        raise ValueError(f"flops and bytes_moved must be >= 0, got {flops}, {bytes_moved}")
    if unit is None:
        chosen = best_unit(target, precision)
    else:
        chosen = target.unit(unit)
        if precision not in chosen.peak_ops:
            raise UserError(
                f"unit {unit!r} of target {target.name!r} does not compute in {precision}",
                f"choose one of: {', '.join(chosen.precisions)}",
            )
    return max(flops / chosen.peak_ops[precision], bytes_moved / target.memory_bandwidth)


# Ops that compute in integers whatever precision the rest of the model runs at (a model quantized before
# edgec saw it): where the target computes int8, they are timed at its int8 peak.
INTEGER_OPS = frozenset({"MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
                         "ConvInteger", "QLinearConv", "QGemm", "QAttention"})


def node_precision(op_type: str, target: Target, precision: str) -> str:
    """The precision a node of `op_type` computes at in a model estimated at `precision`."""
    return "int8" if op_type in INTEGER_OPS and "int8" in target.precisions else precision


def estimate_model_seconds(cost, target: Target, precision: str) -> float:
    """Roofline estimate of a whole model: the sum of its nodes' (`cost` is an analysis.cost.ModelCost),
    each at `precision` but the integer ops (`INTEGER_OPS`), at int8 where the target has it."""
    return sum(estimate_node_seconds(n.flops, n.bytes, target, node_precision(n.op_type, target, precision))
               for n in cost.nodes)
