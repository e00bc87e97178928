import logging

import onnx_ir as ir
import pytest
import zoo
from norm_helpers import BETA, CONSTANTS, GAMMA, W, check_zoo, cleaned_zoo, decomposed

from edgec import ir as eir
from edgec.passes.core import DebugCounter, PassContext
from edgec.passes.fuse.fuse_layer_norm import FuseLayerNormPass
from edgec.passes.fuse.fuse_skip_norm import FuseSkipNormPass
from edgec.testing import assert_numerically_equal, check_pass, graph, output_names, run_pass

MS_HEADER = '<ir_version: 10, opset_import: ["" : 20, "com.microsoft" : 1]>\n'
WEIGHT = ", ".join(f"{(i % 5 - 2) / 10}" for i in range(W * W))
BIAS = ", ".join(f"{(i % 3 - 1) / 4}" for i in range(W))
WEIGHTS = f"float[{W}] gamma = {{{GAMMA}}}, float[{W}] beta = {{{BETA}}}"
INITS = f"{WEIGHTS}, float[{W},{W}] w = {{{WEIGHT}}}, float[{W}] bias = {{{BIAS}}}"
SIGNATURE = f"g (float[N,4,{W}] h, float[N,4,{W}] r) => (float[N,4,{W}] y)"
LN = "LayerNormalization <axis = -1, epsilon: float = 1e-5>"
SKIP = "com.microsoft.SkipLayerNormalization <epsilon: float = 1e-5>"
SIMPLIFIED = "com.microsoft.SkipSimplifiedLayerNormalization <epsilon: float = 1e-5>"


def rms(x: str = "s", y: str = "y", weight: bool = True) -> str:
    """x / sqrt(mean(x^2) + eps) * gamma, as Llama's exports write RMSNorm."""
    normalized = "n" if weight else y
    body = f"""
    sq = Mul({x}, {x})
    var = ReduceMean(sq, last)
    ve = Add(eps, var)
    sd = Sqrt(ve)
    rs = Reciprocal(sd)
    {normalized} = Mul({x}, rs)
"""
    return body + (f"    {y} = Mul(gamma, n)\n" if weight else "")


model = graph


def expected_model(signature: str, body: str, inits: str = "") -> ir.Model:
    return graph(signature, body, inits, header=MS_HEADER)


def stats(layer_norms: int = 0, rms_norms: int = 0, folded: int = 0, reused: int = 0) -> dict[str, int]:
    return {"skip_layer_norms": layer_norms, "skip_rms_norms": rms_norms, "biases_folded": folded,
            "sums_reused": reused, "unproven": 0}


# --- golden: LayerNorm ----------------------------------------------------------------------------

def test_residual_add_and_layer_norm_become_one_op():
    before = model(SIGNATURE, f"s = Add(h, r)\n y = {LN} (s, gamma, beta)", WEIGHTS)
    expected = expected_model(SIGNATURE, f"y = {SKIP} (h, r, gamma, beta)", WEIGHTS)
    result = check_pass(FuseSkipNormPass(), before, expected)
    assert result.stats == stats(layer_norms=1)
    assert result.model.opset_imports["com.microsoft"] == 1
    assert output_names(result.model) == ["y"]


def test_last_axis_spelled_positive_and_no_beta():
    before = model(SIGNATURE, "s = Add(h, r)\n y = LayerNormalization <axis = 2> (s, gamma)", WEIGHTS)
    expected = expected_model(SIGNATURE, f"y = {SKIP} (h, r, gamma)", WEIGHTS)
    check_pass(FuseSkipNormPass(), before, expected)


def test_weight_computed_after_the_add_moves_before_the_op():
    # The fused op stands where the Add stood; a Constant gamma written later moves up with it.
    constant = f"gamma = Constant <value = float[{W}] {{{GAMMA}}}> ()"
    body = f"s = Add(h, r)\n {constant}\n n = {LN} (s, gamma, beta)\n t = Add(s, n)\n y = Relu(t)"
    expected = f"{constant}\n n, , , s = {SKIP} (h, r, gamma, beta)\n t = Add(s, n)\n y = Relu(t)"
    before = model(SIGNATURE, body, f"float[{W}] beta = {{{BETA}}}")
    check_pass(FuseSkipNormPass(), before, expected_model(SIGNATURE, expected, f"float[{W}] beta = {{{BETA}}}"))


@pytest.mark.parametrize("bias_add, residual_add", [
    ("pb = Add(p, bias)", "s = Add(pb, r)"),
    ("pb = Add(bias, p)", "s = Add(r, pb)"),
])
def test_projection_bias_folds_into_the_op(bias_add, residual_add):
    before = model(SIGNATURE, f"p = MatMul(h, w)\n {bias_add}\n {residual_add}\n y = {LN} (s, gamma, beta)", INITS)
    expected = expected_model(SIGNATURE, f"p = MatMul(h, w)\n y = {SKIP} (p, r, gamma, beta, bias)", INITS)
    result = check_pass(FuseSkipNormPass(), before, expected)
    assert result.stats == stats(layer_norms=1, folded=1)


def test_bias_folds_without_beta():
    before = model(SIGNATURE, f"p = MatMul(h, w)\n pb = Add(p, bias)\n s = Add(pb, r)\n y = {LN} (s, gamma)", INITS)
    expected = expected_model(SIGNATURE, f"p = MatMul(h, w)\n y = {SKIP} (p, r, gamma, , bias)", INITS)
    check_pass(FuseSkipNormPass(), before, expected)


def test_sum_read_by_the_next_residual_comes_from_the_op():
    # Pre-norm (GPT-2, ViT): the sum is normalized for the next branch and added to its result.
    body = f"s = Add(h, r)\n n = {LN} (s, gamma, beta)\n f = MatMul(n, w)\n y = Add(s, f)"
    expected = f"n, , , s = {SKIP} (h, r, gamma, beta)\n f = MatMul(n, w)\n y = Add(s, f)"
    result = check_pass(FuseSkipNormPass(), model(SIGNATURE, body, INITS), expected_model(SIGNATURE, expected, INITS))
    assert result.stats == stats(layer_norms=1, reused=1)
    (fused,) = [n for n in result.model.graph if n.op_type == "SkipLayerNormalization"]
    assert [v.name for v in fused.outputs[1:3]] == ["", ""]  # mean and 1/std are left out


def test_chain_of_residual_norms():
    body = f"""
    s = Add(h, r)
    n = {LN} (s, gamma, beta)
    p = MatMul(n, w)
    pb = Add(p, bias)
    t = Add(s, pb)
    y = {LN} (t, gamma, beta)
"""
    expected = f"""
    n, , , s = {SKIP} (h, r, gamma, beta)
    p = MatMul(n, w)
    y = {SKIP} (p, s, gamma, beta, bias)
"""
    result = check_pass(FuseSkipNormPass(), model(SIGNATURE, body, INITS), expected_model(SIGNATURE, expected, INITS))
    assert result.stats == stats(layer_norms=2, folded=1, reused=1)


def test_bias_read_elsewhere_is_not_folded():
    signature = f"g (float[N,4,{W}] h, float[N,4,{W}] r) => (float[N,4,{W}] y, float[N,4,{W}] z)"
    body = f"p = MatMul(h, w)\n pb = Add(p, bias)\n z = Relu(pb)\n s = Add(pb, r)\n y = {LN} (s, gamma, beta)"
    expected = f"p = MatMul(h, w)\n pb = Add(p, bias)\n z = Relu(pb)\n y = {SKIP} (pb, r, gamma, beta)"
    result = check_pass(FuseSkipNormPass(), model(signature, body, INITS), expected_model(signature, expected, INITS))
    assert result.stats == stats(layer_norms=1)


@pytest.mark.parametrize("product, bias", [
    ("p = Relu(h)", "bias"),  # not a projection
    ("p = MatMul(h, w)", "b2"),  # a [1, W] bias: not the op's 1-D one
])
def test_other_adds_are_not_folded(product, bias):
    inits = f"{INITS}, float[1,{W}] b2 = {{{BIAS}}}"
    body = f"{product}\n pb = Add(p, {bias})\n s = Add(pb, r)\n y = {LN} (s, gamma, beta)"
    expected = f"{product}\n pb = Add(p, {bias})\n y = {SKIP} (pb, r, gamma, beta)"
    check_pass(FuseSkipNormPass(), model(SIGNATURE, body, inits), expected_model(SIGNATURE, expected, inits))


# --- golden: RMSNorm ------------------------------------------------------------------------------

RMS_INITS = f"{INITS}, {CONSTANTS}"


def test_residual_add_and_rms_norm_become_one_op():
    before = model(SIGNATURE, "s = Add(h, r)" + rms(), RMS_INITS)
    expected = expected_model(SIGNATURE, f"y = {SIMPLIFIED} (h, r, gamma)", INITS)
    result = check_pass(FuseSkipNormPass(), before, expected)
    assert result.stats == stats(rms_norms=1)


def test_rms_norm_with_folded_bias_and_reused_sum():
    # Llama's layers end in residual Adds read by the next norm and the next residual.
    body = "p = MatMul(h, w)\n pb = Add(p, bias)\n s = Add(r, pb)" + rms(y="o") + " f = MatMul(o, w)\n y = Add(s, f)"
    expected = f"p = MatMul(h, w)\n o, , , s = {SIMPLIFIED} (p, r, gamma, bias)\n f = MatMul(o, w)\n y = Add(s, f)"
    before = model(SIGNATURE, body, RMS_INITS)
    result = check_pass(FuseSkipNormPass(), before, expected_model(SIGNATURE, expected, INITS))
    assert result.stats == stats(rms_norms=1, folded=1, reused=1)


def test_rms_norm_without_weight_gets_ones():
    ones = f"float[{W}] ones = {{{', '.join(['1'] * W)}}}"
    before = model(SIGNATURE, "s = Add(h, r)" + rms(weight=False), RMS_INITS)
    check_pass(FuseSkipNormPass(), before, expected_model(SIGNATURE, f"y = {SIMPLIFIED} (h, r, ones)", ones))


# --- left alone ---------------------------------------------------------------------------------

def signature_of(inputs: str = f"float[N,4,{W}]", skip: str | None = None, extra: str = "") -> str:
    return f"g ({inputs} h, {skip or inputs} r) => ({inputs} y{extra})"


RESIDUAL = f"s = Add(h, r)\n y = {LN} (s, gamma, beta)"


@pytest.mark.parametrize("signature, body, inits, reason", [
    (SIGNATURE, "s = Add(h, r)\n y = LayerNormalization <axis = 1> (s, g2)",
     f"float[4,{W}] g2 = {{{', '.join(['1.5'] * 4 * W)}}}", "it normalizes from axis 1, not the last"),
    (SIGNATURE, f"s = Add(h, bias)\n y = {LN} (s, gamma, beta)", INITS, "the Add broadcasts: it is not a residual"),
    # position embeddings broadcast over the batch
    (signature_of(skip=f"float[1,4,{W}]"), RESIDUAL, WEIGHTS, "the Add broadcasts: it is not a residual"),
    (signature_of(f"double[N,4,{W}]"), RESIDUAL, f"double[{W}] gamma = {{{GAMMA}}}, double[{W}] beta = {{{BETA}}}",
     "the fused ops do not take DOUBLE"),
    (signature_of(f"float[N,2,4,{W}]"), RESIDUAL, WEIGHTS, "its input has rank 4, not 2 or 3"),
    (signature_of(extra=f", float[N,4,{W}] s"), RESIDUAL, WEIGHTS, "the residual sum is a graph output"),
    (signature_of(extra=", float[N,4,1] mu"), RESIDUAL.replace("y =", "y, mu ="), WEIGHTS,
     "its mean or inverse standard deviation is read"),
    (SIGNATURE, RESIDUAL.replace("Add(h, r)", "Mul(h, r)"), WEIGHTS, "its input is not an Add"),
    (SIGNATURE, "s = Add(h, r)" + rms(y="t") + " y = Add(t, beta)", RMS_INITS,
     "an RMSNorm with a bias has no fused op"),
    # a decomposed LayerNorm is fuse-layer-norm's to fuse first
    (SIGNATURE, "x = Add(h, r)" + decomposed(), f"{WEIGHTS}, {CONSTANTS}", None),
])
def test_near_misses_left_alone(caplog, signature, body, inits, reason):
    with caplog.at_level(logging.DEBUG, logger="edgec.passes.fuse.fuse_skip_norm"):
        result = check_pass(FuseSkipNormPass(), model(signature, body, inits))
    assert result.stats == stats()
    reasons = {r.getMessage().partition("left alone: ")[2] for r in caplog.records}
    assert reasons == ({reason} if reason else set())


# --- debug counter -----------------------------------------------------------------------------------

def test_debug_counter_stops_after_one_rewrite():
    body = f"s = Add(h, r)\n n = {LN} (s, gamma, beta)\n t = Add(n, h)\n y = {LN} (t, gamma, beta)"
    before = model(SIGNATURE, body, WEIGHTS)
    result = run_pass(FuseSkipNormPass(), before, PassContext(counter=DebugCounter({"fuse-skip-norm": 1})))
    eir.verify(result.model)
    assert result.stats == stats(layer_norms=1)
    assert eir.op_histogram(result.model)["LayerNormalization"] == 1
    assert_numerically_equal(before, result.model)


def test_opset_header_is_only_extended_when_fused():
    before = model(SIGNATURE, f"s = Mul(h, r)\n y = {LN} (s, gamma, beta)", WEIGHTS)
    assert "com.microsoft" not in run_pass(FuseSkipNormPass(), before).model.opset_imports


# --- the model zoo -------------------------------------------------------------------------------------

# Norms fused per arch, the same for both exporters. Post-norm encoders (BERT, DistilBERT, ALBERT,
# ELECTRA) fuse their 2 norms per layer; the embedding norm reads position embeddings of shape
# [1, S, H], broadcast over the batch: not a residual. RoBERTa computes position ids from input_ids,
# so its embedding sum is [B, S, H] and fuses too. Pre-norm models (GPT-2, ViT, DeiT, Llama) fuse all
# but the first layer's first norm, which reads the embeddings; every fused sum but the final norm's
# feeds the next residual. MobileViT has 9 transformer layers in 3 stages (2, 4, 3 layers), each stage
# pre-norm with a final norm: 2 norms per layer, less each stage's first, plus each stage's last.
SKIP_LAYER_NORMS = {"bert": 4, "distilbert": 4, "roberta": 5, "gpt2": 4, "vit": 4, "deit": 4, "albert": 4,
                    "electra": 4, "mobilevit": 18}
SKIP_RMS_NORMS = {"llama": 4}
SUMS_REUSED = {"gpt2": 3, "vit": 3, "deit": 3, "llama": 3, "mobilevit": 15}
# With non-zero biases, each fused norm after a layer's output projection (attention or FFN) folds
# its bias: not RoBERTa's embedding norm, nor GPT-2's (its Conv1D exports as Gemm, which holds the
# bias), nor Llama's (no biases).
BIASES_FOLDED = {"bert": 4, "distilbert": 4, "roberta": 4, "vit": 4, "deit": 4, "albert": 4, "electra": 4,
                 "mobilevit": 18}


@pytest.mark.parametrize("random_biases", [False, True], ids=["exported", "random-biases"])
@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
@pytest.mark.parametrize("arch", zoo.ARCHS)
def test_zoo(zoo_model, arch, exporter, random_biases):
    model = cleaned_zoo(zoo_model(arch, exporter), random_biases=random_biases)
    result = check_zoo(model, FuseLayerNormPass(), FuseSkipNormPass())["fuse-skip-norm"]
    layer_norms, rms_norms = SKIP_LAYER_NORMS.get(arch, 0), SKIP_RMS_NORMS.get(arch, 0)
    # The zoo's biases are zero and cleanup removes Add(x, 0): only given values do they stay to fold.
    folded = BIASES_FOLDED.get(arch, 0) if random_biases else 0
    assert result == stats(layer_norms, rms_norms, folded, SUMS_REUSED.get(arch, 0))
    ops = eir.op_histogram(model)
    assert ops["com.microsoft::SkipLayerNormalization"] == layer_norms
    assert ops["com.microsoft::SkipSimplifiedLayerNormalization"] == rms_norms
