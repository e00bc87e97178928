import pytest
import zoo
from norm_helpers import check_zoo, cleaned_zoo

from edgec import ir as eir
from edgec.passes.core import DebugCounter, PassContext
from edgec.passes.fuse.fuse_bias_gelu import FuseBiasGeluPass
from edgec.passes.fuse.fuse_gelu import FuseGeluPass
from edgec.testing import assert_numerically_equal, check_pass, graph, output_names, run_pass

MS_HEADER = '<ir_version: 10, opset_import: ["" : 20, "com.microsoft" : 1]>\n'
WEIGHT = ", ".join(f"{(i % 5 - 2) / 10}" for i in range(4 * 8))
BIAS = ", ".join(f"{(i % 3 - 1) / 4}" for i in range(8))
INITS = f"float[4,8] w = {{{WEIGHT}}}, float[8] bias = {{{BIAS}}}, float[1,8] b2 = {{{BIAS}}}, float[1] b1 = {{0.25}}"
SIGNATURE = "g (float[N,3,4] x) => (float[N,3,8] y)"
TANH = '<approximate = "tanh">'


model = graph


def expected_model(signature: str, body: str, inits: str = INITS):
    return graph(signature, body, inits, header=MS_HEADER)


# --- golden ----------------------------------------------------------------------------------

def test_gelu_of_projection_plus_bias_becomes_bias_gelu():
    before = model(SIGNATURE, "p = MatMul(x, w)\n a = Add(p, bias)\n y = Gelu(a)", INITS)
    expected = expected_model(SIGNATURE, "p = MatMul(x, w)\n y = com.microsoft.BiasGelu(p, bias)")
    result = check_pass(FuseBiasGeluPass(), before, expected)
    assert result.stats == {"bias_gelus_fused": 1, "fast_gelus_fused": 0}
    assert result.model.opset_imports["com.microsoft"] == 1
    assert output_names(result.model) == ["y"]


def test_tanh_gelu_becomes_fast_gelu():
    before = model(SIGNATURE, f"p = MatMul(x, w)\n a = Add(bias, p)\n g = Gelu {TANH} (a)\n y = Relu(g)", INITS)
    expected = expected_model(SIGNATURE, "p = MatMul(x, w)\n g = com.microsoft.FastGelu(p, bias)\n y = Relu(g)")
    result = check_pass(FuseBiasGeluPass(), before, expected)
    assert result.stats == {"bias_gelus_fused": 0, "fast_gelus_fused": 1}


def test_any_input_of_the_last_dims_width():
    # The bias need not follow a projection: a graph input of width 8 works the same.
    before = model("g (float[N,8] x) => (float[N,8] y)", "a = Add(x, bias)\n y = Gelu(a)", INITS)
    expected = expected_model("g (float[N,8] x) => (float[N,8] y)", "y = com.microsoft.BiasGelu(x, bias)")
    check_pass(FuseBiasGeluPass(), before, expected)


# --- left alone ---------------------------------------------------------------------------------

@pytest.mark.parametrize("signature, body", [
    (SIGNATURE, "p = MatMul(x, w)\n y = Gelu(p)"),  # no bias
    (SIGNATURE, "p = MatMul(x, w)\n a = Add(p, b2)\n y = Gelu(a)"),  # a [1, 8] bias: not 1-D
    (SIGNATURE, "p = MatMul(x, w)\n a = Add(p, b1)\n y = Gelu(a)"),  # a [1] bias, broadcast
    # a bias that is not constant
    ("g (float[N,3,4] x, float[8] v) => (float[N,3,8] y)", "p = MatMul(x, w)\n a = Add(p, v)\n y = Gelu(a)"),
    ("g (float[N,3,1] x) => (float[N,3,8] y)", "a = Add(x, bias)\n y = Gelu(a)"),  # x is broadcast up to the bias
    # the sum read elsewhere, or returned
    ("g (float[N,3,4] x) => (float[N,3,8] y, float[N,3,8] z)",
     "p = MatMul(x, w)\n a = Add(p, bias)\n y = Gelu(a)\n z = Relu(a)"),
    ("g (float[N,3,4] x) => (float[N,3,8] y, float[N,3,8] a)", "p = MatMul(x, w)\n a = Add(p, bias)\n y = Gelu(a)"),
    (SIGNATURE, "p = MatMul(x, w)\n a = Add(p, bias)\n y = Relu(a)"),  # not a GELU
])
def test_near_misses_left_alone(signature, body):
    result = check_pass(FuseBiasGeluPass(), model(signature, body, INITS))
    assert result.stats == {"bias_gelus_fused": 0, "fast_gelus_fused": 0}
    assert "com.microsoft" not in result.model.opset_imports


# --- debug counter -----------------------------------------------------------------------------------

def test_debug_counter_stops_after_one_rewrite():
    body = "p = MatMul(x, w)\n a = Add(p, bias)\n g = Gelu(a)\n c = Add(g, bias)\n y = Gelu(c)"
    before = model(SIGNATURE, body, INITS)
    result = run_pass(FuseBiasGeluPass(), before, PassContext(counter=DebugCounter({"fuse-bias-gelu": 1})))
    eir.verify(result.model)
    assert result.stats == {"bias_gelus_fused": 1, "fast_gelus_fused": 0}
    assert eir.op_histogram(result.model)["Gelu"] == 1
    assert_numerically_equal(before, result.model)


# --- the model zoo -------------------------------------------------------------------------------------

_ERF = {"bert", "distilbert", "roberta", "vit", "electra", "deit"}


@pytest.mark.parametrize("random_biases", [False, True], ids=["exported", "random-biases"])
@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
@pytest.mark.parametrize("arch", zoo.ARCHS)
def test_zoo(zoo_model, arch, exporter, random_biases):
    model = cleaned_zoo(zoo_model(arch, exporter), random_biases=random_biases)
    result = check_zoo(model, FuseGeluPass(), FuseBiasGeluPass())["fuse-bias-gelu"]
    # One GELU per layer, 2 layers, each after the FFN's up projection. The zoo's biases are zero
    # and cleanup removes Add(x, 0): only given values do they stay to fuse. ALBERT's gelu_new is the
    # tanh form; GPT-2's too, but its Conv1D exports as Gemm, which holds the bias.
    fused = 2 if random_biases else 0
    assert result == {"bias_gelus_fused": fused if arch in _ERF else 0,
                      "fast_gelus_fused": fused if arch == "albert" else 0}
    ops = eir.op_histogram(model)
    assert ops["com.microsoft::BiasGelu"] + ops["com.microsoft::FastGelu"] == sum(result.values())
