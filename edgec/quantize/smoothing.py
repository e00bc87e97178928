"""How much to smooth each activation (SmoothQuant's alpha), chosen by measured error.

One global alpha does not fit a transformer: on all-MiniLM-L6-v2 alpha 0.5 makes int8 worse than no
smoothing at all (embedding cosine 0.971 against 0.990), 0.75 makes it better (0.995). The best
strength differs per activation (LayerNorm outputs, GELU outputs, attention outputs) and per layer.

So each smoothable activation X, read by MatMuls with weights W (concatenated), gets the alpha that
minimises the error of what those MatMuls compute, on rows of X from the calibration data:

    error(alpha) = |Q(X / s) · Q(s · W) - X · W|² / |X · W|²,   s_c = max|X_c|^alpha / max|W_c|^(1-alpha)

with Q the activation scheme's per-tensor fake quantization (its range the min/max of X / s over
every calibration row seen) and int8 symmetric weights per output channel. No smoothing is a
candidate too: an activation that no alpha improves by at least MIN_GAIN is left alone (a smaller
gain on a sample of rows is noise, and the smoothing Mul is not free).

The channel maxima and the ranges are those of every calibration sample, as the calibration that
follows takes its ranges: maxima from some samples leave a channel whose outliers only the others
show unsmoothed, and its outliers then set the smoothed activation's whole range. On
all-MiniLM-L6-v2 calibrated on 1024 news sentences and then 135 movie-review sentences, maxima from
the first 64 samples kept int8 at 0.978 embedding cosine on other movie-review sentences (0.985 with
the reviews first, 0.981 to 0.991 from 64 samples spread over the data), from all of them 0.997.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import onnx_ir as ir

from edgec import ir as eir
from edgec.passes.cleanup._util import constant_array
from edgec.passes.quantize.insert_qdq import SCHEMES, activation_params, quantize_weight
from edgec.passes.quantize.smooth_quant import SmoothQuantOptions, readers, smooth_scale, smoothable
from edgec.quantize.calibrate import batch_size_for, spread
from edgec.verify import ort_session

Progress = Callable[[int, int, str], None]

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)
MIN_GAIN = 0.02  # the least relative error reduction that smooths an activation


@dataclass
class SmoothChoice:
    activation: str
    alpha: float | None  # None: left unsmoothed
    error_before: float  # relative squared error of the readers' outputs without smoothing
    error_after: float  # ... with the chosen alpha (= error_before when None)
    readers: int


@dataclass
class Smoothing:
    choices: list[SmoothChoice]
    channel_absmax: dict[str, np.ndarray]  # per activation: max |x| per channel over the samples
    samples: int
    rows: int  # rows of each activation the errors are measured on

    @property
    def alphas(self) -> dict[str, float]:
        """activation -> alpha, for the activations that are smoothed."""
        return {c.activation: c.alpha for c in self.choices if c.alpha is not None}


class _Rows:
    """Per-channel extremes over every row of one activation, and a seeded sample of its rows."""

    def __init__(self, want: int):
        self.want = want
        self.low: np.ndarray | None = None
        self.high: np.ndarray | None = None
        self.kept: list[np.ndarray] = []

    def add(self, array: np.ndarray, take: int, rng: np.random.Generator) -> None:
        rows = array.reshape(-1, array.shape[-1]).astype(np.float32)
        low, high = rows.min(axis=0), rows.max(axis=0)
        self.low = low if self.low is None else np.minimum(self.low, low)
        self.high = high if self.high is None else np.maximum(self.high, high)
        picked = rng.choice(len(rows), size=min(take, len(rows)), replace=False)
        self.kept.append(rows[np.sort(picked)])

    def sample(self) -> np.ndarray:
        return np.concatenate(self.kept)[: self.want]


def _fake_quantize(x: np.ndarray, low: float, high: float, scheme: str) -> np.ndarray:
    _, qmin, qmax, _ = SCHEMES[scheme]
    scale, zero = activation_params(low, high, scheme)
    scale, zero = float(scale), float(zero)
    return ((np.clip(np.rint(x / scale) + zero, qmin, qmax) - zero) * scale).astype(np.float32)


def _dequantized_weight(w: np.ndarray, per_channel: bool, qmax: int = 127) -> np.ndarray:
    codes, scale = quantize_weight(w, 1 if per_channel else None, qmax)
    return codes.astype(np.float32) * (scale.astype(np.float32)[None, :] if per_channel else np.float32(scale))


def output_error(x: np.ndarray, w: np.ndarray, low: np.ndarray, high: np.ndarray, scale: np.ndarray | None,
                 scheme: str, per_channel: bool = True, weight_qmax: int = 127) -> float:
    """Relative squared error of x·w when x / scale and scale·w are quantized (scale None: no smoothing).

    `low`/`high` are x's per-channel extremes over all the data: the activation range follows from them."""
    reference = x @ w
    if scale is not None:
        x, w, low, high = x / scale, w * scale[:, None], low / scale, high / scale
    got = _fake_quantize(x, float(low.min()), float(high.max()), scheme) @ _dequantized_weight(w, per_channel, weight_qmax)
    return float(((got - reference) ** 2).sum() / max(float((reference ** 2).sum()), np.finfo(np.float32).tiny))


def choose(model: ir.Model, feeds: Mapping[str, np.ndarray], *, scheme: str = "uint8", per_channel: bool = True,
           weight_qmax: int = 127, samples: int | None = None, rows: int = 2048, batch_size: int = 8, alphas: tuple[float, ...] = ALPHAS,
           exclude: tuple[str, ...] = (), progress: Progress | None = None, seed: int = 0) -> Smoothing:
    """The alpha of every smoothable activation of `model`, measured on every sample of `feeds`, or
    on `samples` of them spread over them (`spread`).

    The float model runs once over those samples in batches of `batch_size` (memory: one batch of the
    activations plus `rows` kept rows of each)."""
    report = progress or (lambda done, total, message: None)
    options = SmoothQuantOptions(exclude=exclude)
    names = smoothable(model, options)
    if not names:
        return Smoothing([], {}, 0, 0)
    values = {v.name: v for node in model.graph for v in node.outputs if v.name}
    values.update({v.name: v for v in model.graph.inputs})
    weights = {name: np.concatenate([constant_array(r.inputs[1]).astype(np.float32)
                                     for r in readers(values[name], options)], axis=1) for name in names}
    wanted = {i.name for i in model.graph.inputs if i.name not in model.graph.initializers}
    total = min(len(v) for k, v in feeds.items() if k in wanted)
    picked = spread(total, total if samples is None else samples)
    count = len(picked)
    batch_size = batch_size_for(model.graph.inputs, batch_size, count)
    batches = [(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]

    probe = eir.clone(model)
    probe_values = {v.name: v for node in probe.graph for v in node.outputs if v.name}
    for name in names:
        if name in probe_values and probe_values[name] not in probe.graph.outputs:
            probe.graph.outputs.append(probe_values[name])
    session = ort_session(probe, optimize=False)
    computed = [name for name in names if name not in wanted]
    collected = {name: _Rows(rows) for name in names}
    rng = np.random.default_rng(seed)
    per_batch = -(-rows // len(batches))
    for i, (start, stop) in enumerate(batches):
        report(i, len(batches) + len(names), "choosing smoothing (collecting activations)")
        batch = {k: v[picked[start:stop]] for k, v in feeds.items() if k in wanted}
        arrays = dict(zip(computed, session.run(computed, batch))) if computed else {}
        for name in names:
            collected[name].add(arrays[name] if name in arrays else batch[name], per_batch, rng)

    choices, absmax = [], {}
    for j, name in enumerate(names):
        report(len(batches) + j, len(batches) + len(names), "choosing smoothing (measuring alphas)")
        rows_of, w = collected[name], weights[name]
        x = rows_of.sample()
        absmax[name] = np.maximum(-rows_of.low, rows_of.high).astype(np.float64)
        before = output_error(x, w, rows_of.low, rows_of.high, None, scheme, per_channel, weight_qmax)
        best_alpha, best = None, before
        for alpha in alphas:
            scale = smooth_scale(absmax[name], np.abs(w).max(axis=1), alpha)
            error = output_error(x, w, rows_of.low, rows_of.high, scale.astype(np.float32), scheme, per_channel, weight_qmax)
            if error < best and error < before * (1 - MIN_GAIN):
                best_alpha, best = alpha, error
        choices.append(SmoothChoice(name, best_alpha, before, best, len(readers(values[name], options))))
    report(len(batches) + len(names), len(batches) + len(names), "choosing smoothing")
    return Smoothing(choices, absmax, count, min(len(c.sample()) for c in collected.values()))
