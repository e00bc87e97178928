import numpy as np
import pytest

from edgec.passes.fuse.fuse_integer_matmul import FuseIntegerMatmulPass
from edgec.testing import check_pass, graph, output_names

MS_HEADER = '<ir_version: 10, opset_import: ["" : 20, "com.microsoft" : 1]>\n'
# 7-bit codes: on x86 without VNNI the u8s8 kernel (onnxruntime's own QDQ fusion too) saturates 8-bit ones
CODES = ", ".join(str((i * 37) % 127 - 63) for i in range(4 * 3))
INITS = (f"int8[4,3] wq = {{{CODES}}}, float[3] ws = {{0.01, 0.02, 0.005}}, float ws1 = {{0.01}}, "
         "float xs = {0.02}, uint8 xz = {128}, float[3] bias = {0.5, -1.0, 0.25}, float[1,3] bias2 = {0.5, -1.0, 0.25}, "
         "int8[3] wz = {0, 1, 0}")
SIGNATURE = "g (float[N,5,4] x) => (float[N,5,3] y)"
QUANTIZE = "xq = QuantizeLinear(x, xs, xz)\n xd = DequantizeLinear(xq, xs, xz)\n"
WEIGHT = "wd = DequantizeLinear <axis = 1> (wq, ws)\n"


def model(body: str, signature: str = SIGNATURE):
    return graph(signature, body, INITS)


def expected_model(body: str, signature: str = SIGNATURE):
    return graph(signature, body, INITS, header=MS_HEADER)


def test_qdq_matmul_and_its_bias_become_one_integer_matmul():
    before = model(QUANTIZE + WEIGHT + "p = MatMul(xd, wd)\n y = Add(p, bias)")
    expected = expected_model("xq = QuantizeLinear(x, xs, xz)\n"
                              'y = com.microsoft.MatMulIntegerToFloat(xq, wq, xs, ws, xz, "", bias)')
    result = check_pass(FuseIntegerMatmulPass(), before, expected)
    assert result.stats == {"matmuls_fused": 1, "biases_fused": 1}
    assert output_names(result.model) == ["y"]


def test_without_bias_and_with_per_tensor_scale():
    before = model(QUANTIZE + "wd = DequantizeLinear(wq, ws1)\n p = MatMul(xd, wd)\n y = Relu(p)")
    expected = expected_model("xq = QuantizeLinear(x, xs, xz)\n"
                              "p = com.microsoft.MatMulIntegerToFloat(xq, wq, xs, ws1, xz)\n y = Relu(p)")
    result = check_pass(FuseIntegerMatmulPass(), before, expected)
    assert result.stats == {"matmuls_fused": 1, "biases_fused": 0}


def test_shared_activation_pair_stays_for_its_other_reader():
    before = model(QUANTIZE + WEIGHT + "p = MatMul(xd, wd)\n a = Add(p, bias)\n r = ReduceSum <keepdims = 1> (xd)\n"
                   " y = Add(a, r)")
    expected = expected_model(QUANTIZE + 'a = com.microsoft.MatMulIntegerToFloat(xq, wq, xs, ws, xz, "", bias)\n'
                              "r = ReduceSum <keepdims = 1> (xd)\n y = Add(a, r)")
    check_pass(FuseIntegerMatmulPass(), before, expected)


def test_product_read_twice_is_fused_without_its_bias():
    before = model(QUANTIZE + WEIGHT + "p = MatMul(xd, wd)\n a = Add(p, bias)\n y = Add(a, p)")
    expected = expected_model("xq = QuantizeLinear(x, xs, xz)\n"
                              "p = com.microsoft.MatMulIntegerToFloat(xq, wq, xs, ws, xz)\n a = Add(p, bias)\n y = Add(a, p)")
    assert check_pass(FuseIntegerMatmulPass(), before, expected).stats == {"matmuls_fused": 1, "biases_fused": 0}


@pytest.mark.parametrize("signature, body", [
    # two activations (attention): onnxruntime fuses those itself, and there is no bias
    ("g (float[N,5,4] x, float[N,4,3] k) => (float[N,5,3] y)",
     QUANTIZE + "kq = QuantizeLinear(k, xs, xz)\n kd = DequantizeLinear(kq, xs, xz)\n y = MatMul(xd, kd)"),
    # a per-column zero point on the weight
    (SIGNATURE, QUANTIZE + "wd = DequantizeLinear <axis = 1> (wq, ws, wz)\n y = MatMul(xd, wd)"),
    # a float activation: nothing to fuse with
    (SIGNATURE, WEIGHT + "y = MatMul(x, wd)"),
    # a per-row (axis 0) scale is no per-column one
    ("g (float[N,5,3] x) => (float[N,5,3] y)", "xq = QuantizeLinear(x, xs, xz)\n xd = DequantizeLinear(xq, xs, xz)\n"
     "w = DequantizeLinear <axis = 0> (wsq, ws)\n y = MatMul(xd, w)"),
])
def test_left_alone(signature, body):
    inits = INITS + ", int8[3,3] wsq = {" + ", ".join(["1"] * 9) + "}"
    check_pass(FuseIntegerMatmulPass(), graph(signature, body, inits), None)


def test_bias_of_another_shape_stays_an_add():
    before = model(QUANTIZE + WEIGHT + "p = MatMul(xd, wd)\n y = Add(p, bias2)")
    expected = expected_model("xq = QuantizeLinear(x, xs, xz)\n"
                              "p = com.microsoft.MatMulIntegerToFloat(xq, wq, xs, ws, xz)\n y = Add(p, bias2)")
    assert check_pass(FuseIntegerMatmulPass(), before, expected).stats["biases_fused"] == 0


def test_integer_kernel_matches_the_qdq_semantics_in_onnxruntime():
    from edgec.verify import run_model

    before = model(QUANTIZE + WEIGHT + "p = MatMul(xd, wd)\n y = Add(p, bias)")
    after = check_pass(FuseIntegerMatmulPass(), before, expected_model(
        "xq = QuantizeLinear(x, xs, xz)\n" 'y = com.microsoft.MatMulIntegerToFloat(xq, wq, xs, ws, xz, "", bias)')).model
    x = np.random.default_rng(0).uniform(-2.5, 2.5, (4, 5, 4)).astype(np.float32)
    np.testing.assert_allclose(run_model(after, {"x": x})["y"], run_model(before, {"x": x}, optimize=False)["y"],
                               rtol=1e-5, atol=1e-6)
