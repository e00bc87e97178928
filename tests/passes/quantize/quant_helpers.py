"""What the quantization pass tests share: arrays as ONNX text, and initializers with exact contents."""

import numpy as np
import onnx_ir as ir


def text(array: np.ndarray) -> str:
    return ", ".join(str(v) for v in array.reshape(-1).tolist())


def consts(m: ir.Model, **arrays: np.ndarray) -> ir.Model:
    """Gives initializers exact contents (ONNX text rounds decimal floats its own way)."""
    for name, array in arrays.items():
        m.graph.initializers[name].const_value = ir.tensor(array)
    return m
