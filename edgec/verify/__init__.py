"""Numeric comparison of a compiled model with the original: run both, report how close they are."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from edgec import ir as eir
from edgec.errors import UserError

# Default acceptance per precision: (minimum per-sample cosine, minimum SQNR in dB).
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"min_cosine": 0.9999, "min_sqnr_db": 40.0},
    "fp16": {"min_cosine": 0.999, "min_sqnr_db": 25.0},
    "int8": {"min_cosine": 0.98, "min_sqnr_db": 10.0},
    "mixed": {"min_cosine": 0.99, "min_sqnr_db": 15.0},
}


# The session option that stops onnxruntime's worker threads spinning after a run (timed sessions set it).
NO_SPINNING = ("session.intra_op.allow_spinning", "0")


def ort_session(model: ir.Model | str | os.PathLike, *, optimize: bool = True, threads: int | None = None,
                spinning: bool = True):
    """A CPU onnxruntime session of `model`. `spinning=False` stops its worker threads spinning after a
    run: sessions timed in turn then do not take each other's cores (see tools/bench_fusion.py)."""
    import onnxruntime as ort

    # Kernel failures are reported to the user as one line; onnxruntime's own log would add a second.
    ort.set_default_logger_severity(4)
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry(*NO_SPINNING)
    if isinstance(model, ir.Model):
        if eir.initializer_bytes(model) > eir.EXTERNAL_DATA_THRESHOLD:
            with tempfile.TemporaryDirectory(prefix="edgec-run-") as tmp:
                path = eir.save(model, Path(tmp) / "model.onnx")
                return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        data = eir.to_proto(model).SerializeToString()
        return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])


def run_model(model: ir.Model | str | os.PathLike, feeds: Mapping[str, np.ndarray], *, optimize: bool = True) -> dict[str, np.ndarray]:
    """Runs a model in onnxruntime (CPU) and returns its outputs by name."""
    return run_session(ort_session(model, optimize=optimize), feeds)


# The most samples one onnxruntime run takes: all 2617 calibration sentences of MiniLM (86 tokens) in
# one run held 11.2 GB of activations at once.
RUN_BATCH = 64


def run_session(session, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Runs an open onnxruntime session on the feeds it takes (extra arrays are ignored): a model with
    a fixed batch size in chunks of it, others in chunks of RUN_BATCH samples where every input and
    output names its dim 0 alike (else in one run)."""
    names = [o.name for o in session.get_outputs()]
    inputs = session.get_inputs()
    taken = {i.name: feeds[i.name] for i in inputs if i.name in feeds}
    fixed = {i.shape[0] for i in inputs if i.shape and isinstance(i.shape[0], int)}
    total = {np.shape(v)[0] for v in taken.values() if np.ndim(v)}
    if len(fixed) > 1 or len(total) != 1 or total == fixed:
        return dict(zip(names, session.run(names, taken)))
    (count,) = total
    # The batch axis is the one dim every input and output names alike at axis 0.
    firsts = {(i.shape or [None])[0] for i in inputs if i.name in taken} | {(o.shape or [None])[0] for o in session.get_outputs()}
    batched = len(firsts) == 1 and isinstance(next(iter(firsts)), str)
    if not fixed and (count <= RUN_BATCH or not batched or not all(np.ndim(v) for v in taken.values())):
        return dict(zip(names, session.run(names, taken)))
    batch = next(iter(fixed), RUN_BATCH)
    parts = []
    for start in range(0, count, batch):
        parts.append(session.run(names, {k: v[start:start + batch] for k, v in taken.items()}))
        if not fixed and any(np.ndim(out) == 0 or len(out) != min(batch, count - start) for out in parts[-1]):
            return dict(zip(names, session.run(names, taken)))  # an output without the batch axis
    return {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(names)}


def fit_feeds(feeds: Mapping[str, np.ndarray], shapes: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
    """The feeds with every axis but the batch padded with zeros (an attention mask's 0 marks padding)
    or cut to the static `shapes` a specialized model takes."""
    fitted = dict(feeds)
    for name, dims in shapes.items():
        array = feeds.get(name)
        if array is None or array.ndim != len(dims) or tuple(array.shape[1:]) == tuple(dims[1:]):
            continue
        out = np.zeros((array.shape[0], *dims[1:]), array.dtype)
        common = tuple(slice(0, min(a, d)) for a, d in zip(array.shape[1:], dims[1:]))
        out[(slice(None), *common)] = array[(slice(None), *common)]
        fitted[name] = out
    return fitted


TOKEN_MASK_INPUT = "attention_mask"


def token_mask(feeds: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """[batch, tokens] booleans, True where a token is real, from the feeds' attention mask (if any)."""
    mask = feeds.get(TOKEN_MASK_INPUT)
    if mask is None or np.ndim(mask) != 2:
        return None
    return np.asarray(mask) != 0


def compare(reference: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray],
            valid: np.ndarray | None = None) -> dict[str, float]:
    """Cosine (mean and min over samples of every output), SQNR in dB and max abs error, over all outputs.

    A sample is one row of the batch dimension; bit-identical outputs give cosine 1 and SQNR inf.
    With `valid` ([batch, tokens] booleans, see `token_mask`), an output whose first two dims are
    [batch, tokens] is compared at the real tokens only: what a model computes at padding positions
    is not part of its meaning (pooling and every task head mask them out).
    """
    cosines: list[float] = []
    signal = noise = 0.0
    max_abs = 0.0
    for name, ref in reference.items():
        if name not in actual:
            raise KeyError(f"output {name!r} missing from the compiled model")
        ref = np.asarray(ref, dtype=np.float64)
        out = np.asarray(actual[name], dtype=np.float64)
        if ref.shape != out.shape:
            raise ValueError(f"output {name!r} has shape {out.shape}, the original {ref.shape}")
        if valid is not None and ref.ndim >= 2 and ref.shape[:2] == valid.shape and not valid.all():
            rows_r = [r[keep].reshape(-1) for r, keep in zip(ref, valid)]
            rows_o = [o[keep].reshape(-1) for o, keep in zip(out, valid)]
            ref, out = np.concatenate(rows_r), np.concatenate(rows_o)
            cosines.extend(_cosine(a, b) for a, b in zip(rows_r, rows_o))
            err = out - ref
            signal += float(np.sum(ref * ref))
            noise += float(np.sum(err * err))
            max_abs = max(max_abs, float(np.max(np.abs(err))) if err.size else 0.0)
            continue
        rows_r = ref.reshape(ref.shape[0], -1) if ref.ndim > 1 else ref.reshape(1, -1)
        rows_o = out.reshape(rows_r.shape)
        output_cos = [_cosine(a, b) for a, b in zip(rows_r, rows_o)]
        cosines.extend(output_cos)
        err = out - ref
        signal += float(np.sum(ref * ref))
        noise += float(np.sum(err * err))
        out_max = float(np.max(np.abs(err))) if err.size else 0.0
        max_abs = max(max_abs, out_max)
    if not cosines:
        raise ValueError("nothing to compare: the outputs are empty")
    return {
        "cosine_mean": float(np.mean(cosines)),
        "cosine_min": float(np.min(cosines)),
        "sqnr_db": _sqnr(signal, noise),
        "max_abs_error": max_abs,
        "samples": len(cosines),
    }


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    if np.array_equal(a, b):  # dot / (|a| |b|) can round to just below 1 for identical rows
        return 1.0
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))


def _sqnr(signal: float, noise: float) -> float:
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return float(10 * np.log10(signal / noise))


def check_tolerance(figures: Mapping[str, float], tolerance: Mapping[str, float]) -> list[str]:
    """The ways `figures` break `tolerance` (empty when within it)."""
    failures = []
    if figures["cosine_min"] < tolerance["min_cosine"]:
        failures.append(f"min cosine {figures['cosine_min']:.6f} < {tolerance['min_cosine']}")
    if figures["sqnr_db"] < tolerance["min_sqnr_db"]:
        failures.append(f"SQNR {figures['sqnr_db']:.1f} dB < {tolerance['min_sqnr_db']} dB")
    if "min_cosine_mean" in tolerance and figures["cosine_mean"] < tolerance["min_cosine_mean"]:  # pruned models
        failures.append(f"mean cosine {figures['cosine_mean']:.6f} < {tolerance['min_cosine_mean']}")
    return failures


def parse_tolerance(text: str | None, precision: str) -> dict[str, float]:
    """`min_cosine=0.99,min_sqnr_db=20` on top of the precision's defaults."""
    tolerance = dict(TOLERANCES[precision])
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in tolerance:
            raise UserError(
                f"bad tolerance {item!r}", f"use keys {', '.join(tolerance)}, e.g. --tolerance min_cosine=0.999"
            )
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not np.isfinite(number) or (key == "min_cosine" and not -1.0 <= number <= 1.0):
            raise UserError(
                f"tolerance {key}={value.strip()!r} is not usable",
                "min_cosine is a number in [-1, 1], min_sqnr_db a finite number of dB",
            )
        tolerance[key] = number
    return tolerance


from edgec.verify.inputs import generate_inputs, load_inputs  # noqa: E402  (re-export)

__all__ = ["TOLERANCES", "check_tolerance", "compare", "generate_inputs", "load_inputs", "ort_session", "parse_tolerance", "run_model", "run_session"]
