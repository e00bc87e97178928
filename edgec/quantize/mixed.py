"""Mixed precision: which quantizable ops stay in float so the model meets an accuracy budget.

Sensitivity of an op = 1 - mean output cosine (against the float model) when only that op is
quantized. The assignment keeps the most sensitive ops in float, as few as the budget allows: the
number kept is found by bisection over the sensitivity order (the error grows, in practice
monotonically, as more ops are quantized), each step one run of the candidate model. The table
says, per op, its sensitivity and the precision it got.

The budget is on a metric (METRICS), measured on the evaluation data (the calibration samples when
the user gives none):
- cosine: the least mean output cosine to the float model (real tokens only);
- top1: the most top-1 accuracy the model may lose against the float model's, as a fraction
  (0.01 = one point), from its first output's argmax over the last axis and the data's labels.
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


METRICS = ("cosine", "top1")


@dataclass
class Evaluation:
    """What the budget is checked on: data, and labels for top1."""

    feeds: Mapping[str, np.ndarray]
    metric: str = "cosine"
    labels: np.ndarray | None = None

    def score(self, outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
        if self.metric == "cosine":
            return compare(reference, outputs, token_mask(self.feeds))["cosine_mean"]
        return top1(outputs, self.labels)

    def meets(self, value: float, float_value: float, budget: float) -> bool:
        if self.metric == "cosine":
            return value >= budget
        return float_value - value <= budget + 1e-12


def top1(outputs: Mapping[str, np.ndarray], labels: np.ndarray) -> float:
    """Top-1 accuracy of the first output's argmax over its last axis."""
    logits = next(iter(outputs.values()))
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


@dataclass
class Assignment:
    choices: list[OpChoice]
    cosine_mean: float  # of the assigned model on the evaluation data
    cosine_min: float
    budget: float
    metric: str = "cosine"
    value: float = 1.0  # the metric of the assigned model
    float_value: float = 1.0  # ... and of the float model

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
           sensitivity_samples: int = 8, evaluation: Evaluation | None = None) -> Assignment:
    """The assignment with the fewest float ops that meets `budget` on `evaluation` (default: the mean
    output cosine on `feeds`).

    Sensitivities only rank the ops, so they are measured on the first `sensitivity_samples` of
    `feeds` (one run per op); the budget is checked on all of the evaluation data."""
    report = progress or (lambda done, total, message: None)
    evaluation = evaluation or Evaluation(feeds)
    eir.name_nodes(model)  # ops are told apart, and kept in float, by name
    reference = run_session(ort_session(model), evaluation.feeds)
    float_value = evaluation.score(reference, reference)
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

    def trial(kept: int) -> tuple[float, float, float]:
        keep = dataclasses.replace(options, exclude=tuple(options.exclude) + tuple(order[:kept]))
        outputs = run_session(ort_session(quantized(model, keep, ranges)), evaluation.feeds)
        figures = compare(reference, outputs, token_mask(evaluation.feeds))
        return evaluation.score(outputs, reference), figures["cosine_mean"], figures["cosine_min"]

    # Smallest k (ops kept in float, most sensitive first) meeting the budget; k = len(order) always does.
    low, high = 0, len(order)
    scores = {len(order): (float_value, 1.0, 1.0)}
    step = 0
    while low < high:
        middle = (low + high) // 2
        step += 1
        report(step, max(1, int(np.ceil(np.log2(len(order) + 1)))), "choosing precisions")
        scores[middle] = trial(middle)
        if evaluation.meets(scores[middle][0], float_value, budget):
            high = middle
        else:
            low = middle + 1
    kept = low
    if kept not in scores:
        scores[kept] = trial(kept)
    floats = set(order[:kept])
    choices = [OpChoice(n, kinds[n], sensitivity[n], "fp32" if n in floats else "int8") for n in names]
    value, cosine_mean, cosine_min = scores[kept]
    return Assignment(choices, cosine_mean, cosine_min, budget, evaluation.metric, value, float_value)
