"""ONNX frontend: load a file, bring it to edgec's opset, infer shapes (dynamic dims stay symbolic)."""

from __future__ import annotations

import logging
import os

import onnx_ir as ir

from edgec import ir as eir
from edgec.analysis.shapes import infer_shapes
from edgec.errors import UserError

# Every pass and lowering is written against this default-domain opset: it has LayerNormalization
# (17), axes-as-inputs everywhere (18) and Gelu (20), and both torch exporters reach it losslessly.
CANONICAL_OPSET = 20
MIN_OPSET = 7
# model.meta key: the default-domain opset the file had before normalisation (for `inspect`).
ORIGINAL_OPSET_KEY = "edgec.original_opset"


def load_onnx(path: str | os.PathLike, *, opset: int = CANONICAL_OPSET) -> ir.Model:
    model = eir.load(path)
    model.meta[ORIGINAL_OPSET_KEY] = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    normalize_opset(model, opset, source=str(path))
    eir.name_nodes(model)
    infer_shapes(model)
    return model


def normalize_opset(model: ir.Model, opset: int = CANONICAL_OPSET, *, source: str = "model") -> bool:
    """Converts the default domain to `opset` in place; returns whether anything changed."""
    if "ai.onnx" in model.opset_imports:
        # "ai.onnx" is another spelling of the default domain; passes match on "" only.
        version = model.opset_imports.pop("ai.onnx")
        model.opset_imports.setdefault("", version)
        for node in model.graph.all_nodes():
            if node.domain == "ai.onnx":
                node.domain = ""
    current = model.opset_imports.get("")
    if current is None:
        raise UserError(f"{source} imports no default ONNX opset", "re-export it with a standard ONNX exporter")
    if current == opset:
        return False
    if current < MIN_OPSET:
        raise UserError(f"{source} uses ONNX opset {current}, older than {MIN_OPSET}", "re-export it with a current exporter")
    from onnxscript import version_converter

    # The converter logs every adapter it applies; users only need to know if it failed.
    logger = logging.getLogger("onnxscript")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        version_converter.convert_version(model, opset, fallback=True)
    except Exception as exc:
        raise UserError(
            f"{source} uses ONNX opset {current} and could not be converted to opset {opset} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})",
            f"re-export it with opset_version={opset}",
        ) from None
    finally:
        logger.setLevel(level)
    got = model.opset_imports.get("")
    if got != opset:
        raise UserError(f"{source}: opset {current} could not be converted to {opset}", f"re-export it with opset_version={opset}")
    return True
