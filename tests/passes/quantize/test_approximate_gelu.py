import math

import numpy as np
import pytest
from scipy.special import erf

from edgec import ir as eir
from edgec.passes.core import PassContext
from edgec.passes.quantize.approximate_gelu import MAX_STEP_SHARE, TANH_GELU_ERROR, ApproximateGeluPass
from edgec.testing import assert_graph_equal, check_pass, graph, run_pass
from edgec.verify import run_model

SIGNATURE = "g (float[N,8] x) => (float[N,8] y)"
HEADER = '<ir_version: 10, opset_import: ["" : 21]>\n'  # 21: QuantizeLinear to uint16
# Steps of the QuantizeLinears: 0.04 (an int8 FFN-down input, bound/step = 1/84), 0.0008 (0.59:
# too fine), and a 16-bit one (A16W8).
INITS = ("float coarse = {0.04}, uint8 zc = {4}, float fine = {0.0008}, uint8 zf = {34}, "
         "float wide = {0.0002}, uint16 zw = {900}, float[8] m = {1, 0.5, 2, 1.5, 1, 0.25, 1, 0.75}, "
         "float[8] big = {1, 1, 1, 1, 1, 1, 1, 48}")
QUANTIZED = "g0 = Gelu(x)\n q = QuantizeLinear(g0, coarse, zc)\n y = DequantizeLinear(q, coarse, zc)"
SMOOTHED = "g0 = Gelu(x)\n s = Mul(g0, m)\n q = QuantizeLinear(s, coarse, zc)\n y = DequantizeLinear(q, coarse, zc)"


def feeds(rows: int = 512) -> dict[str, np.ndarray]:
    return {"x": (np.random.default_rng(0).standard_normal((rows, 8)) * 3).astype(np.float32)}


def check_approximated(body: str, expected_body: str, header: str = HEADER) -> None:
    """Golden, valid IR, idempotence, and the output within one step (of `coarse`, 0.04) of the exact
    GELU's, with few values moved at all: the rewrite is an approximation, not an identity."""
    before, expected = graph(SIGNATURE, body, INITS, header=header), graph(SIGNATURE, expected_body, INITS, header=header)
    result = run_pass(ApproximateGeluPass(), before)
    assert result.modified and result.stats["gelus_approximated"] == 1
    assert result.stats["max_step_share"] <= MAX_STEP_SHARE
    eir.verify(result.model)
    assert_graph_equal(result.model, expected)
    data = feeds()
    ref, out = run_model(before, data, optimize=False)["y"], run_model(result.model, data, optimize=False)["y"]
    moved = np.abs(out - ref)
    assert moved.max() <= 0.04 * 1.001  # at most one level
    assert np.mean(moved > 0) < 0.02
    assert not ApproximateGeluPass()(result.model, PassContext()).modified


def test_bound_covers_the_difference_of_the_two_forms():
    x = np.linspace(-12.0, 12.0, 2_000_001)
    exact = 0.5 * x * (1 + erf(x / math.sqrt(2)))
    tanh = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    assert np.abs(exact - tanh).max() <= TANH_GELU_ERROR < 1.01 * np.abs(exact - tanh).max()


# --- golden ----------------------------------------------------------------------------------

def test_quantized_gelu_becomes_the_tanh_form():
    check_approximated(QUANTIZED, QUANTIZED.replace("Gelu(x)", 'Gelu <approximate = "tanh"> (x)'))


def test_gelu_read_through_a_smoothing_mul():
    check_approximated(SMOOTHED, SMOOTHED.replace("Gelu(x)", 'Gelu <approximate = "tanh"> (x)'))


def test_onnxruntime_gelu_becomes_fast_gelu():
    header = '<ir_version: 10, opset_import: ["" : 20, "com.microsoft" : 1]>\n'
    body = "g0 = com.microsoft.Gelu(x)\n q = QuantizeLinear(g0, coarse, zc)\n y = DequantizeLinear(q, coarse, zc)"
    check_approximated(body, body.replace("com.microsoft.Gelu", "com.microsoft.FastGelu"), header)


# --- near-misses -----------------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    # a float reader besides the quantized one
    "g0 = Gelu(x)\n q = QuantizeLinear(g0, coarse, zc)\n d = DequantizeLinear(q, coarse, zc)\n y = Add(d, g0)",
    # a step too fine for the bound (0.59 of it)
    "g0 = Gelu(x)\n q = QuantizeLinear(g0, fine, zf)\n y = DequantizeLinear(q, fine, zf)",
    # a 16-bit QuantizeLinear (A16W8)
    "g0 = Gelu(x)\n q = QuantizeLinear(g0, wide, zw)\n y = DequantizeLinear(q, wide, zw)",
    # a Mul whose largest factor (48) makes the bound 0.57 of the step
    "g0 = Gelu(x)\n s = Mul(g0, big)\n q = QuantizeLinear(s, coarse, zc)\n y = DequantizeLinear(q, coarse, zc)",
    # a Mul read in float
    "g0 = Gelu(x)\n s = Mul(g0, m)\n q = QuantizeLinear(s, coarse, zc)\n d = DequantizeLinear(q, coarse, zc)\n"
    " y = Add(d, s)",
    # already the tanh form
    'g0 = Gelu <approximate = "tanh"> (x)\n q = QuantizeLinear(g0, coarse, zc)\n y = DequantizeLinear(q, coarse, zc)',
])
def test_left_alone(body):
    check_pass(ApproximateGeluPass(), graph(SIGNATURE, body, INITS, header=HEADER), None, feeds=feeds(16))


def test_gelu_that_is_a_graph_output_is_left_alone():
    body = "y = Gelu(x)\n q = QuantizeLinear(y, coarse, zc)"
    check_pass(ApproximateGeluPass(), graph("g (float[N,8] x) => (float[N,8] y, uint8[N,8] q)", body, INITS), None,
               feeds=feeds(16))
