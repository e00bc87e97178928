"""Dead code removal: nodes nothing reads, unused initializers, model functions nobody calls and
opset imports nothing uses. Graph inputs stay: they are the model's API."""

from __future__ import annotations

import onnx_ir as ir

from edgec.passes.cleanup._util import ONNX_DOMAINS
from edgec.passes.core import NoOptions, Pass, PassContext, PassResult


def _subgraphs(node: ir.Node) -> list[ir.Graph]:
    graphs: list[ir.Graph] = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            graphs.append(attr.as_graph())
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs.extend(attr.as_graphs())
    return graphs


def _detach(node: ir.Node) -> None:
    """Drops the uses a dead node's subgraphs make of outer values, so those can die too."""
    for graph in _subgraphs(node):
        for inner in reversed(list(graph)):
            _detach(inner)
            for i in range(len(inner.inputs)):
                inner.replace_input_with(i, None)


def _domains(graph_like: ir.Graph | ir.Function) -> set[str]:
    return {node.domain for node in ir.traversal.RecursiveGraphIterator(graph_like)}


class RemoveDeadCodePass(Pass):
    """Removes nodes whose outputs nothing reads, unused initializers, functions and opset imports."""

    name = "remove-dead-code"
    Options = NoOptions
    preserves = ("shapes",)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        stats = {"nodes_removed": 0, "initializers_removed": 0, "functions_removed": 0, "opsets_removed": 0}
        self._sweep(model.graph, ctx, stats)
        self._remove_functions(model, ctx, stats)
        self._remove_opsets(model, ctx, stats)
        return PassResult(model, any(stats.values()), stats)

    def _sweep(self, graph: ir.Graph, ctx: PassContext, stats: dict[str, int]) -> None:
        # Reverse order sees every reader before what it reads, so one sweep removes whole chains;
        # onnx-ir's node list allows removal while iterating.
        for node in reversed(graph):
            dead = not any(out.uses() or out.is_graph_output() for out in node.outputs)
            if dead and ctx.allow(self.name):
                _detach(node)
                graph.remove(node, safe=True)
                stats["nodes_removed"] += 1
                continue
            for subgraph in _subgraphs(node):
                self._sweep(subgraph, ctx, stats)
        for value in list(graph.initializers.values()):
            if value.uses() or value.is_graph_input() or value.is_graph_output():
                continue
            if ctx.allow(self.name):
                del graph.initializers[value.name]
                stats["initializers_removed"] += 1

    def _remove_functions(self, model: ir.Model, ctx: PassContext, stats: dict[str, int]) -> None:
        # A function is used when the main graph, or a function in use, calls it.
        used: set[ir.OperatorIdentifier] = set()
        pending = [model.graph]
        while pending:
            for node in ir.traversal.RecursiveGraphIterator(pending.pop()):
                op = node.op_identifier()
                if op in model.functions and op not in used:
                    used.add(op)
                    pending.append(model.functions[op])
        for op in [op for op in model.functions if op not in used]:
            if ctx.allow(self.name):
                del model.functions[op]
                stats["functions_removed"] += 1

    def _remove_opsets(self, model: ir.Model, ctx: PassContext, stats: dict[str, int]) -> None:
        # The default domain always stays: converters and checkers read its version.
        used = set(ONNX_DOMAINS) | _domains(model.graph)
        for function in model.functions.values():
            used |= {function.domain} | _domains(function)
        for domain in [d for d in model.opset_imports if d not in used]:
            if ctx.allow(self.name):
                del model.opset_imports[domain]
                stats["opsets_removed"] += 1
