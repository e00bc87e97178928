"""Mixed precision: the precision of each quantizable op, from a ladder of what the target and the
backend run (lowest first: int8, then int16 = 16-bit activations with int8 weights, fp16, fp32), so
that the model meets an accuracy budget with as many ops as possible on the lowest rungs.

Sensitivity of an op at a rung = 1 - mean output cosine (against the float model) when only that op
is at that rung and every other op in float. The assignment climbs the ladder one rung at a time:
at each rung, the ops still undecided are ordered by their sensitivity there, and bisection finds
how few of the most sensitive must go higher (trying them in float, the others at this rung) for the
budget to hold; the rest stay at this rung, and the few climb on. Each bisection step is one run of
the candidate model; the error grows, in practice monotonically, as more ops go lower. So int8 gets
the most ops the budget allows, then int16 the most of those left, then fp16. The table says, per op,
its sensitivity at each rung it was measured at and the precision it got.

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
from edgec.passes.quantize.insert_qdq import RANGES_KEY, WIDE_RANGES_KEY, InsertQdqOptions, InsertQdqPass, _plan
from edgec.quantize.calibrate import spread
from edgec.verify import compare, ort_session, run_session, token_mask

Progress = Callable[[int, int, str], None]


# The rungs, lowest first. int16 means 16-bit activations with int8 weights (A16W8).
LADDER = ("int8", "int16", "fp16", "fp32")


@dataclass
class OpChoice:
    node: str
    kind: str  # "linear", "attention" or "embedding"
    sensitivity: float  # 1 - mean cosine when only this op is in int8
    precision: str  # a rung of LADDER
    # rung -> 1 - mean cosine with only this op at that rung (int8 always; higher rungs where measured)
    sensitivities: dict[str, float] = dataclasses.field(default_factory=dict)


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
    ladder: tuple[str, ...] = ("int8", "fp32")

    def at(self, precision: str) -> tuple[str, ...]:
        return tuple(c.node for c in self.choices if c.precision == precision)

    @property
    def exclude(self) -> tuple[str, ...]:
        return self.at("fp32")

    def options(self, options: InsertQdqOptions) -> InsertQdqOptions:
        """`options` with this assignment's rungs added."""
        return _with(options, {c.node: c.precision for c in self.choices})

    def counts(self) -> dict[str, int]:
        return {rung: len(self.at(rung)) for rung in self.ladder}


def ladder_of(available) -> tuple[str, ...]:
    """The rungs of LADDER in `available`, always from int8 to fp32."""
    return tuple(r for r in LADDER if r in available or r in ("int8", "fp32"))


def _with(options: InsertQdqOptions, precisions: Mapping[str, str]) -> InsertQdqOptions:
    """`options` with ops at rungs: fp32 ones excluded, int16 ones wide, fp16 ones half."""
    def named(rung):
        return tuple(n for n, p in precisions.items() if p == rung)

    return dataclasses.replace(options, exclude=tuple(options.exclude) + named("fp32"),
                               wide=tuple(options.wide) + named("int16"), half=tuple(options.half) + named("fp16"))


def quantized(model: ir.Model, options: InsertQdqOptions, ranges: Mapping[str, tuple[float, float]],
              wide_ranges: Mapping[str, tuple[float, float]] | None = None) -> ir.Model:
    """A copy of `model` with QDQ inserted by `options`."""
    copy = eir.clone(model)
    given = {RANGES_KEY: dict(ranges)}
    if wide_ranges is not None:
        given[WIDE_RANGES_KEY] = dict(wide_ranges)
    InsertQdqPass(options)(copy, PassContext(options=given))
    return copy


def _error(cosine: float) -> float:
    """1 - cosine, never below 0; a model whose output is not finite (fp16 overflow) counts as worst."""
    return max(0.0, 1.0 - cosine) if np.isfinite(cosine) else 2.0


def assign(model: ir.Model, options: InsertQdqOptions, ranges: Mapping[str, tuple[float, float]],
           feeds: Mapping[str, np.ndarray], budget: float, *, progress: Progress | None = None,
           sensitivity_samples: int = 8, evaluation: Evaluation | None = None,
           ladder: tuple[str, ...] = ("int8", "fp32"),
           wide_ranges: Mapping[str, tuple[float, float]] | None = None) -> Assignment:
    """The assignment with the most ops on the lowest rungs of `ladder` (see the module's docstring)
    that meets `budget` on `evaluation` (default: the mean output cosine on `feeds`).

    Sensitivities only rank the ops, so they are measured on `sensitivity_samples` of `feeds`, spread
    over them (one run per op and rung); the budget is checked on all of the evaluation data."""
    if tuple(ladder) != ladder_of(ladder):
        raise ValueError(f"ladder {ladder!r} is not in {LADDER} order from int8 to fp32")
    report = progress or (lambda done, total, message: None)
    evaluation = evaluation or Evaluation(feeds)
    eir.name_nodes(model)  # ops are told apart, and kept in float, by name
    reference = run_session(ort_session(model), evaluation.feeds)
    float_value = evaluation.score(reference, reference)
    picked = spread(min(len(v) for v in feeds.values()), sensitivity_samples)
    few = {k: v[picked] for k, v in feeds.items()}
    few_reference = run_session(ort_session(model), few)
    rewrites, _ = _plan(model, options)
    names = [r.node.name for r in rewrites]
    kinds = {r.node.name: r.kind for r in rewrites}
    sensitivities: dict[str, dict[str, float]] = {n: {} for n in names}
    precision = dict.fromkeys(names, "fp32")

    def build(chosen: Mapping[str, str]) -> ir.Model:
        return quantized(model, _with(options, chosen), ranges, wide_ranges)

    def measure(rung: str, ops: list[str]) -> None:
        message = f"measuring {rung} sensitivity"
        for i, name in enumerate(ops):
            report(i, len(ops), message)
            alone = {**dict.fromkeys(names, "fp32"), name: rung}
            figures = compare(few_reference, run_session(ort_session(build(alone)), few), token_mask(few))
            sensitivities[name][rung] = _error(figures["cosine_mean"])
        report(len(ops), len(ops), message)

    def trial(chosen: Mapping[str, str]) -> tuple[float, float, float]:
        outputs = run_session(ort_session(build(chosen)), evaluation.feeds)
        figures = compare(reference, outputs, token_mask(evaluation.feeds))
        return evaluation.score(outputs, reference), figures["cosine_mean"], figures["cosine_min"]

    # The ops not yet placed, and the score of the model with them in float (the others placed).
    undecided, scores = list(names), (float_value, 1.0, 1.0)
    for rung in ladder[:-1]:
        # An embedding's int16 rung would be its int8 one (a table gathers int8 rows, no activation).
        eligible = [n for n in undecided if not (rung == "int16" and kinds[n] == "embedding")]
        if not eligible:
            continue
        measure(rung, eligible)
        order = sorted(eligible, key=lambda n: (-sensitivities[n][rung], names.index(n)))

        def at_rung(higher: int) -> dict[str, str]:
            return {**precision, **{n: rung for n in order[higher:]}}

        # Fewest ops `higher` (most sensitive first) that must stay above this rung; all of them do.
        low, high = 0, len(order)
        tried = {len(order): scores}
        steps, step = max(1, int(np.ceil(np.log2(len(order) + 1)))), 0
        while low < high:
            middle = (low + high) // 2
            step += 1
            report(step, steps, f"placing ops at {rung}")
            tried[middle] = trial(at_rung(middle))
            if evaluation.meets(tried[middle][0], float_value, budget):
                high = middle
            else:
                low = middle + 1
        precision = at_rung(low)
        scores = tried[low] if low in tried else trial(precision)
        placed = set(order[low:])
        undecided = [n for n in undecided if n not in placed]
    choices = [OpChoice(n, kinds[n], sensitivities[n]["int8"], precision[n], sensitivities[n]) for n in names]
    value, cosine_mean, cosine_min = scores
    return Assignment(choices, cosine_mean, cosine_min, budget, evaluation.metric, value, float_value, tuple(ladder))
