"""Inputs for verification: the user's arrays checked against the graph, or generated ones that make
sense for the model (token ids inside the vocabulary, masks of ones, images in range)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgec.errors import UserError

DEFAULT_BATCH = 2
DEFAULT_SEQUENCE = 16
# Ops that pass token ids through unchanged in value; a lookup behind them still bounds the ids.
_VALUE_PRESERVING = {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Identity", "Flatten", "Expand"}


def graph_inputs(model: ir.Model) -> list[ir.Value]:
    """The inputs a caller must feed (initializers listed as inputs are optional, so excluded)."""
    inits = set(model.graph.initializers)
    return [v for v in model.graph.inputs if v.name not in inits]


def _np_dtype(value: ir.Value) -> np.dtype:
    if value.dtype is None:
        raise UserError(f"graph input {value.name!r} has no element type", "re-export the model with typed inputs")
    return value.dtype.numpy()


def _index_bound(value: ir.Value, depth: int = 0) -> int | None:
    """The size of the table an integer input indexes (a Gather over an initializer), if any."""
    if depth > 4:
        return None
    bounds = []
    for node, index in value.uses():
        if node.op_type == "Gather" and index == 1:
            data = node.inputs[0]
            if data is not None and data.const_value is not None:
                axis = node.attributes.get_int("axis", 0)
                bounds.append(data.const_value.shape[axis])
        elif node.op_type in _VALUE_PRESERVING and index == 0:
            for out in node.outputs:
                b = _index_bound(out, depth + 1)
                if b is not None:
                    bounds.append(b)
    return min(bounds) if bounds else None


def _concrete_shape(value: ir.Value, batch: int, sequence: int, image: int) -> tuple[int, ...]:
    if value.shape is None:
        raise UserError(
            f"graph input {value.name!r} has no shape", "pass --inputs data.npz with arrays for every input"
        )
    dims = []
    rank = len(value.shape)
    for axis, dim in enumerate(value.shape):
        if isinstance(dim, int):
            dims.append(dim)
        elif axis == 0:
            dims.append(batch)
        elif rank == 4 and axis >= 2:
            dims.append(image)
        else:
            dims.append(sequence)
    return tuple(dims)


def generate_inputs(
    model: ir.Model, *, batch: int = DEFAULT_BATCH, sequence: int = DEFAULT_SEQUENCE, image: int = 224, seed: int = 0
) -> dict[str, np.ndarray]:
    """Deterministic inputs that exercise the model the way real data would."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for value in graph_inputs(model):
        dtype = _np_dtype(value)
        shape = _concrete_shape(value, batch, sequence, image)
        lname = value.name.lower()
        if dtype == np.bool_:
            arr = np.ones(shape, dtype=bool)
        elif np.issubdtype(dtype, np.integer):
            if "mask" in lname:
                arr = np.ones(shape, dtype=dtype)
                if len(shape) == 2 and shape[0] > 1 and shape[1] > 2:
                    # Pad the end of the last sample so masking is exercised, not just ones.
                    arr[-1, -(shape[1] // 4) :] = 0
            elif "position" in lname and len(shape) >= 1:
                arr = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
            else:
                bound = _index_bound(value) or 2
                low = 1 if bound > 3 else 0  # id 0 is usually padding; avoid an all-padding row
                arr = rng.integers(low, bound, size=shape).astype(dtype)
        elif np.issubdtype(dtype, np.floating):
            if len(shape) == 4:  # an image batch: normalised pixels
                arr = rng.uniform(-1.0, 1.0, size=shape).astype(dtype)
            elif "mask" in lname:
                arr = np.ones(shape, dtype=dtype)
            else:
                arr = rng.standard_normal(size=shape).astype(dtype)
        else:
            raise UserError(
                f"cannot generate data for input {value.name!r} of type {dtype}", "pass --inputs data.npz"
            )
        feeds[value.name] = arr
    return feeds


def load_inputs(path: str | os.PathLike, model: ir.Model) -> dict[str, np.ndarray]:
    """Reads an .npz keyed by graph input name (batch first; extra keys ignored) and checks it fits."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"inputs file {path} does not exist", "pass an .npz made with numpy.savez")
    try:
        data = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise UserError(f"{path} is not a readable .npz file ({exc})", "write it with numpy.savez(path, name=array)") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise UserError(f"{path} holds one unnamed array, not arrays keyed by input name", "write it with numpy.savez(path, input_ids=..., ...)")
    with data:
        try:
            arrays = {k: data[k] for k in data.files}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise UserError(f"{path} has an unreadable array ({exc})", "write it again with numpy.savez") from None
    return check_inputs(arrays, model, str(path))


def check_inputs(arrays: dict[str, np.ndarray], model: ir.Model, source: str) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {}
    symbols: dict[str, tuple[int, str]] = {}
    for value in graph_inputs(model):
        if value.name not in arrays:
            raise UserError(
                f"{source} has no array named {value.name!r} (it has: {', '.join(sorted(arrays)) or 'nothing'})",
                f"save the inputs keyed by the model's input names: {', '.join(v.name for v in graph_inputs(model))}",
            )
        arr = arrays[value.name]
        want = _np_dtype(value)
        if arr.size == 0:
            raise UserError(f"{source}: {value.name!r} is empty (shape {arr.shape})", "give at least one sample")
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            raise UserError(f"{source}: {value.name!r} contains NaN or inf", "clean the data before compiling")
        if arr.dtype != want:
            arr = _convert(arr, want, f"{source}: {value.name!r}")
        if value.shape is not None:
            if arr.ndim != len(value.shape):
                raise UserError(
                    f"{source}: {value.name!r} has shape {arr.shape}, the model wants rank {len(value.shape)} ({_dims(value.shape)})",
                    "reshape the array (batch first)",
                )
            for axis, (dim, size) in enumerate(zip(value.shape, arr.shape)):
                if isinstance(dim, int) and dim != size:
                    raise UserError(
                        f"{source}: {value.name!r} has shape {arr.shape}, the model wants {_dims(value.shape)} (axis {axis} must be {dim})",
                        "resize the array to the model's fixed dims",
                    )
                if not isinstance(dim, int) and dim.value:
                    seen = symbols.setdefault(dim.value, (size, value.name))
                    if seen[0] != size:
                        raise UserError(
                            f"{source}: dim {dim.value!r} is {size} in {value.name!r} but {seen[0]} in {seen[1]!r}",
                            "make the arrays agree",
                        )
        feeds[value.name] = arr
    return feeds


def _convert(arr: np.ndarray, want: np.dtype, what: str) -> np.ndarray:
    """Same-kind conversion that refuses to change a value (an int64 -1 must not become uint8 255)."""
    integer = np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_
    if np.issubdtype(want, np.integer) and integer:
        info = np.iinfo(want)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise UserError(f"{what} has values outside {want}'s range [{info.min}, {info.max}]", f"save it as {want}")
        return arr.astype(want)
    if np.issubdtype(want, np.floating) and np.issubdtype(arr.dtype, np.floating):
        limit = np.finfo(want).max
        if arr.size and np.max(np.abs(arr)) > limit:
            raise UserError(f"{what} has values beyond {want}'s range", f"scale the data or save it as {want}")
        return arr.astype(want)
    raise UserError(f"{what} is {arr.dtype}, the model wants {want}", f"save it as {want}")


def _dims(shape: ir.Shape) -> str:
    return "x".join(str(d) if isinstance(d, int) else (d.value or "?") for d in shape)
