"""onnx-graphsurgeon interop: a user's existing graph-surgeon function runs as an edgec pass."""

from __future__ import annotations

from typing import Callable

import onnx_ir as ir

from edgec import ir as eir
from edgec.passes.core import Pass, PassContext, PassResult


def to_graphsurgeon(model: ir.Model):
    import onnx_graphsurgeon as gs

    return gs.import_onnx(eir.to_proto(model))


def from_graphsurgeon(graph, *, template: ir.Model | None = None) -> ir.Model:
    """Back to the IR; `template` supplies model-level fields graph-surgeon does not carry."""
    import onnx_graphsurgeon as gs

    proto = gs.export_onnx(graph, do_type_check=False)
    if template is not None:
        proto.ir_version = template.ir_version
        proto.producer_name = template.producer_name or ""
        proto.producer_version = template.producer_version or ""
    return ir.from_proto(proto)


def graphsurgeon_pass(name: str, fn: Callable | None = None, *, summary: str = ""):
    """Turns `fn(graph: gs.Graph) -> gs.Graph | None` into a registered-ready Pass class.

    Use as `MyPass = graphsurgeon_pass("my-pass", fn)` or as a decorator `@graphsurgeon_pass("my-pass")`.
    The pass reports modified only when the graph's structure really changed.
    """

    def make(func: Callable) -> type[Pass]:
        def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
            graph = to_graphsurgeon(model)
            # Compare before graph-surgeon's cleanup/toposort, which reorder an untouched graph too.
            before = eir.structure_key(from_graphsurgeon(graph.copy(), template=model))
            out = func(graph)
            graph = out if out is not None else graph
            changed = eir.structure_key(from_graphsurgeon(graph.copy(), template=model)) != before
            if not changed or not ctx.allow(self.name):
                return PassResult(model, False)
            graph.cleanup().toposort()
            return PassResult(from_graphsurgeon(graph, template=model), True, {"graphsurgeon_changed": 1})

        doc = summary or (func.__doc__ or f"graph-surgeon function {func.__name__}").strip().splitlines()[0]
        cls = type(f"GraphSurgeon_{func.__name__}", (Pass,), {"name": name, "run": run, "__doc__": doc})
        return cls

    return make(fn) if fn is not None else make
