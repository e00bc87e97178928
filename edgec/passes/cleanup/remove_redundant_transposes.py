"""remove-redundant-transposes: drops Transposes with the identity permutation and composes a
Transpose of a Transpose into one (or none, when the two cancel)."""

from __future__ import annotations

import onnx_ir as ir

from edgec.passes.cleanup._util import bypass, is_onnx_op, rank, remove_dead
from edgec.passes.core import Pass, PassContext, PassResult


def _is_transpose(node: ir.Node | None) -> bool:
    return node is not None and is_onnx_op(node, "Transpose") and bool(node.inputs) and node.inputs[0] is not None


def _perm(node: ir.Node) -> list[int] | None:
    """The permutation, made explicit: without `perm` a Transpose reverses the axes of its input."""
    perm = node.attributes.get_ints("perm")
    if perm is not None:
        return list(perm)
    r = rank(node.inputs[0])
    return None if r is None else list(reversed(range(r)))


def _is_identity(perm: list[int]) -> bool:
    return perm == list(range(len(perm)))


class RemoveRedundantTransposesPass(Pass):
    """Removes identity Transposes and turns Transpose(Transpose(x, p1), p2) into one Transpose with
    the composed permutation, or into x when they cancel."""

    name = "remove-redundant-transposes"
    requires = ("shapes",)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        removed = 0
        # Shapes are only needed for a Transpose without `perm` (reverse all axes of a rank to find).
        if any(_is_transpose(n) and n.attributes.get("perm") is None for n in model.graph.all_nodes()):
            ctx.analyses.get("shapes", model)
        for node in list(model.graph.all_nodes()):
            if node.graph is None or not _is_transpose(node):
                continue
            outer = _perm(node)
            if outer is None:
                continue
            if _is_identity(outer):
                if ctx.allow(self.name):
                    bypass(node, node.inputs[0])
                    removed += 1
                continue
            inner_node = node.inputs[0].producer()
            if not _is_transpose(inner_node):
                continue
            inner = _perm(inner_node)
            if inner is None or len(inner) != len(outer):
                continue
            # Output axis i is axis outer[i] of the inner output, which is axis inner[outer[i]] of x.
            composed = [inner[i] for i in outer]
            source = inner_node.inputs[0]
            if _is_identity(composed):
                if ctx.allow(self.name):
                    bypass(node, source)
                    removed += 1 + remove_dead(inner_node.outputs, only=_is_transpose)[0]
            elif len(node.inputs[0].uses()) == 1 and not node.inputs[0].is_graph_output():
                # With other readers the inner Transpose stays, and two Transposes cost what two did.
                if ctx.allow(self.name):
                    node.replace_input_with(0, source)
                    node.attributes["perm"] = ir.AttrInt64s("perm", composed)
                    removed += remove_dead(inner_node.outputs, only=_is_transpose)[0]
        return PassResult(model, removed > 0, {"transposes_removed": removed})
