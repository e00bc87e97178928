"""Backends turn the final IR into the artifact a target's runtime loads, and run that artifact.

A backend says which targets it serves (`supports`), whether its toolchain is installed here
(`unavailable_reason`), writes the artifact (`emit`) and runs it in the real runtime (`run`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import onnx_ir as ir

from edgec.plugins import Registry


class RuntimeUnavailable(Exception):
    """The artifact's runtime cannot run on this machine (e.g. Core ML off macOS): skip, with the reason."""


@dataclass
class Artifact:
    backend: str
    path: Path                       # the file (or folder) the runtime loads
    files: list[Path] = field(default_factory=list)  # everything written, path included
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        total = 0
        for f in self.files:
            if f.is_dir():
                total += sum(p.stat().st_size for p in f.rglob("*") if p.is_file())
            elif f.exists():
                total += f.stat().st_size
        return total


class Backend:
    name: ClassVar[str]
    description: ClassVar[str] = ""
    # Precisions this backend can emit.
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    # The rungs of mixed precision (edgec.quantize.mixed.LADDER) this backend's lowering runs; a
    # compile uses those the target also has.
    mixed_ladder: ClassVar[tuple[str, ...]] = ("int8", "fp32")
    # Whether artifacts keep the model's dynamic dims (TFLite, for one, specialises them).
    dynamic_shapes: ClassVar[bool] = True

    def configure(self, options, progress: Callable[[str], None]) -> None:
        """Takes the compile's options (CompileOptions: tune_trials, tuning_db, cache_dir, ...) and the
        console's progress callback before anything runs; raises UserError for options it refuses."""

    def unavailable_reason(self) -> str | None:
        """None when the toolchain is installed; otherwise what is missing and how to install it."""
        return None

    def supports(self, target) -> bool:
        return self.name in target.backends

    # How attention reaches this backend's runtime: a `lower-attention` form ("decomposed" for
    # runtimes that fuse MatMul/Softmax/MatMul themselves or run them as such: TFLite, TensorRT;
    # "onnxruntime" for onnxruntime's fused operators), or None to leave blocks as exported.
    attention_form: ClassVar[str | None] = None
    # Fusions into ops this backend's runtime has, run after attention is lowered.
    fusions: ClassVar[tuple[str, ...]] = ()

    def quantization(self, target) -> dict:
        """insert-qdq options for this backend's integer kernels on `target` (int8 symmetric
        activations: what TensorRT and most NPUs take)."""
        return {"activations": "int8"}

    def lowering_pipeline(self, target, precision: str) -> str:
        """Passes that put the IR into the form this backend's runtime runs best (may be empty):
        attention in `attention_form`, then `fusions`, then cleanup of what they left."""
        items = [f"lower-attention{{form={self.attention_form}}}"] if self.attention_form else []
        items += self.fusions
        return ",".join([*items, "cleanup"]) if items else ""

    def quantized_pipeline(self, target, precision: str) -> str:
        """Passes run after quantization (int8, mixed) that put the QDQ model into the form this
        backend's runtime runs best (may be empty: the standard QDQ form)."""
        return ""

    def unsupported_ops(self, model: ir.Model) -> dict[str, str]:
        """Node name -> why `emit` cannot take that node of the lowered IR (empty when it takes all),
        asked by `edgec inspect --target` before anything is emitted."""
        return {}

    def artifact_names(self, stem: str = "model") -> tuple[str, ...]:
        """Every file or folder name `emit` may write into the output folder."""
        raise NotImplementedError

    def emit(self, model: ir.Model, outdir: Path, *, target, precision: str, stem: str = "model") -> Artifact:
        raise NotImplementedError

    def run(self, artifact: Artifact, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


def _builtin_backends() -> dict[str, type[Backend]]:
    from edgec.backends.onnxruntime import OnnxRuntimeBackend
    from edgec.backends.tflite import TFLiteBackend
    from edgec.backends.tvm import TVMBackend

    return {OnnxRuntimeBackend.name: OnnxRuntimeBackend, TFLiteBackend.name: TFLiteBackend, TVMBackend.name: TVMBackend}


BACKENDS: Registry[type[Backend]] = Registry("backend", "edgec.backends", _builtin_backends)
