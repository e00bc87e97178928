"""Cached facts about a model. Passes ask the cache; the pass manager drops what a pass invalidates."""

from __future__ import annotations

from typing import Any, Callable

import onnx_ir as ir

from edgec.errors import UserError

# name -> function(model) computing the fact. Analyses register themselves on import.
ANALYSES: dict[str, Callable[[ir.Model], Any]] = {}


def analysis(name: str):
    def register(fn: Callable[[ir.Model], Any]):
        if name in ANALYSES:
            raise ValueError(f"analysis {name!r} registered twice")
        ANALYSES[name] = fn
        return fn

    return register


class AnalysisCache:
    """Results keyed by (analysis name, model identity); valid until a pass that changes the model
    and does not preserve the analysis has run."""

    def __init__(self):
        self._results: dict[tuple[str, int], Any] = {}

    def get(self, name: str, model: ir.Model) -> Any:
        _load_builtin_analyses()
        if name not in ANALYSES:
            raise UserError(f"unknown analysis {name!r}", f"choose one of: {', '.join(sorted(ANALYSES))}")
        key = (name, id(model))
        if key not in self._results:
            self._results[key] = ANALYSES[name](model)
        return self._results[key]

    def invalidate(self, preserved: tuple[str, ...] = ()) -> None:
        if "*" in preserved:
            return
        self._results = {k: v for k, v in self._results.items() if k[0] in preserved}

    def cached(self) -> list[str]:
        return sorted({k[0] for k in self._results})


def _load_builtin_analyses() -> None:
    from edgec.analysis import attention, cost, shapes, structure  # noqa: F401  (registration on import)
