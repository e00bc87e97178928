"""Check edgec's artifacts for GPU targets in onnxruntime's GPU execution providers (CUDA, TensorRT).

Two steps, because the machine with the GPU need not have edgec:

    python tools/check_gpu_runtime.py prepare DIR   # here: compile small models for jetson-orin-nano
                                                    # (fp32, int8) and write the original's outputs
    python tools/check_gpu_runtime.py run DIR       # there: onnxruntime (-gpu) and numpy only

`run` runs every artifact in DIR on each GPU provider onnxruntime offers (or those --provider names)
and on the CPU, and prints its output cosine (at real tokens) to the original's, computed on the CPU
by `prepare`. It exits 1 when no such provider is available or an artifact does not run on one, 2
when an artifact's outputs there fall under the tolerance (mean cosine 0.999 for fp32, 0.99 for
int8) or differ from the same artifact on the CPU by more than that allows. The machine needs
onnxruntime-gpu built for its CUDA (the plain onnxruntime wheel has no GPU provider).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODELS = [("bert", "torchscript"), ("bert", "dynamo"), ("vit", "dynamo")]
TARGET = "jetson-orin-nano"
MIN_COSINE = {"fp32": 0.999, "int8": 0.99}
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def prepare(folder: Path, models: list[str] | None = None) -> None:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    import zoo

    from edgec.compiler import CompileOptions, compile_model
    from edgec.verify import generate_inputs, run_model
    from edgec.frontends.onnx import load_onnx

    folder.mkdir(parents=True, exist_ok=True)
    manifest = []
    with tempfile.TemporaryDirectory(prefix="edgec-gpu-check-") as cache:
        for arch, exporter in MODELS:
            name = f"{arch}-{exporter}"
            if models and name not in models:
                continue
            source = zoo.zoo_model(arch, exporter)
            feeds = generate_inputs(load_onnx(source), batch=4, sequence=16, image=32, seed=3)
            np.savez(folder / f"{name}-inputs.npz", **feeds)
            np.savez(folder / f"{name}-reference.npz", **run_model(source, feeds))
            calib = Path(cache) / f"{name}-calib.npz"
            np.savez(calib, **generate_inputs(load_onnx(source), batch=16, sequence=16, image=32, seed=4))
            for precision in ("fp32", "int8"):
                out = folder / f"{name}-{precision}"
                result = compile_model(source, CompileOptions(target=TARGET, outdir=out, precision=precision,
                                                              calib=calib if precision == "int8" else None,
                                                              backend="onnxruntime", cache_dir=Path(cache)))
                if not result.passed:
                    raise SystemExit(f"{name} {precision} did not compile: {result.failures}")
                manifest.append({"model": name, "precision": precision,
                                 "artifact": str(result.artifact.path.relative_to(folder))})
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"{len(manifest)} artifacts in {folder}")


def _mask(feeds: dict, output: np.ndarray) -> np.ndarray | None:
    mask = feeds.get("attention_mask")
    if mask is None or output.ndim < 3 or output.shape[:2] != mask.shape:
        return None
    return mask.astype(bool)


def cosines(reference: dict, outputs: dict, feeds: dict) -> tuple[float, float]:
    """Mean and least cosine over samples (tokens, where an attention mask says which are real): what
    edgec.verify.compare measures, here with numpy alone for a machine without edgec's dependencies."""
    values = []
    for name, expected in reference.items():
        got = outputs[name].astype(np.float64)
        expected = expected.astype(np.float64)
        mask = _mask(feeds, expected)
        if mask is not None:
            got, expected = got[mask], expected[mask]
        got, expected = got.reshape(len(got), -1), expected.reshape(len(expected), -1)
        dot = (got * expected).sum(1)
        norm = np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1)
        values.append(np.where(norm > 0, dot / np.maximum(norm, 1e-30), 1.0))
    every = np.concatenate(values)
    return float(every.mean()), float(every.min())


def run(folder: Path, providers: list[str] | None = None) -> int:
    import onnxruntime as ort

    available = ort.get_available_providers()
    gpus = [p for p in (providers or GPU_PROVIDERS) if p in available]
    print(f"onnxruntime {ort.__version__}: {', '.join(available)}")
    if not gpus:
        print(f"none of {', '.join(providers or GPU_PROVIDERS)} is available: install onnxruntime-gpu on a machine "
              "with an NVIDIA GPU")
        return 1
    status = 0
    print(f"{'artifact':<32} {'provider':<28} {'session':<28} {'cos mean':>9} {'cos min':>9} {'vs cpu':>9}")
    for entry in json.loads((folder / "manifest.json").read_text()):
        name, precision = entry["model"], entry["precision"]
        feeds = dict(np.load(folder / f"{name}-inputs.npz"))
        reference = dict(np.load(folder / f"{name}-reference.npz"))
        path = str(folder / entry["artifact"])
        cpu = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        taken = {i.name: feeds[i.name] for i in cpu.get_inputs()}
        on_cpu = dict(zip([o.name for o in cpu.get_outputs()], cpu.run(None, taken)))
        for provider in gpus:
            label = f"{name} {precision}"
            try:
                sess = ort.InferenceSession(path, providers=list(dict.fromkeys([provider, "CPUExecutionProvider"])))
                got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, taken)))
            except Exception as exc:  # the provider refused the artifact: a finding, not a crash
                print(f"{label:<32} {provider:<28} FAILED: {str(exc).splitlines()[0][:120]}")
                status = max(status, 1)
                continue
            # The provider the session took first; nodes it does not take fall back to the CPU unseen.
            ran_on = sess.get_providers()[0]
            mean, least = cosines(reference, got, feeds)
            versus_cpu, _ = cosines(on_cpu, got, feeds)
            print(f"{label:<32} {provider:<28} {ran_on:<28} {mean:>9.6f} {least:>9.6f} {versus_cpu:>9.6f}")
            if ran_on != provider or mean < MIN_COSINE[precision] or versus_cpu < MIN_COSINE[precision]:
                status = 2
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("prepare", "run"))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--models", nargs="*", help=f"prepare: some of {', '.join(f'{a}-{e}' for a, e in MODELS)}")
    parser.add_argument("--provider", action="append", help=f"run: on this provider (default: {', '.join(GPU_PROVIDERS)})")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.folder, args.models)
        return 0
    return run(args.folder, args.provider)


if __name__ == "__main__":
    sys.exit(main())
