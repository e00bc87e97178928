"""Runs a pipeline over a model: instruments around each pass, analysis invalidation, fixpoint groups."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from edgec import ir as eir
from edgec.errors import UserError
from edgec.passes.core import Pass, PassContext, PassResult
from edgec.passes.registry import MAX_FIXPOINT_ROUNDS, FixPoint, PipelineItem, format_pipeline, parse_pipeline


@dataclass
class PassRecord:
    name: str
    spec: str
    modified: bool
    stats: dict[str, int | float]
    seconds: float
    nodes_before: int
    nodes_after: int


@dataclass
class PipelineResult:
    model: ir.Model
    records: list[PassRecord] = field(default_factory=list)
    # fixpoint groups stopped by MAX_FIXPOINT_ROUNDS while still changing: passes that never settle
    unsettled: list[str] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.records)

    def summary(self) -> list[dict[str, Any]]:
        """One row per pass in first-run order: runs, rewrites counted, time, node delta."""
        rows: dict[str, dict[str, Any]] = {}
        for r in self.records:
            row = rows.setdefault(
                r.spec, {"pass": r.spec, "runs": 0, "modified": False, "seconds": 0.0, "nodes_removed": 0, "stats": {}}
            )
            row["runs"] += 1
            row["modified"] |= r.modified
            row["seconds"] += r.seconds
            row["nodes_removed"] += r.nodes_before - r.nodes_after
            for k, v in r.stats.items():
                row["stats"][k] = row["stats"].get(k, 0) + v
        return list(rows.values())


class PassManager:
    def __init__(self, pipeline: str | list[PipelineItem], ctx: PassContext | None = None):
        self.items = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
        self.ctx = ctx or PassContext()

    def passes(self) -> list[Pass]:
        """Every pass of the pipeline, fixpoint groups opened, in order."""
        found: list[Pass] = []
        stack = list(reversed(self.items))
        while stack:
            item = stack.pop()
            if isinstance(item, FixPoint):
                stack.extend(reversed(item.items))
            else:
                found.append(item)
        return found

    @property
    def text(self) -> str:
        return format_pipeline(self.items)

    def pass_names(self) -> set[str]:
        names, stack = set(), list(self.items)
        while stack:
            item = stack.pop()
            if isinstance(item, FixPoint):
                stack.extend(item.items)
            else:
                names.add(item.name)
        return names

    def check_counter(self, counter) -> None:
        """A debug-counter name that is not in the pipeline is a typo: say so instead of ignoring it."""
        unknown = sorted(set(counter.limits) - self.pass_names())
        if unknown:
            raise UserError(
                f"--debug-counter names {', '.join(unknown)}, which the pipeline does not run",
                f"use one of: {', '.join(sorted(self.pass_names()))}",
            )

    def run(self, model: ir.Model) -> PipelineResult:
        result = PipelineResult(model)
        self._run_items(self.items, result)
        return result

    def _run_items(self, items: list[PipelineItem], result: PipelineResult) -> bool:
        changed = False
        for item in items:
            if isinstance(item, FixPoint):
                for _ in range(MAX_FIXPOINT_ROUNDS):
                    if not self._run_items(item.items, result):
                        break
                    changed = True
                else:
                    result.unsettled.append(item.spec())
            else:
                changed |= self._run_pass(item, result)
        return changed

    def _run_pass(self, pass_: Pass, result: PipelineResult) -> bool:
        ctx = self.ctx
        model = result.model
        for inst in ctx.instruments:
            inst.before_pass(pass_, model, ctx)
        before = eir.node_count(model)
        start = time.perf_counter()
        out: PassResult = pass_(model, ctx)
        seconds = time.perf_counter() - start
        result.model = out.model
        record = PassRecord(pass_.name, pass_.spec(), out.modified, dict(out.stats), seconds, before, eir.node_count(out.model))
        result.records.append(record)
        for inst in ctx.instruments:
            inst.after_pass(pass_, out.model, ctx, record)
        return out.modified


def run_pipeline(model: ir.Model, pipeline: str, ctx: PassContext | None = None) -> PipelineResult:
    return PassManager(pipeline, ctx).run(model)
