"""What `edgec compile/inspect/opt MODEL` accepts: an .onnx file, or a Hugging Face model folder
(exported to ONNX through torch first)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx_ir as ir

from edgec.errors import UserError
from edgec.frontends.onnx import load_onnx
from edgec.frontends.torch import EXPORTERS



def resolve_source(path: str | os.PathLike, workdir: str | os.PathLike, *, exporter: str = "dynamo") -> Path:
    """The ONNX file to compile: `path` itself, or an export of the model folder into `workdir`."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model {path} does not exist", "check the path")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(
                f"{path} is a folder without config.json",
                "pass an .onnx file or a Hugging Face model folder (config.json + weights)",
            )
        if exporter not in EXPORTERS:
            raise UserError(f"unknown exporter {exporter!r}", f"choose one of: {', '.join(EXPORTERS)}")
        from edgec.frontends.torch import export_hf_folder

        return Path(export_hf_folder(path, Path(workdir) / "exported.onnx", exporter=exporter))
    return path


def load_source(path: str | os.PathLike, *, exporter: str = "dynamo") -> tuple[ir.Model, Path, tempfile.TemporaryDirectory | None]:
    """Loads MODEL into the IR; returns (model, onnx path, temp dir holding an export or None)."""
    path = Path(path)
    tmp = None
    if path.is_dir():
        tmp = tempfile.TemporaryDirectory(prefix="edgec-export-")
    onnx_path = resolve_source(path, tmp.name if tmp else ".", exporter=exporter)
    return load_onnx(onnx_path), onnx_path, tmp
