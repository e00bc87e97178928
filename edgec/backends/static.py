"""Feeds of any batch, and of up to the static sizes, through an artifact compiled for one static shape
(TFLite, TVM): chunks of the artifact's batch, shorter non-batch axes padded with zeros (an attention
mask's 0 marks padding), every output axis of a padded size cropped back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


def run_static(call: Callable[[list[np.ndarray]], list[np.ndarray]], inputs: Sequence[TensorSpec],
               outputs: Sequence[str], feeds: Mapping[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    """Runs `call` (inputs in `inputs` order -> outputs in `outputs` order) on `feeds`."""
    missing = [spec.name for spec in inputs if spec.name not in feeds]
    if missing:
        raise RuntimeError(f"no feed for the input {', '.join(missing)} of {what}")
    arrays = {spec.name: np.asarray(feeds[spec.name]) for spec in inputs}
    if all(arrays[spec.name].shape == spec.shape for spec in inputs):
        return dict(zip(outputs, call([arrays[s.name].astype(s.dtype, copy=False) for s in inputs])))
    batch, total, cropped = _plan(inputs, arrays, what)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
    for start in range(0, total, batch):
        rows = min(batch, total - start)
        padded = []
        for spec in inputs:
            chunk = arrays[spec.name][start:start + rows].astype(spec.dtype, copy=False)
            full = np.zeros(spec.shape, spec.dtype)
            full[tuple(slice(0, n) for n in chunk.shape)] = chunk
            padded.append(full)
        for name, out in zip(outputs, call(padded)):
            parts[name].append(out[:rows])
    merged = {}
    for name, chunks in parts.items():
        out = np.concatenate(chunks, axis=0)
        merged[name] = out[tuple([slice(None)] + [slice(0, cropped.get(n, n)) for n in out.shape[1:]])]
    return merged


def _plan(inputs: Sequence[TensorSpec], arrays: Mapping[str, np.ndarray], what: str) -> tuple[int, int, dict[int, int]]:
    """(the artifact's batch, the feeds' batch, static size -> fed size for every padded axis)."""
    batch = inputs[0].shape[0] if inputs[0].shape else 1
    totals = {a.shape[0] if a.ndim else 1 for a in arrays.values()}
    if len(totals) != 1:
        raise RuntimeError(f"the feeds disagree on the batch size: {sorted(totals)}")
    cropped: dict[int, int] = {}
    for spec in inputs:
        fed = arrays[spec.name].shape
        if len(spec.shape) != len(fed) or any(f > s for f, s in zip(fed[1:], spec.shape[1:])):
            raise RuntimeError(
                f"input {spec.name!r} of shape {'x'.join(map(str, fed))} does not fit the static shape "
                f"{'x'.join(map(str, spec.shape))} of {what} (batch excepted): compile with larger --shape")
        for f, s in zip(fed[1:], spec.shape[1:]):
            if f < s:
                cropped[s] = f
    return batch, totals.pop(), cropped
