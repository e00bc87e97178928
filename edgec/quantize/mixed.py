"""Mixed precision: which quantizable ops stay in float so the model meets an accuracy budget.

Sensitivity of an op = 1 - mean output cosine (against the float model) when only that op is
quantized. The assignment keeps the most sensitive ops in float, as few as the budget allows: the
number kept is found by bisection over the sensitivity order (the output error grows, in practice
monotonically, as more ops are quantized), each step one run of the candidate model on the
calibration samples. The table says, per op, its sensitivity and the precision it got.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import onnx_ir as ir

from edgec import ir as eir
from edgec.passes.core import PassContext
from edgec.passes.quantize.insert_qdq import RANGES_KEY, InsertQdqOptions, InsertQdqPass, _plan
from edgec.verify import compare, ort_session, run_session, token_mask

Progress = Callable[[int, int, str], None]


@dataclass
class OpChoice:
    node: str
    kind: str  # "linear", "attention" or "embedding"
    sensitivity: float  # 1 - mean cosine when only this op is quantized
    precision: str  # "int8" or "fp32"


@dataclass
class Assignment:
    choices: list[OpChoice]
    cosine_mean: float  # of the assigned model on the samples used
    cosine_min: float
    budget: float

    @property
    def exclude(self) -> tuple[str, ...]:
        return tuple(c.node for c in self.choices if c.precision != "int8")


def quantized(model: ir.Model, options: InsertQdqOptions, ranges: Mapping[str, tuple[float, float]]) -> ir.Model:
    """A copy of `model` with QDQ inserted by `options`."""
    copy = eir.clone(model)
    InsertQdqPass(options)(copy, PassContext(options={RANGES_KEY: dict(ranges)}))
    return copy


def _score(model: ir.Model, feeds, reference) -> tuple[float, float]:
    figures = compare(reference, run_session(ort_session(model), feeds), token_mask(feeds))
    return figures["cosine_mean"], figures["cosine_min"]


def assign(model: ir.Model, options: InsertQdqOptions, ranges: Mapping[str, tuple[float, float]],
           feeds: Mapping[str, np.ndarray], budget: float, *, progress: Progress | None = None,
           sensitivity_samples: int = 8) -> Assignment:
    """The assignment with the fewest float ops whose mean output cosine on `feeds` is at least `budget`.

    Sensitivities only rank the ops, so they are measured on the first `sensitivity_samples` samples
    (one run per op); the budget is checked on all of `feeds`."""
    report = progress or (lambda done, total, message: None)
    eir.name_nodes(model)  # ops are told apart, and kept in float, by name
    reference = run_session(ort_session(model), feeds)
    few = {k: v[:sensitivity_samples] for k, v in feeds.items()}
    few_reference = run_session(ort_session(model), few)
    rewrites, _ = _plan(model, options)
    names = [r.node.name for r in rewrites]
    kinds = {r.node.name: r.kind for r in rewrites}
    sensitivity: dict[str, float] = {}
    for i, name in enumerate(names):
        report(i, len(names), "measuring sensitivity")
        alone = dataclasses.replace(options, exclude=tuple(options.exclude) + tuple(n for n in names if n != name))
        sensitivity[name] = max(0.0, 1.0 - _score(quantized(model, alone, ranges), few, few_reference)[0])
    report(len(names), len(names), "measuring sensitivity")
    order = sorted(names, key=lambda n: (-sensitivity[n], names.index(n)))

    def trial(kept: int) -> tuple[float, float]:
        keep = dataclasses.replace(options, exclude=tuple(options.exclude) + tuple(order[:kept]))
        return _score(quantized(model, keep, ranges), feeds, reference)

    # Smallest k (ops kept in float, most sensitive first) meeting the budget; k = len(order) always does.
    low, high = 0, len(order)
    scores = {len(order): (1.0, 1.0)}
    step = 0
    while low < high:
        middle = (low + high) // 2
        step += 1
        report(step, max(1, int(np.ceil(np.log2(len(order) + 1)))), "choosing precisions")
        scores[middle] = trial(middle)
        if scores[middle][0] >= budget:
            high = middle
        else:
            low = middle + 1
    kept = low
    if kept not in scores:
        scores[kept] = trial(kept)
    floats = set(order[:kept])
    choices = [OpChoice(n, kinds[n], sensitivity[n], "fp32" if n in floats else "int8") for n in names]
    return Assignment(choices, scores[kept][0], scores[kept][1], budget)
