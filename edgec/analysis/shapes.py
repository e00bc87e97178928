"""Shape and type inference as an analysis: passes that change shapes invalidate it."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from edgec.analysis import analysis


def infer_shapes(model: ir.Model) -> ir.Model:
    """Annotates every value with its inferred type and shape, in place. Dynamic dims stay symbolic."""
    # strict_mode=False: a custom op or an exporter quirk must not stop inference of everything else.
    result = ShapeInferencePass(strict_mode=False, data_prop=True)(model)
    if result.model is not model:
        # The pass returns a new model; copy its annotations onto ours so references stay valid.
        inferred = {v.name: v for v in _values(result.model)}
        for value in _values(model):
            other = inferred.get(value.name)
            if other is not None:
                if other.type is not None:
                    value.type = other.type
                if other.shape is not None:
                    value.shape = other.shape
    return model


def _values(model: ir.Model):
    graph = model.graph
    yield from graph.inputs
    for node in graph:
        yield from node.outputs


@analysis("shapes")
def shapes(model: ir.Model) -> dict[str, ir.Shape | None]:
    infer_shapes(model)
    return {v.name: v.shape for v in _values(model) if v.name}
