"""The edgec IR into a Relax module through TVM's ONNX frontend, with every failure named by its node.

The frontend handles static shapes well once cleanup has folded the exporters' shape arithmetic;
symbolic dims break its Reshape/Expand/Resize converters (why the backend asks for static shapes).
"""

from __future__ import annotations

import contextlib
import io
import warnings

import onnx_ir as ir

from edgec import ir as eir
from edgec.errors import UserError

_DEFAULT_DOMAINS = ("", "ai.onnx")
# The frontend converts If in its node loop and folds Constant; neither is in its converter table.
_HANDLED_OUTSIDE_TABLE = {"If", "Constant"}


class ConversionError(Exception):
    """A node the frontend rejected, with the node's name and op type."""

    def __init__(self, node: str, op_type: str, reason: str):
        super().__init__(f"{op_type} node {node!r}: {reason}")
        self.node, self.op_type, self.reason = node, op_type, reason


def unsupported_ops(model: ir.Model) -> dict[str, str]:
    """Node name -> why TVM's Relax ONNX frontend has no converter for it (empty when all convert)."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    table = _get_convert_map()
    problems = {}
    for node in model.graph.all_nodes():
        if node.domain not in _DEFAULT_DOMAINS:
            problems[node.name] = f"{node.domain}.{node.op_type} is not a standard ONNX op"
        elif node.op_type not in table and node.op_type not in _HANDLED_OUTSIDE_TABLE:
            problems[node.name] = f"{node.op_type} has no converter in TVM's Relax ONNX frontend"
    return problems


def check_convertible(model: ir.Model) -> None:
    """Raises a UserError naming the op types (and a node of each) that the frontend cannot convert."""
    problems = unsupported_ops(model)
    if not problems:
        return
    op_types = {node.name: node.op_type for node in model.graph.all_nodes()}
    first: dict[str, str] = {}
    for name in problems:
        first.setdefault(op_types[name], name)
    listed = ", ".join(f"{op} (e.g. node {node!r})" for op, node in sorted(first.items()))
    raise UserError(f"the tvm backend cannot convert {len(problems)} node(s): {listed}",
                    "compile for another backend, or rewrite these ops first (edgec inspect lists every node)")


def to_relax(model: ir.Model):
    """The Relax IRModule of a static-shape model, weights bound as constants.

    Raises ConversionError naming the node when a converter fails.
    """
    from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter

    class NamingImporter(ONNXGraphImporter):
        # The base class prints the failing op's inputs and re-raises without the node: keep the node.
        def _convert_operator(self, op_name, inputs, attrs, opset):
            try:
                return super()._convert_operator(op_name, inputs, attrs, opset)
            except Exception as exc:
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
                raise ConversionError(attrs["tvm_custom"]["name"], op_name, reason) from exc

    proto = eir.to_proto(model)
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    importer = NamingImporter(None, None, keep_params_in_input=False, sanitize=False)
    # The frontend warns about every renamed value and prints converter failures we report ourselves.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return importer.from_onnx(proto.graph, opset)


def convert(model: ir.Model):
    """to_relax, with a frontend failure turned into a UserError that names the node."""
    check_convertible(model)
    try:
        return to_relax(model)
    except ConversionError as exc:
        raise UserError(f"TVM's Relax ONNX frontend fails on the {exc}",
                        "rewrite that node before the tvm backend (edgec opt --print-after-change shows the graph), "
                        "or compile for another backend") from None
