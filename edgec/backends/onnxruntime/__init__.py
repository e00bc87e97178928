"""onnxruntime backend: an optimized, portable .onnx that any onnxruntime (CPU, mobile, QNN EP) loads."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import onnx_ir as ir

from edgec import ir as eir
from edgec.backends import Artifact, Backend

# x86 features with an instruction that sums u8 x s8 products into int32 without 16-bit saturation.
VNNI = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    description = "optimized ONNX for onnxruntime"
    precisions = ("fp32", "int8", "mixed")
    # The QDQ ONNX carries A16W8 (16-bit QDQ pairs) and fp16 ops as such: the QNN EP runs them on
    # Hexagon's HTP; the CPU EP computes them in float (16-bit) or fp16.
    mixed_ladder = ("int8", "int16", "fp16", "fp32")

    attention_form = "decomposed"
    fusions = ("fuse-layer-norm", "fuse-gelu")
    # onnxruntime's CPU kernels for its contrib ops: one fused attention (packed QKV GEMM), residual
    # add + RMSNorm, bias + GELU; the residual Add before a LayerNorm is a Sum, which onnxruntime does
    # not fuse into its SkipLayerNormalization, 2.4x slower than the two. Execution providers for
    # accelerators (QNN, Core ML, NNAPI, TensorRT) take standard ONNX only, so targets with such units
    # get the standard forms above.
    cpu_attention_form = "onnxruntime"
    cpu_fusions = ("fuse-layer-norm", "fuse-gelu", "residual-sum", "fuse-skip-norm", "fuse-bias-gelu")

    def quantization(self, target) -> dict:
        # onnxruntime's CPU integer GEMMs take uint8 activations with int8 weights (u8s8). On x86 without
        # VNNI they multiply with VPMADDUBSW, whose 16-bit pair sums saturate unless weights are 7-bit.
        if target.arch == "x86_64" and not set(target.cpu_features) & VNNI:
            return {"activations": "uint8", "weights": "int7"}
        return {"activations": "uint8"}

    def lowering_pipeline(self, target, precision: str) -> str:
        if precision in ("int8", "mixed"):
            # Quantized attention needs its MatMuls in the graph: the fused Attention op runs in float.
            return super().lowering_pipeline(target, precision)
        if all(unit.kind == "cpu" for unit in target.units):
            items = [f"lower-attention{{form={self.cpu_attention_form}}}", *self.cpu_fusions]
            return ",".join([*items, "cleanup"])
        return super().lowering_pipeline(target, precision)

    def quantized_pipeline(self, target, precision: str) -> str:
        # onnxruntime's CPU kernels: the bias inside the integer MatMul, the int8 embedding rows
        # dequantized by Cast and Mul, the tanh GELU (0.7x the erf one) where quantization hides the
        # difference, and residual Adds onnxruntime cannot fuse into its slow SkipLayerNormalization.
        # QNN and the other accelerator EPs take the standard QDQ form.
        if all(unit.kind == "cpu" for unit in target.units):
            return "fuse-integer-matmul,expand-dequantize,approximate-gelu,residual-sum"
        return ""

    def unavailable_reason(self) -> str | None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "onnxruntime is not installed: pip install onnxruntime"
        return None

    def artifact_names(self, stem: str = "model") -> tuple[str, ...]:
        return (f"{stem}.onnx", f"{stem}.onnx.data")

    def emit(self, model: ir.Model, outdir: Path, *, target, precision: str, stem: str = "model") -> Artifact:
        path = eir.save(model, Path(outdir) / f"{stem}.onnx")
        files = [path]
        data = path.with_name(path.name + ".data")
        if data.exists():
            files.append(data)
        return Artifact(self.name, path, files, {"opset": dict(model.opset_imports)})

    def run(self, artifact: Artifact, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from edgec.verify import run_model

        return run_model(artifact.path, feeds)
