"""Calibration for static quantization: run the float model over sample data, collect statistics of
chosen tensors, and turn them into quantization ranges (minmax, percentile, entropy, mse)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import onnx_ir as ir

from edgec import ir as eir
from edgec import verify
from edgec.report import write_npz

METHODS = ("minmax", "percentile", "entropy", "mse")

# Integer grids a range is chosen for: (qmin, qmax). Signed types are quantized symmetrically with
# levels k * t / qmax, k in [-qmax, qmax]; unsigned ones asymmetrically with scale (high - low) / qmax and
# an integer zero point, so 0.0 is always on the grid.
DTYPES: dict[str, tuple[int, int]] = {
    "uint8": (0, 255),
    "int8": (-127, 127),
    "int8-asym": (0, 255),  # int8 with a zero point: ranges chosen as for uint8's 256 levels
    "uint16": (0, 65535),
    "int16": (-32767, 32767),
    "uint4": (0, 15),
    "int4": (-7, 7),
}

FORMAT = "edgec-calibration/1"
# Weight of a uniform distribution over P's support mixed into Q, so that clipping a value into a bin
# Q leaves empty costs a finite (large) divergence instead of an infinite one.
_KL_SMOOTHING = 1e-4
# The MSE search evaluates about this many evenly spaced clipping points, then every point around the best.
_MSE_COARSE = 128

Progress = Callable[[int, int, str], None]


@dataclass(eq=False)
class TensorStats:
    """What calibration saw of one tensor.

    `min`/`max` are over its finite values (0.0 when it had none); `nonfinite` counts NaN and inf
    elements, which no range can represent. `channel_absmax[c]` is max |x| over every element whose
    last index is c (None for scalars, or when the last axis changed size between batches).

    `histogram` counts the signed x over the symmetric `edges` [-A, A]: 2 * bins bins of width w = A / bins,
    A the smallest power of two strictly above max |x| (all edges 0 when x was always 0). Bin bins + j
    holds x in [j*w, (j+1)*w) and bin bins - 1 - j holds x in [-(j+1)*w, -j*w), so folding the two halves
    onto each other gives the histogram of |x| exactly. Growing A by powers of two merges bins exactly,
    which is what lets one streamed pass be deterministic and independent of the batch size.
    """

    name: str
    min: float
    max: float
    channel_absmax: np.ndarray | None
    histogram: np.ndarray
    edges: np.ndarray
    nonfinite: int = 0

    @property
    def bins(self) -> int:
        """Bins per sign: the histogram has 2 * bins."""
        return len(self.histogram) // 2

    def sqnr_db(self, scale: float, zero_point: int, qmin: int, qmax: int) -> float:
        """Signal to quantization noise (dB) of this tensor on the grid scale * (q - zero_point),
        q in [qmin, qmax], rounding and clipping included, estimated at the histogram's bin centres."""
        width = float(self.edges[-1]) / self.bins if self.bins else 0.0
        if width == 0.0 or not self.histogram.any():
            return float("inf")
        centres = (np.arange(2 * self.bins) - self.bins + 0.5) * width
        codes = np.clip(np.rint(centres / scale) + zero_point, qmin, qmax)
        noise = float(self.histogram @ (centres - (codes - zero_point) * scale) ** 2)
        signal = float(self.histogram @ centres**2)
        return float("inf") if noise == 0.0 else 10.0 * float(np.log10(signal / noise))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorStats):
            return NotImplemented
        same_channels = (self.channel_absmax is None) == (other.channel_absmax is None) and (
            self.channel_absmax is None or np.array_equal(self.channel_absmax, other.channel_absmax)
        )
        return (
            (self.name, self.min, self.max, self.nonfinite) == (other.name, other.min, other.max, other.nonfinite)
            and same_channels
            and np.array_equal(self.histogram, other.histogram)
            and np.array_equal(self.edges, other.edges)
        )


@dataclass
class Calibration:
    """Statistics per tensor name, from `samples` samples; `from_cache` says they were read from disk."""

    stats: dict[str, TensorStats]
    samples: int
    from_cache: bool = field(default=False, compare=False)

    def ranges(self, method: str = "minmax", *, dtype: str = "uint8", percentile: float = 99.99) -> dict[str, tuple[float, float]]:
        """(low, high) per tensor, always with low <= 0 <= high; symmetric (signed) dtypes get low == -high.

        A tensor that was always 0 gets (0.0, 0.0): the quantizer has to give it some nonzero scale.
        """
        if method not in METHODS:
            raise ValueError(f"unknown calibration method {method!r}; known: {', '.join(METHODS)}")
        if dtype not in DTYPES:
            raise ValueError(f"unknown quantized type {dtype!r}; known: {', '.join(DTYPES)}")
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], not {percentile}")
        qmin, qmax = DTYPES[dtype]
        return {name: _range(st, method, qmin, qmax, percentile) for name, st in self.stats.items()}

    def save(self, path: str | os.PathLike) -> Path:
        """Writes an .npz atomically (a reader sees the old file or the whole new one)."""
        names = list(self.stats)
        meta = {
            "format": FORMAT,
            "samples": self.samples,
            "tensors": [
                {"name": n, "min": s.min, "max": s.max, "nonfinite": s.nonfinite, "channels": s.channel_absmax is not None}
                for n, s in self.stats.items()
            ],
        }
        arrays = {"meta": np.array(json.dumps(meta))}
        for i, name in enumerate(names):
            st = self.stats[name]
            arrays[f"h{i}"] = st.histogram
            arrays[f"e{i}"] = st.edges
            if st.channel_absmax is not None:
                arrays[f"c{i}"] = st.channel_absmax
        return write_npz(path, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        """Reads what `save` wrote; ValueError when the file is not a calibration of this format."""
        with np.load(Path(path), allow_pickle=False) as data:
            if "meta" not in data.files:
                raise ValueError(f"{path} is not an edgec calibration file")
            meta = json.loads(str(data["meta"]))
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is a calibration of format {meta.get('format')!r}, not {FORMAT!r}")
            stats = {}
            for i, t in enumerate(meta["tensors"]):
                stats[t["name"]] = TensorStats(
                    name=t["name"],
                    min=float(t["min"]),
                    max=float(t["max"]),
                    channel_absmax=data[f"c{i}"] if t["channels"] else None,
                    histogram=data[f"h{i}"],
                    edges=data[f"e{i}"],
                    nonfinite=int(t["nonfinite"]),
                )
        return cls(stats, int(meta["samples"]))


def calibrate(
    model: ir.Model,
    tensors: list[str],
    feeds: Mapping[str, np.ndarray],
    *,
    batch_size: int = 8,
    progress: Progress | None = None,
    cache_dir: Path | None = None,
    bins: int = 2048,
) -> Calibration:
    """Runs `model` (onnxruntime, CPU, unoptimised) over `feeds` in batches along axis 0 and collects
    statistics of `tensors` (value names: activations, graph inputs or initializers).

    One streamed pass; memory is bounded by two batches of the tensors, whatever the number of samples.
    With `cache_dir`, statistics are kept under `<cache_dir>/<key>.npz` and a second call with the same
    model, tensors, data, bins and batch size reads them instead of running the model.
    """
    report = progress or (lambda done, total, message: None)
    if bins < 16 or bins & (bins - 1):
        raise ValueError(f"bins must be a power of two of at least 16, not {bins}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    names = list(dict.fromkeys(tensors))
    graph = model.graph
    produced = {v.name: v for node in graph for v in node.outputs if v.name}
    graph_inputs = {v.name: v for v in graph.inputs if v.name not in graph.initializers}
    unknown = [n for n in names if n not in produced and n not in graph_inputs and n not in graph.initializers]
    if unknown:
        raise ValueError(f"not values of the model's graph: {', '.join(map(repr, unknown))}")

    arrays, samples = _check_feeds(graph_inputs, feeds)
    batch = batch_size_for(graph_inputs.values(), batch_size, samples)

    cache_path = None
    if cache_dir is not None:
        key = _cache_key(model, names, arrays, bins, batch)
        cache_path = Path(cache_dir) / f"{key}.npz"
        cached = _read_cache(cache_path, names)
        if cached is not None:
            report(samples, samples, f"calibration statistics from cache {cache_path.name}")
            return cached

    collectors = {n: _Collector(bins) for n in names}
    for n in names:
        if n not in produced and n not in graph_inputs:
            const = graph.initializers[n].const_value
            if const is None:
                raise ValueError(f"initializer {n!r} has no data")
            collectors[n].add(const.numpy())
    fetch = [n for n in names if n in produced]
    fed = [n for n in names if n in graph_inputs]
    session = _session(model, fetch) if fetch else None

    def run(start: int):
        chunk = {k: v[start : start + batch] for k, v in arrays.items()}
        return chunk, session.run(fetch, chunk) if session is not None else []

    message = f"calibrating {len(names)} tensors"
    report(0, samples, message)
    # The model runs the next batch while this thread reduces the last one (both release the GIL);
    # batches are still reduced one at a time and in order, so the result is the same.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(run, 0)
        for start in range(0, samples, batch):
            chunk, outs = pending.result()
            if start + batch < samples:
                pending = pool.submit(run, start + batch)
            for n, out in zip(fetch, outs):
                collectors[n].add(out)
            for n in fed:
                collectors[n].add(chunk[n])
            report(min(start + batch, samples), samples, message)
    result = Calibration({n: c.stats(n) for n, c in collectors.items()}, samples)
    if cache_path is not None:
        try:
            result.save(cache_path)
        except OSError as exc:
            warnings.warn(f"could not cache calibration statistics in {cache_path.parent} ({exc.strerror})", stacklevel=2)
    return result


def _session(model: ir.Model, fetch: list[str]):
    """An onnxruntime session of a copy of `model` that also outputs the values named in `fetch`."""
    runnable = eir.clone(model)
    values = {v.name: v for node in runnable.graph for v in node.outputs if v.name}
    present = {v.name for v in runnable.graph.outputs}
    runnable.graph.outputs.extend(values[n] for n in fetch if n not in present)
    # Unoptimised, so every intermediate value exists exactly as the graph names it.
    return verify.ort_session(runnable, optimize=False)


# --- collecting --------------------------------------------------------------------------------


class _Collector:
    """Running statistics of one tensor, updated batch by batch."""

    def __init__(self, bins: int):
        self.bins = bins
        self.limit = 0.0  # A: a power of two above every |x| seen, or 0 while every x was 0
        self.histogram = np.zeros(2 * bins, dtype=np.int64)
        self.min = math.inf
        self.max = -math.inf
        self.nonfinite = 0
        self.channels: np.ndarray | None = None
        self.channels_ok = True

    def add(self, array: np.ndarray) -> None:
        x = np.asarray(array)
        if x.dtype == np.float16:
            x = x.astype(np.float32)
        elif x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float64)  # exact for every integer a model feeds
        if x.size == 0:
            return
        rows = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
        # Per-channel extremes first: the global ones follow from them without another pass.
        channel_min, channel_max = rows.min(axis=0), rows.max(axis=0)
        low, high = float(channel_min.min()), float(channel_max.max())
        if not (math.isfinite(low) and math.isfinite(high)):  # a NaN or inf shows in min or max
            finite = np.isfinite(x)
            self.nonfinite += int(x.size - np.count_nonzero(finite))
            rows = np.where(finite, x, 0.0).reshape(rows.shape)
            channel_min, channel_max = rows.min(axis=0), rows.max(axis=0)
            x = x[finite]
            if not x.size:
                self._add_channels(channel_min, channel_max, ndim=np.ndim(array))
                return
            low, high = float(x.min()), float(x.max())
        self._add_channels(channel_min, channel_max, ndim=np.ndim(array))
        self.min, self.max = min(self.min, low), max(self.max, high)
        absmax = max(-low, high)
        if absmax >= self.limit and absmax > 0:
            self._grow(math.ldexp(1.0, math.frexp(absmax)[1]))
        if self.limit == 0.0:
            self.histogram[self.bins] += x.size
            return
        # bins / limit is a power of two, so the product is exact and a value's bin never depends on
        # the limit it was first counted under (growing the limit merges bins exactly). float32 keeps
        # that exactness while the scale is >= 1 (no product underflows) and far from overflowing.
        scale = self.bins / self.limit
        if x.dtype == np.float32 and 1.0 <= scale <= 2.0**100:
            y = x.ravel() * np.float32(scale)
        else:
            y = x.ravel().astype(np.float64) * scale
        np.floor(y, out=y)
        y += self.bins
        self.histogram += np.bincount(y.astype(np.intp), minlength=2 * self.bins)

    def _add_channels(self, channel_min: np.ndarray, channel_max: np.ndarray, ndim: int) -> None:
        if ndim == 0:
            self.channels_ok, self.channels = False, None
        if not self.channels_ok:
            return
        per_channel = np.maximum(-channel_min.astype(np.float64), channel_max)
        if self.channels is None:
            self.channels = per_channel
        elif self.channels.shape != per_channel.shape:
            self.channels_ok, self.channels = False, None
        else:
            np.maximum(self.channels, per_channel, out=self.channels)

    def _grow(self, limit: float) -> None:
        if self.limit > 0.0:
            shift = int(round(math.log2(limit / self.limit)))
            target = ((np.arange(2 * self.bins) - self.bins) >> shift) + self.bins
            merged = np.zeros_like(self.histogram)
            np.add.at(merged, target, self.histogram)
            self.histogram = merged
        self.limit = limit

    def stats(self, name: str) -> TensorStats:
        seen = self.min <= self.max
        edges = (np.arange(2 * self.bins + 1, dtype=np.float64) - self.bins) * (self.limit / self.bins)
        return TensorStats(
            name=name,
            min=self.min if seen else 0.0,
            max=self.max if seen else 0.0,
            channel_absmax=self.channels if self.channels_ok else None,
            histogram=self.histogram.copy(),
            edges=edges,
            nonfinite=self.nonfinite,
        )


def _check_feeds(graph_inputs: Mapping[str, ir.Value], feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    missing = [n for n in graph_inputs if n not in feeds]
    if missing:
        raise ValueError(f"no calibration data for graph input(s) {', '.join(map(repr, missing))}")
    arrays: dict[str, np.ndarray] = {}
    counts = set()
    for name in graph_inputs:
        arr = np.asarray(feeds[name])
        if arr.ndim == 0:
            raise ValueError(f"calibration data for {name!r} is a scalar; samples go along axis 0")
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            raise ValueError(f"calibration data for {name!r} contains NaN or inf")
        arrays[name] = arr
        counts.add(arr.shape[0])
    if len(counts) > 1:
        sizes = ", ".join(f"{n} {a.shape[0]}" for n, a in arrays.items())
        raise ValueError(f"calibration inputs disagree on the number of samples (axis 0): {sizes}")
    samples = counts.pop() if counts else 1
    if samples == 0:
        raise ValueError("calibration data has no samples")
    return arrays, samples


def fixed_batch_sizes(graph_inputs) -> set[int]:
    """The batch sizes the inputs fix (their dim 0, where it is a number)."""
    return {v.shape[0] for v in graph_inputs if v.shape is not None and len(v.shape) and isinstance(v.shape[0], int)}


def batch_size_for(graph_inputs, wanted: int, samples: int) -> int:
    """`wanted`, unless the model fixes its batch dimension; then that (which must divide the samples)."""
    fixed = fixed_batch_sizes(graph_inputs)
    if not fixed:
        return min(wanted, samples)
    if len(fixed) > 1:
        raise ValueError(f"the model's inputs fix different batch sizes ({sorted(fixed)}); calibration cannot batch them")
    batch = fixed.pop()
    if samples % batch:
        raise ValueError(f"the model takes batches of exactly {batch}, but there are {samples} samples")
    return batch


# --- caching -----------------------------------------------------------------------------------


def _cache_key(model: ir.Model, names: list[str], feeds: Mapping[str, np.ndarray], bins: int, batch: int) -> str:
    import onnxruntime

    h = hashlib.sha256()

    def put(*parts) -> None:
        for part in parts:
            data = part if isinstance(part, bytes) else repr(part).encode()
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)

    put(FORMAT, onnxruntime.__version__, bins, batch, names)
    put(_model_digest(model))
    for name in sorted(feeds):
        arr = np.ascontiguousarray(feeds[name])
        put(name, arr.dtype.str, arr.shape, hashlib.sha256(memoryview(arr).cast("B")).digest())
    return h.hexdigest()


def _model_digest(model: ir.Model) -> bytes:
    """sha256 of the serialised graph without its weights, then of every weight's bytes, one at a time
    (a model is never serialised whole with its weights)."""
    h = hashlib.sha256()
    bare = eir.clone(model)
    for name, value in list(bare.graph.initializers.items()):
        tensor = value.const_value
        h.update(name.encode() + b"\0")
        if tensor is not None:
            h.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            h.update(hashlib.sha256(tensor.tobytes()).digest())
        bare.graph.initializers.pop(name)
        value.const_value = None
    h.update(ir.serde.serialize_model(bare).SerializeToString(deterministic=True))
    return h.digest()


def _read_cache(path: Path, names: list[str]) -> Calibration | None:
    if not path.is_file():
        return None
    try:
        cached = Calibration.load(path)
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):  # damaged: recompute
        return None
    if list(cached.stats) != names:
        return None
    cached.from_cache = True
    return cached


# --- ranges ------------------------------------------------------------------------------------


def _range(st: TensorStats, method: str, qmin: int, qmax: int, percentile: float) -> tuple[float, float]:
    low, high = min(st.min, 0.0), max(st.max, 0.0)
    if low == high:
        return (0.0, 0.0)
    bins = st.bins
    width = float(st.edges[-1]) / bins
    positive = st.histogram[bins:]
    negative = st.histogram[bins - 1 :: -1]  # negative[j] counts -x in (j*w, (j+1)*w]
    if qmin < 0:  # symmetric: one threshold on |x|
        absmax = max(-low, high)
        folded = positive + negative
        if method == "minmax":
            t = absmax
        elif method == "percentile":
            t = _quantile(folded, 0.0, width, percentile / 100.0)
        elif method == "entropy":
            t = _kl_bins(folded, qmax + 1) * width
        else:
            t = _mse_symmetric(folded, width, absmax, qmax)
        t = float(min(t, absmax))
        return (-t, t)
    if method == "minmax":
        return (float(low), float(high))
    if method == "percentile":
        frac = percentile / 100.0
        high = min(high, max(0.0, _quantile(st.histogram, -bins * width, width, frac)))
        low = max(low, min(0.0, -_quantile(st.histogram[::-1], -bins * width, width, frac)))
        return (float(low), float(high))
    if method == "entropy":
        # Each side on its own: a one-sided tensor gets every level, a two-sided one about half per side.
        levels = qmax + 1 if low == 0 or high == 0 else (qmax + 1) // 2
        return (float(max(low, -_kl_bins(negative, levels) * width)), float(min(high, _kl_bins(positive, levels) * width)))
    return _mse_asymmetric(st.histogram, width, low, high, qmax)


def _quantile(hist: np.ndarray, start: float, width: float, frac: float) -> float:
    """The x below which `frac` of the counts lie, linear inside a bin; bin k spans start + [k, k+1) * width."""
    cum = np.cumsum(hist)
    total = cum[-1]
    if total == 0:
        return 0.0
    target = frac * total
    k = int(np.searchsorted(cum, target, side="left"))
    k = min(k, len(hist) - 1)
    before = cum[k] - hist[k]
    inside = (target - before) / hist[k] if hist[k] else 1.0
    return float(start + (k + inside) * width)


def _kl_bins(hist: np.ndarray, levels: int) -> int:
    """TensorRT's entropy calibration on a one-sided histogram: how many bins to keep (the threshold is
    that times the bin width) so that the kept bins, with everything beyond folded into the last, lose
    least information (KL divergence) when merged into `levels` quantized bins.

    Every candidate is scored in O(levels) from prefix sums: the merged distribution Q is constant on
    the nonzero bins of each group, so KL = sum p log p - sum over groups of P_group log q_group.
    """
    nonzero = np.flatnonzero(hist)
    if not nonzero.size:
        return 0
    kept = int(nonzero[-1]) + 1
    if kept <= levels:  # every bin already has its own level: nothing to gain by clipping
        return kept
    h = hist[:kept].astype(np.float64)
    total = h.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        hlogh = np.where(h > 0, h * np.log(h), 0.0)
    H = np.concatenate(([0.0], np.cumsum(h)))
    Z = np.concatenate(([0.0], np.cumsum(h > 0)))
    L = np.concatenate(([0.0], np.cumsum(hlogh)))

    best_i, best_kl = kept, math.inf
    candidates = np.arange(levels, kept + 1)
    g = np.arange(levels + 1)
    step = max(1, (1 << 18) // (levels + 1))
    for at in range(0, len(candidates), step):
        i = candidates[at : at + step][:, None]  # bins kept, one candidate per row
        bounds = (g * i + levels - 1) // levels  # group k covers bins [bounds[k], bounds[k+1])
        first, after = bounds[:, :-1], bounds[:, 1:]
        outliers = total - H[i[:, 0]]
        last = h[i[:, 0] - 1] + outliers  # the last kept bin with the clipped counts added
        group_sum = H[after] - H[first]  # Q's mass per group: the kept bins, without the outliers
        group_nz = Z[after] - Z[first]
        group_nz[:, -1] += (h[i[:, 0] - 1] == 0) & (last > 0)
        group_p = group_sum.copy()
        group_p[:, -1] += outliers
        support = Z[i[:, 0] - 1] + (last > 0)
        q_total = H[i[:, 0]]
        with np.errstate(divide="ignore", invalid="ignore"):
            plogp = L[i[:, 0] - 1] + np.where(last > 0, last * np.log(last), 0.0)
            entropy = plogp / total - math.log(total)
            q = (1 - _KL_SMOOTHING) * group_sum / (group_nz * q_total[:, None]) + _KL_SMOOTHING / support[:, None]
            cross = np.where(group_p > 0, group_p * np.log(q), 0.0).sum(axis=1) / total
        kl = np.where(q_total > 0, entropy - cross, np.inf)
        k = int(np.argmin(kl))
        if kl[k] < best_kl:
            best_kl, best_i = float(kl[k]), int(i[k, 0])
    return best_i


def _sq_error(lo: np.ndarray, hi: np.ndarray, step: np.ndarray, edges: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Expected squared error of rounding to multiples of `step`, clipped to the grid points [lo, hi], per
    candidate, over a histogram whose counts are spread uniformly inside their bins.

    With G(x) the integral of the error from 0 to x, a bin [a, b) of n values costs n (G(b) - G(a)) / (b - a):
    linear in G at the bin edges, so the histogram is passed as edges and their coefficients."""
    x, coef = edges
    lo, hi, step = lo[:, None], hi[:, None], step[:, None]
    inside = np.clip(x, lo, hi)
    m = np.rint(inside / step)
    y = inside - m * step
    # Rounding error over whole steps (step^3 / 12 each) and the part step, then the clipped tails.
    g = m * step**3 / 12 + y**3 / 3 + np.maximum(x - hi, 0.0) ** 3 / 3 + np.minimum(x - lo, 0.0) ** 3 / 3
    return (g * coef).sum(axis=1)


def _histogram_edges(hist: np.ndarray, start: float, width: float) -> tuple[np.ndarray, np.ndarray]:
    """The edges of the nonempty bins of `hist` (bin k spans start + [k, k+1) * width) and the
    coefficient of each in `_sq_error`."""
    k = np.flatnonzero(hist)
    where, index = np.unique(np.concatenate((k, k + 1)), return_inverse=True)
    weight = hist[k].astype(np.float64) / width
    coef = np.bincount(index, weights=np.concatenate((-weight, weight)), minlength=len(where))
    return start + where * width, coef


def _search(grid: np.ndarray, cost: Callable[[np.ndarray], np.ndarray]) -> float:
    """The grid point of least cost: a coarse sweep, then every point around its best."""
    if len(grid) <= 2 * _MSE_COARSE:
        return float(grid[int(np.argmin(cost(grid)))])
    stride = -(-len(grid) // _MSE_COARSE)
    coarse = np.unique(np.append(np.arange(0, len(grid), stride), len(grid) - 1))
    best = int(coarse[int(np.argmin(cost(grid[coarse])))])
    fine = np.arange(max(0, best - stride), min(len(grid), best + stride + 1))
    return float(grid[fine[int(np.argmin(cost(grid[fine])))]])


def _edge_grid(limit: float, width: float) -> np.ndarray:
    """Clipping points k * width below `limit`, and `limit` itself (no clipping)."""
    count = int(math.ceil(limit / width))
    return np.unique(np.minimum(np.arange(1, count + 1) * width, limit))


def _mse_symmetric(folded: np.ndarray, width: float, absmax: float, qmax: int) -> float:
    edges = _histogram_edges(folded, 0.0, width)

    def cost(t):
        return _sq_error(-t, t, t / qmax, edges)

    return _search(_edge_grid(absmax, width), cost)


def _mse_asymmetric(hist: np.ndarray, width: float, low: float, high: float, qmax: int) -> tuple[float, float]:
    """One clipping point per side, found by coordinate descent: high, then low, then high again."""
    bins = len(hist) // 2
    edges = _histogram_edges(hist, -bins * width, width)

    def cost(lo, hi):
        step = (hi - lo) / qmax
        zero = np.clip(np.rint(-lo / step), 0, qmax)
        return _sq_error(-zero * step, (qmax - zero) * step, step, edges)

    highs = _edge_grid(high, width) if high > 0 else None
    lows = -_edge_grid(-low, width)[::-1] if low < 0 else None
    for side in ("high", "low", "high"):
        if side == "high" and highs is not None:
            high = _search(highs, lambda hi: cost(np.full_like(hi, low), hi))
        elif side == "low" and lows is not None:
            low = _search(lows, lambda lo: cost(lo, np.full_like(lo, high)))
    return (float(low), float(high))


def spread(total: int, count: int) -> np.ndarray:
    """`count` sample indices of `total` (all of them when there are no more), evenly spaced from the
    first to the last: calibration data often holds several sources in turn, and its first samples
    would be one of them."""
    if count >= total:
        return np.arange(total)
    return np.linspace(0, total - 1, count).round().astype(np.int64)
