"""Instruments wrap every pass without the pass knowing: IR dumps, verification, numeric checks."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, TextIO

import onnx_ir as ir

from edgec import ir as eir
from edgec.passes.core import Pass, PassContext


class Instrument:
    def before_pass(self, pass_: Pass, model: ir.Model, ctx: PassContext) -> None:
        pass

    def after_pass(self, pass_: Pass, model: ir.Model, ctx: PassContext, record) -> None:
        pass


class Progress(Instrument):
    """Reports each pass as it starts (a spinner's text, a log line)."""

    def __init__(self, step: Callable[[str], None]):
        self.step = step

    def before_pass(self, pass_, model, ctx) -> None:
        self.step(f"pass {pass_.spec()}")


class PrintAfterChange(Instrument):
    """Prints (or dumps to numbered files) the IR after every pass that changed it."""

    def __init__(self, stream: TextIO | None = None, dump_dir: str | Path | None = None):
        self.stream = stream if stream is not None or dump_dir is not None else sys.stderr
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.count = 0

    def after_pass(self, pass_, model, ctx, record) -> None:
        if not record.modified:
            return
        self.count += 1
        text = ir.to_onnx_text(model) if hasattr(ir, "to_onnx_text") else str(model)
        header = f"// ----- IR after {record.spec} (nodes {record.nodes_before} -> {record.nodes_after}) -----\n"
        if self.stream is not None:
            self.stream.write(header + text + "\n")
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / f"{self.count:03d}-{pass_.name}.txt").write_text(header + text)


class PassBrokeModel(Exception):
    """A pass produced an invalid or numerically different model: a bug, reported with the pass name."""


class VerifyAfterEachPass(Instrument):
    """Checks IR invariants after every changing pass and, given reference outputs, that the model
    still computes them (so the first pass that breaks numerics is named)."""

    def __init__(self, feeds: dict | None = None, reference: dict | None = None, min_cosine: float = 0.9999):
        self.feeds = feeds
        self.reference = reference
        self.min_cosine = min_cosine

    def after_pass(self, pass_, model, ctx, record) -> None:
        if not record.modified:
            return
        try:
            eir.verify(model)
        except eir.VerificationError as exc:
            raise PassBrokeModel(f"after pass {record.spec}: {exc}") from None
        if self.feeds is not None and self.reference is not None:
            from edgec.verify import compare, run_model, token_mask

            outputs = run_model(model, self.feeds)
            figures = compare(self.reference, outputs, token_mask(self.feeds))
            if figures["cosine_min"] < self.min_cosine:
                raise PassBrokeModel(
                    f"after pass {record.spec}: output cosine fell to {figures['cosine_min']:.6f} "
                    f"(max abs error {figures['max_abs_error']:.3g})"
                )
