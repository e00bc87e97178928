import numpy as np
import pytest

from edgec.passes.fuse.expand_dequantize import ExpandDequantizePass
from edgec.testing import check_pass, graph, output_names

TABLE = ", ".join(str((i * 29) % 255 - 127) for i in range(6 * 4))
INITS = (f"int8[6,4] t = {{{TABLE}}}, float[4] s = {{0.01, 0.02, 0.005, 0.1}}, float s1 = {{0.01}}, "
         "int8[4] z0 = {0, 0, 0, 0}, int8[4] z1 = {0, 1, 0, 0}, float[6] s6 = {1, 2, 3, 4, 5, 6}")
SIGNATURE = "g (int64[N,S] ids) => (float[N,S,4] y)"


def test_per_column_dequantize_of_gathered_rows_becomes_cast_and_mul():
    before = graph(SIGNATURE, "r = Gather(t, ids)\n y = DequantizeLinear <axis = -1> (r, s)", INITS)
    expected = graph(SIGNATURE, "r = Gather(t, ids)\n c = Cast <to = 1> (r)\n y = Mul(c, s)", INITS)
    ids = {"ids": np.array([[0, 5, 2], [3, 3, 1]], np.int64)}
    result = check_pass(ExpandDequantizePass(), before, expected, feeds=ids)
    assert result.stats == {"dequantizes_expanded": 1}
    assert output_names(result.model) == ["y"]


def test_zero_zero_point_and_positive_axis():
    before = graph(SIGNATURE, "r = Gather(t, ids)\n y = DequantizeLinear <axis = 2> (r, s, z0)", INITS)
    expected = graph(SIGNATURE, "r = Gather(t, ids)\n c = Cast <to = 1> (r)\n y = Mul(c, s)", INITS)
    check_pass(ExpandDequantizePass(), before, expected, feeds={"ids": np.array([[1, 4]], np.int64)})


@pytest.mark.parametrize("body", [
    "r = Gather(t, ids)\n y = DequantizeLinear(r, s1)",  # per-tensor: onnxruntime's kernel is fine
    "r = Gather(t, ids)\n y = DequantizeLinear <axis = -1> (r, s, z1)",  # a nonzero zero point
    "y0 = DequantizeLinear <axis = 1> (t, s)\n y = Gather(y0, ids)",  # a constant: folded or fused by onnxruntime
])
def test_left_alone(body):
    check_pass(ExpandDequantizePass(), graph(SIGNATURE, body, INITS), None, feeds={"ids": np.array([[1, 4]], np.int64)})


def test_axis_other_than_the_last_is_left_alone():
    m = graph("g (int64[S] ids) => (float[6,4] y)", "r = Gather(t, ids)\n y = DequantizeLinear <axis = 0> (r, s6)", INITS)
    check_pass(ExpandDequantizePass(), m, None, feeds={"ids": np.arange(6, dtype=np.int64)})
