"""TFLite backend: writes the .tflite flatbuffer straight from the IR (builtin ops only, no TensorFlow) and
runs it in LiteRT's interpreter (XNNPACK on CPU)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx_ir as ir

from edgec.backends import Artifact, Backend
from edgec.backends.static import TensorSpec, run_static
from edgec.errors import UserError

INSTALL_HINT = "pip install ai-edge-litert"


def unsupported_ops(model: ir.Model) -> dict[str, str]:
    """Node name -> why the tflite writer cannot lower that node (empty when all of the graph lowers)."""
    try:
        from edgec.backends.tflite.lower import unsupported_ops as check
    except ImportError:
        raise UserError("the tflite backend needs ai-edge-litert (its TFLite schema)", INSTALL_HINT) from None
    return check(model)


def describe_unsupported(problems: Mapping[str, str]) -> str:
    """One line naming the op types that do not lower and the first node of them."""
    node, reason = next(iter(problems.items()))
    count = f"{len(problems)} node{'s' if len(problems) > 1 else ''}"
    return f"the tflite backend cannot lower {count}, e.g. {node!r}: {reason}"


class TFLiteBackend(Backend):
    name = "tflite"
    description = "TFLite flatbuffer (builtin ops) for LiteRT / XNNPACK"
    # fp16: weights stored as float16 and dequantized to float32 on load (TFLite's float16 weight
    # format); activations stay float32. int8/mixed: the IR's QDQ in TFLite's integer kernels
    # (ops_integer); ops that mixed precision keeps float run in float.
    precisions = ("fp32", "fp16", "int8", "mixed")
    dynamic_shapes = False
    # XNNPACK runs MatMul/Softmax/MatMul well and TFLite has no fused attention builtin.
    attention_form = "decomposed"
    # The Erf polynomial of TorchScript GELUs becomes ONNX Gelu, which is TFLite's GELU builtin.
    fusions = ("fuse-gelu",)

    def quantization(self, target) -> dict:
        # TFLite's int8 kernels: symmetric per-channel weights, int8 activations with zero points, int8
        # outputs whose scales calibration gives (insert-qdq's `outputs`). The attention MatMuls stay
        # float: XNNPACK runs no int8 BATCH_MATMUL, and TFLite's own kernel made MiniLM 1x128 slower
        # than fp32 (61 vs 45 ms here; 42 ms with them in float).
        return {"activations": "int8-asym", "outputs": True, "attention": False}

    npu_aot = "auto"

    def unsupported_ops(self, model: ir.Model) -> dict[str, str]:
        return unsupported_ops(model)

    def configure(self, options, progress) -> None:
        if options.npu_aot not in ("auto", "off"):
            raise UserError(f"--npu-aot {options.npu_aot!r} is not auto or off", "write --npu-aot auto or --npu-aot off")
        self.npu_aot = options.npu_aot

    def unavailable_reason(self) -> str | None:
        try:
            import ai_edge_litert.interpreter  # noqa: F401
        except ImportError:
            return f"ai-edge-litert is not installed: {INSTALL_HINT}"
        return None

    def artifact_names(self, stem: str = "model") -> tuple[str, ...]:
        return (f"{stem}.tflite",)

    def emit(self, model: ir.Model, outdir: Path, *, target, precision: str, stem: str = "model") -> Artifact:
        from edgec.backends.tflite.lower import lower_model

        if precision not in self.precisions:
            raise UserError(f"the tflite backend writes {', '.join(self.precisions)}, not {precision}",
                            "choose one of those with --precision")
        problems = unsupported_ops(model)
        if problems:
            op_types = {node.name: node.op_type for node in model.graph}
            ops = sorted({op_types[name] for name in problems if name in op_types})
            raise UserError(f"{describe_unsupported(problems)} (op types: {', '.join(ops) or 'unknown'})",
                            "compile for another backend, or rewrite these ops before the tflite backend "
                            "(edgec inspect --target lists every node)")
        data, ctx = lower_model(model, fp16_weights=precision == "fp16")
        outdir = Path(outdir)
        outdir.mkdir(parents=True, exist_ok=True)
        path = outdir / f"{stem}.tflite"
        # A unique name beside the target, created like any file (umask permissions), then renamed over it.
        tmp = outdir / f".{stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tflite.tmp"
        try:
            with open(tmp, "xb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        graph = model.graph
        meta = {
            "precision": precision,
            "operators": len(ctx.fm.operators),
            "op_counts": dict(sorted(ctx.fm.op_counts().items())),
            "tensors": len(ctx.fm.tensors),
            "inputs": {v.name: list(v.shape) for v in graph.inputs if v.name not in graph.initializers},
            "outputs": {v.name: list(v.shape) for v in graph.outputs},
            "signature": "serving_default",
        }
        files = [path]
        if self.npu_aot != "off" and target.soc:
            meta["npu_aot"] = self._compile_for_npu(path, target, outdir, stem, files)
        return Artifact(self.name, path, files, meta)

    @staticmethod
    def _compile_for_npu(path: Path, target, outdir: Path, stem: str, files: list[Path]) -> dict:
        """The NPU build beside the portable .tflite where LiteRT's Qualcomm plugin can run here."""
        from edgec.backends.tflite import aot

        reason = aot.unavailable_reason(target)
        if reason is not None:
            return {"soc": target.soc, "status": "skipped", "reason": reason}
        compiled = aot.compile_for_npu(path, target, outdir, stem)
        files.append(compiled)
        return {"soc": target.soc, "status": "compiled", "file": compiled.name}

    def run(self, artifact: Artifact, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run_tflite(artifact.path, feeds)


def run_tflite(path: Path, feeds: Mapping[str, np.ndarray], *, num_threads: int | None = None,
               reference_kernels: bool = False) -> dict[str, np.ndarray]:
    """Runs a static-shape .tflite on feeds of any batch and of up to its static sizes.

    Feeds run in chunks of the artifact's batch; shorter non-batch axes are padded with zeros (an
    attention mask's 0 marks padding) and every output axis of a padded size is cropped back.
    `reference_kernels` runs TFLite's reference kernels instead of XNNPACK and the optimized ones:
    what tells a wrong lowering from a kernel's rounding.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.BUILTIN_REF if reference_kernels else OpResolverType.AUTO
    interpreter = Interpreter(model_path=str(path), num_threads=num_threads or os.cpu_count(),
                              experimental_op_resolver_type=resolver)
    interpreter.allocate_tensors()
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    specs = [TensorSpec(d["name"], tuple(int(n) for n in d["shape"]), np.dtype(d["dtype"]).name) for d in inputs]

    def call(arrays: list[np.ndarray]) -> list[np.ndarray]:
        for d, array in zip(inputs, arrays):
            interpreter.set_tensor(d["index"], array)
        interpreter.invoke()
        return [interpreter.get_tensor(d["index"]).copy() for d in outputs]
    return run_static(call, specs, [d["name"] for d in outputs], feeds, Path(path).name)
