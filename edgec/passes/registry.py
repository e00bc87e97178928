"""Pass registry and text pipelines: "fold-constants,cleanup,some-pass{ratio=0.25}".

Grammar (like mlir-opt's, minus nesting by op):
    pipeline := item ("," item)*
    item     := NAME ["{" key=value ("," key=value)* "}"]   a pass, or a named pipeline
              | "fixpoint(" pipeline ")"                      repeat until no pass changes the model
Values are text; each pass's Options dataclass gives them their type. Lists use ":" (a:b:c).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from edgec.errors import UserError
from edgec.passes.core import Pass
from edgec.plugins import Registry

# Named pipelines expand in place. `cleanup` reaches a fixed point because folding exposes dead
# code and dead-code removal exposes more identical subexpressions.
NAMED_PIPELINES: dict[str, str] = {
    "cleanup": (
        "fixpoint(fold-constants,simplify-shapes,remove-identity,remove-redundant-casts,"
        "remove-redundant-reshapes,remove-redundant-transposes,cse,remove-dead-code)"
    ),
}

MAX_FIXPOINT_ROUNDS = 8


def _builtin_passes() -> dict[str, type[Pass]]:
    from edgec.passes import cleanup, fuse, prune, quantize, replace

    return {cls.name: cls for cls in cleanup.PASSES + fuse.PASSES + replace.PASSES + prune.PASSES + quantize.PASSES}


PASSES: Registry[type[Pass]] = Registry("pass", "edgec.passes", _builtin_passes)


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Registers a pass class defined in code (plugins usually use the entry point instead)."""
    PASSES.register(cls.name, cls, origin=cls.__module__)
    return cls


@dataclass
class FixPoint:
    items: list["PipelineItem"]

    def spec(self) -> str:
        return f"fixpoint({format_pipeline(self.items)})"


PipelineItem = Union[Pass, FixPoint]


def format_pipeline(items: list[PipelineItem]) -> str:
    return ",".join(item.spec() for item in items)


def parse_pipeline(text: str) -> list[PipelineItem]:
    """Text to pass instances; every unknown name or option is a UserError listing the valid ones."""
    parser = _Parser(text)
    items = parser.pipeline(depth=0)
    if parser.pos != len(text):
        parser.fail("unexpected text")
    return items


class _Parser:
    def __init__(self, text: str, expanding: tuple[str, ...] = ()):
        self.text = text
        self.pos = 0
        self.expanding = expanding

    def fail(self, why: str):
        shown = self.text[: self.pos] + "⟨here⟩" + self.text[self.pos :]
        raise UserError(
            f"bad pipeline {self.text!r}: {why} at {shown!r}",
            "write passes separated by commas, options as name{key=value}, e.g. cleanup,remove-dead-code",
        )

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_space(self):
        while self.peek().isspace():
            self.pos += 1

    def name(self) -> str:
        self.skip_space()
        start = self.pos
        while self.peek() and (self.peek().isalnum() or self.peek() in "-_."):
            self.pos += 1
        if start == self.pos:
            self.fail("expected a pass name")
        return self.text[start : self.pos]

    def pipeline(self, depth: int) -> list[PipelineItem]:
        items: list[PipelineItem] = []
        while True:
            items.extend(self.item(depth))
            self.skip_space()
            if self.peek() == ",":
                self.pos += 1
                continue
            return items

    def item(self, depth: int) -> list[PipelineItem]:
        name = self.name()
        self.skip_space()
        if name == "fixpoint" and self.peek() == "(":
            self.pos += 1
            inner = self.pipeline(depth + 1)
            self.skip_space()
            if self.peek() != ")":
                self.fail("expected ')' closing fixpoint(")
            self.pos += 1
            return [FixPoint(inner)]
        options: dict[str, str] = {}
        if self.peek() == "{":
            self.pos += 1
            options = self.options()
        if name in NAMED_PIPELINES:
            if options:
                self.fail(f"named pipeline {name!r} takes no options")
            if name in self.expanding:
                self.fail(f"named pipeline {name!r} includes itself")
            sub = _Parser(NAMED_PIPELINES[name], self.expanding + (name,))
            return sub.pipeline(depth)
        if name not in PASSES:
            raise UserError(
                f"unknown pass {name!r} in pipeline",
                f"choose from: {', '.join(PASSES.names() + sorted(NAMED_PIPELINES))} (edgec passes lists them)",
            )
        cls = PASSES.get(name)
        return [cls(**options)]

    def options(self) -> dict[str, str]:
        options: dict[str, str] = {}
        while True:
            self.skip_space()
            if self.peek() == "}":
                self.pos += 1
                return options
            key = self.name()
            self.skip_space()
            if self.peek() != "=":
                self.fail(f"expected '=' after option {key!r}")
            self.pos += 1
            start = self.pos
            while self.peek() and self.peek() not in ",}":
                self.pos += 1
            options[key] = self.text[start : self.pos].strip()
            if self.peek() == ",":
                self.pos += 1
            elif self.peek() != "}":
                self.fail("expected ',' or '}'")
