import numpy as np
import onnx_ir as ir
import pytest
from quant_helpers import consts

from edgec import ir as eir
from edgec.errors import UserError
from edgec.passes.core import PassContext
from edgec.passes.quantize.smooth_quant import CHANNEL_ABSMAX_KEY, SMOOTH_ALPHAS_KEY, SMOOTH_KEY, SmoothQuantPass, smoothable
from edgec.passes.registry import parse_pipeline
from edgec.testing import assert_numerically_equal, check_pass, graph, run_pass

model = graph

RESIDUAL = "g (float[N,4] x) => (float[N,4] y)"
RESIDUAL_BODY = """
    a = MatMul(x, w1)
    b = MatMul(x, w2)
    s = Add(a, b)
    y = Add(s, x)"""
W1 = np.array([[2.0, -0.5, 0.25, 1.0],
               [0.1, 0.2, -0.3, 0.05],
               [-4.0, 1.0, 0.5, 0.0],
               [0.5, 0.5, -0.5, 0.5]], np.float32)
W2 = np.array([[1.0, 3.0, -1.0, 0.5],
               [0.4, -0.1, 0.1, 0.2],
               [1.0, -1.0, 2.0, 1.0],
               [-2.0, 0.25, 0.5, 0.1]], np.float32)
ABSMAX = np.array([8.0, 0.5, 2.0, 30.0])  # channel 3 is the outlier
ZEROS4 = "{0,0,0,0}"
ZEROS16 = "{0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0}"


def ctx_with(absmax: dict) -> PassContext:
    return PassContext(options={CHANNEL_ABSMAX_KEY: absmax})


def ops(m: ir.Model, op_type: str) -> list[ir.Node]:
    return [n for n in m.graph if n.op_type == op_type]


def const(value: ir.Value | None) -> np.ndarray:
    return value.const_value.numpy()


def smooth_scale(absmax: np.ndarray, *weights: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|x_j|^alpha / max|W_j|^(1-alpha), the weight maximum over every reader's row j."""
    weight_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0).astype(np.float64)
    return np.asarray(absmax, np.float64) ** alpha / weight_max ** (1 - alpha)


def residual() -> ir.Model:
    return consts(model(RESIDUAL, RESIDUAL_BODY, f"float[4,4] w1 = {ZEROS16}, float[4,4] w2 = {ZEROS16}"), w1=W1, w2=W2)


# --- golden -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.5, 0.8, 0.0, 1.0])
def test_matmuls_read_one_scaled_copy_and_the_residual_keeps_x(alpha):
    before = residual()
    assert smoothable(before) == ["x"]
    scale = smooth_scale(ABSMAX, W1, W2, alpha=alpha)
    assert np.all((scale > 1e-4) & (scale < 1e4))  # clear of the clip
    expected = consts(model(RESIDUAL, """
        xs = Mul(x, inverse)
        a = MatMul(xs, w1s)
        b = MatMul(xs, w2s)
        s = Add(a, b)
        y = Add(s, x)""", f"float[4] inverse = {ZEROS4}, float[4,4] w1s = {ZEROS16}, float[4,4] w2s = {ZEROS16}"),
        inverse=(1.0 / scale).astype(np.float32),
        w1s=(W1 * scale[:, None]).astype(np.float32),
        w2s=(W2 * scale[:, None]).astype(np.float32))
    result = check_pass(SmoothQuantPass(alpha=alpha), before, expected, ctx=ctx_with({"x": ABSMAX}))
    assert result.stats == {"activations_smoothed": 1, "weights_scaled": 2,
                            "max_scale": pytest.approx(float(np.max(np.maximum(scale, 1 / scale))))}
    (mul,) = ops(result.model, "Mul")
    assert SMOOTH_KEY in mul.metadata_props
    assert sorted(u.node.op_type for u in mul.outputs[0].uses()) == ["MatMul", "MatMul"]
    # The float weights are replaced, not kept beside their scaled copies.
    assert sorted(const(v).tobytes() for v in result.model.graph.initializers.values()) == sorted(
        const(v).tobytes() for v in expected.graph.initializers.values())
    assert [v.name for v in result.model.graph.outputs] == ["y"]


def test_default_alpha_is_a_half():
    assert SmoothQuantPass().options.alpha == 0.5
    first = run_pass(SmoothQuantPass(), residual(), ctx_with({"x": ABSMAX}))
    second = run_pass(SmoothQuantPass(alpha=0.5), residual(), ctx_with({"x": ABSMAX}))
    assert eir.structure_key(first.model) == eir.structure_key(second.model)


def test_alpha_from_pipeline_text():
    (pass_,) = parse_pipeline("smooth-quant{alpha=0.75}")
    assert isinstance(pass_, SmoothQuantPass) and pass_.options.alpha == 0.75
    assert pass_.spec() == "smooth-quant{alpha=0.75}"


SHARED = "g (float[N,4] x, float[N,4] z) => (float[N,4] y)"  # x and z read one weight


def shared_weight() -> ir.Model:
    return consts(model(SHARED, "a = MatMul(x, w)\n b = MatMul(z, w)\n y = Add(a, b)", f"float[4,4] w = {ZEROS16}"), w=W1.copy())


def x_smoothed(scale: np.ndarray) -> ir.Model:
    """shared_weight() with only x smoothed by `scale`: z keeps reading the original weight."""
    return consts(model(SHARED, """
        xs = Mul(x, inverse)
        a = MatMul(xs, ws)
        b = MatMul(z, w)
        y = Add(a, b)""", f"float[4] inverse = {ZEROS4}, float[4,4] ws = {ZEROS16}, float[4,4] w = {ZEROS16}"),
        inverse=(1.0 / scale).astype(np.float32), ws=(W1 * scale[:, None]).astype(np.float32), w=W1)


def test_weight_shared_with_an_unsmoothed_matmul_is_copied_not_edited():
    before = shared_weight()
    expected = x_smoothed(smooth_scale(ABSMAX, W1, alpha=0.5))
    result = check_pass(SmoothQuantPass(), before, expected, ctx=ctx_with({"x": ABSMAX}))  # z not calibrated
    assert result.stats["weights_scaled"] == 1
    np.testing.assert_array_equal(const(before.graph.initializers["w"]), W1)


def test_each_activation_gets_its_own_scales_for_a_shared_weight():
    before = shared_weight()
    z_absmax = np.array([1.0, 50.0, 0.1, 2.0])
    assert smoothable(before) == ["x", "z"]
    expected = _two_smoothed(ABSMAX, z_absmax)
    result = check_pass(SmoothQuantPass(), before, expected, ctx=ctx_with({"x": ABSMAX, "z": z_absmax}))
    assert result.stats == {"activations_smoothed": 2, "weights_scaled": 2, "max_scale": pytest.approx(
        max(float(np.max(np.maximum(s, 1 / s))) for s in (smooth_scale(ABSMAX, W1, alpha=0.5),
                                                           smooth_scale(z_absmax, W1, alpha=0.5))))}
    assert "w" not in result.model.graph.initializers


def test_measured_alphas_smooth_only_their_activations_each_with_its_own():
    before = shared_weight()
    z_absmax = np.array([1.0, 50.0, 0.1, 2.0])
    absmax = {"x": ABSMAX, "z": z_absmax}
    # Both measured, one chosen: z stays as it is, x gets alpha 0.8 (the pass's own alpha is 0.5).
    expected = x_smoothed(smooth_scale(ABSMAX, W1, alpha=0.8))
    result = check_pass(SmoothQuantPass(), before, expected,
                        ctx=PassContext(options={CHANNEL_ABSMAX_KEY: absmax, SMOOTH_ALPHAS_KEY: {"x": 0.8}}))
    assert result.stats["activations_smoothed"] == 1
    # Two alphas for two activations.
    expected = _two_smoothed(ABSMAX, z_absmax, alphas=(0.3, 0.9))
    check_pass(SmoothQuantPass(), before, expected,
               ctx=PassContext(options={CHANNEL_ABSMAX_KEY: absmax, SMOOTH_ALPHAS_KEY: {"x": 0.3, "z": 0.9}}))
    # An empty choice smooths nothing.
    result = run_pass(SmoothQuantPass(), before, PassContext(options={CHANNEL_ABSMAX_KEY: absmax, SMOOTH_ALPHAS_KEY: {}}))
    assert not result.modified


def _two_smoothed(x_absmax: np.ndarray, z_absmax: np.ndarray, alphas=(0.5, 0.5)) -> ir.Model:
    sx, sz = smooth_scale(x_absmax, W1, alpha=alphas[0]), smooth_scale(z_absmax, W1, alpha=alphas[1])
    return consts(model(SHARED, """
        xs = Mul(x, ix)
        a = MatMul(xs, wx)
        zs = Mul(z, iz)
        b = MatMul(zs, wz)
        y = Add(a, b)""", f"float[4] ix = {ZEROS4}, float[4,4] wx = {ZEROS16}, float[4] iz = {ZEROS4}, float[4,4] wz = {ZEROS16}"),
        ix=(1.0 / sx).astype(np.float32), wx=(W1 * sx[:, None]).astype(np.float32),
        iz=(1.0 / sz).astype(np.float32), wz=(W1 * sz[:, None]).astype(np.float32))


# --- idempotence ----------------------------------------------------------------------------------------

def test_second_run_leaves_the_smoothed_value_alone_even_when_it_was_measured():
    result = run_pass(SmoothQuantPass(), residual(), ctx_with({"x": ABSMAX}))
    (mul,) = ops(result.model, "Mul")
    # Calibration of the smoothed model would measure the Mul's output too: it is still left alone.
    measured = {"x": ABSMAX, mul.outputs[0].name: np.full(4, 100.0)}
    assert smoothable(result.model) == []
    again = SmoothQuantPass()(result.model, ctx_with(measured))
    assert not again.modified and again.stats["activations_smoothed"] == 0
    assert len(ops(result.model, "Mul")) == 1


# --- left alone -------------------------------------------------------------------------------------------

NEAR_MISSES = {
    "weight is an activation": ("g (float[N,4] x, float[4,3] w) => (float[N,3] y)", "y = MatMul(x, w)", ""),
    "x only on the right": ("g (float[3,4] a, float[4,N] x) => (float[3,N] y)", "y = MatMul(a, x)", ""),
    "x on the right of a constant": ("g (float[4,N] x) => (float[3,N] y)", "y = MatMul(c, x)",
                                     "float[3,4] c = {1,2,3,4,5,6,7,8,9,10,11,12}"),
    "1-D weight": ("g (float[N,4] x) => (float[N] y)", "y = MatMul(x, v)", "float[4] v = {1, -2, 3, 0.5}"),
    "int weight": ("g (int32[N,4] x) => (int32[N,3] y)", "y = MatMul(x, w)",
                   "int32[4,3] w = {1,2,3,4,5,6,7,8,9,10,11,12}"),
    "3-D weight": ("g (float[2,N,4] x) => (float[2,N,3] y)", "y = MatMul(x, w)",
                   "float[2,4,3] w = {1,2,3,4,5,6,7,8,9,10,11,12,1,2,3,4,5,6,7,8,9,10,11,12}"),
}


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_near_misses_are_left_alone(name):
    signature, body, inits = NEAR_MISSES[name]
    before = model(signature, body, inits)
    assert smoothable(before) == []
    measured = {v.name: np.full(4, 10.0) for v in before.graph.inputs}
    result = check_pass(SmoothQuantPass(), before, None, ctx=ctx_with(measured))
    assert result.stats["activations_smoothed"] == 0


def test_excluded_matmul_keeps_reading_x():
    before = residual()
    before.graph.node(1).name = "keep"
    scale = smooth_scale(ABSMAX, W1, alpha=0.5)  # only the smoothed reader's weight sets the scale
    expected = consts(model(RESIDUAL, """
        xs = Mul(x, inverse)
        a = MatMul(xs, w1s)
        b = MatMul(x, w2)
        s = Add(a, b)
        y = Add(s, x)""", f"float[4] inverse = {ZEROS4}, float[4,4] w1s = {ZEROS16}, float[4,4] w2 = {ZEROS16}"),
        inverse=(1.0 / scale).astype(np.float32), w1s=(W1 * scale[:, None]).astype(np.float32), w2=W2)
    pass_ = SmoothQuantPass(exclude=("keep",))
    check_pass(pass_, before, expected, ctx=ctx_with({"x": ABSMAX}))
    before.graph.node(0).name = "also"
    assert smoothable(before, SmoothQuantPass(exclude=("keep", "also")).options) == []


@pytest.mark.parametrize("absmax", [{}, {"x": np.array([1.0, 2.0, 3.0])}, {"x": np.array([1.0, np.nan, 1.0, 1.0])}],
                         ids=["not measured", "wrong channel count", "not finite"])
def test_activation_without_usable_maxima_is_left_alone(absmax):
    result = check_pass(SmoothQuantPass(), residual(), None, ctx=ctx_with(absmax))
    assert result.stats["activations_smoothed"] == 0


def test_zero_channel_and_zero_weight_row_keep_scale_one():
    w1, w2 = W1.copy(), W2.copy()
    w1[2], w2[2] = 0.0, 0.0  # row 2 of every reader's weight is zero
    absmax = np.array([0.0, 0.5, 2.0, 30.0])  # channel 0 is always zero
    before = consts(model(RESIDUAL, RESIDUAL_BODY, f"float[4,4] w1 = {ZEROS16}, float[4,4] w2 = {ZEROS16}"), w1=w1, w2=w2)
    result = check_pass(SmoothQuantPass(), before, _smoothed(absmax, w1, w2), ctx=ctx_with({"x": absmax}))
    (mul,) = ops(result.model, "Mul")
    inverse = const(mul.inputs[1])
    assert inverse[0] == 1.0 and inverse[2] == 1.0
    assert np.all(inverse[[1, 3]] != 1.0)
    for matmul, w in zip(ops(result.model, "MatMul"), (w1, w2)):
        np.testing.assert_array_equal(const(matmul.inputs[1])[[0, 2]], w[[0, 2]])


def _smoothed(absmax: np.ndarray, w1: np.ndarray, w2: np.ndarray) -> ir.Model:
    scale = np.ones(4)
    live = [1, 3]
    scale[live] = smooth_scale(absmax[live], w1[live], w2[live], alpha=0.5)
    return consts(model(RESIDUAL, """
        xs = Mul(x, inverse)
        a = MatMul(xs, w1s)
        b = MatMul(xs, w2s)
        s = Add(a, b)
        y = Add(s, x)""", f"float[4] inverse = {ZEROS4}, float[4,4] w1s = {ZEROS16}, float[4,4] w2s = {ZEROS16}"),
        inverse=(1.0 / scale).astype(np.float32),
        w1s=(w1 * scale[:, None]).astype(np.float32), w2s=(w2 * scale[:, None]).astype(np.float32))


def test_extreme_scales_are_clipped():
    absmax = np.array([1e12, 1.0, 1.0, 1e-12])
    result = run_pass(SmoothQuantPass(alpha=1.0), residual(), ctx_with({"x": absmax}))
    (mul,) = ops(result.model, "Mul")
    scale = 1.0 / const(mul.inputs[1]).astype(np.float64)
    np.testing.assert_allclose(scale[[0, 3]], [1e4, 1e-4], rtol=1e-6)
    assert result.stats["max_scale"] == pytest.approx(1e4)


# --- errors ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_alpha_outside_zero_one_is_a_user_error(alpha):
    with pytest.raises(UserError, match="alpha"):
        run_pass(SmoothQuantPass(alpha=alpha), residual(), ctx_with({"x": ABSMAX}))


def test_alpha_outside_zero_one_from_text_is_a_user_error():
    (pass_,) = parse_pipeline("smooth-quant{alpha=2}")
    with pytest.raises(UserError, match="alpha"):
        run_pass(pass_, residual(), ctx_with({"x": ABSMAX}))


def test_missing_channel_maxima_is_a_user_error():
    with pytest.raises(UserError, match="calibration"):
        run_pass(SmoothQuantPass(), residual(), PassContext())


def test_model_without_candidates_needs_no_maxima():
    before = model("g (float[N,4] x) => (float[N,4] y)", "y = Relu(x)")
    result = check_pass(SmoothQuantPass(), before, None)
    assert result.stats["activations_smoothed"] == 0


# --- the point of it --------------------------------------------------------------------------------------

def int8_error(x: np.ndarray, w: np.ndarray, reference: np.ndarray) -> float:
    """Relative error of x @ w with x int8 per-tensor symmetric and w int8 per output channel."""
    x_scale = np.abs(x).max() / 127
    xq = np.clip(np.rint(x / x_scale), -127, 127) * x_scale
    w_scale = np.abs(w).max(axis=0) / 127
    wq = np.clip(np.rint(w / w_scale), -127, 127) * w_scale
    return float(np.linalg.norm(xq @ wq - reference) / np.linalg.norm(reference))


def test_outlier_channel_quantizes_better_after_smoothing():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 16)).astype(np.float32)
    x[:, 5] *= 100  # one channel a hundred times larger than the rest
    w = rng.standard_normal((16, 8)).astype(np.float32)
    before = consts(model("g (float[N,16] x) => (float[N,8] y)", "y = MatMul(x, w)",
                          "float[16,8] w = {" + ",".join(["0"] * 128) + "}"), w=w)
    absmax = np.abs(x).max(axis=0).astype(np.float64)
    result = run_pass(SmoothQuantPass(alpha=0.5), before, ctx_with({"x": absmax}))
    assert_numerically_equal(before, result.model, {"x": x}, rtol=1e-4, atol=1e-3)
    (mul,) = ops(result.model, "Mul")
    (matmul,) = ops(result.model, "MatMul")
    inverse, smoothed_w = const(mul.inputs[1]), const(matmul.inputs[1])
    reference = x.astype(np.float64) @ w.astype(np.float64)
    plain = int8_error(x.astype(np.float64), w.astype(np.float64), reference)
    smooth = int8_error(x.astype(np.float64) * inverse, smoothed_w.astype(np.float64), reference)
    assert smooth < plain / 2, (plain, smooth)
    # The smoothed activation's channels are even: the outlier no longer dominates the range.
    # With alpha 0.5 the channel maxima become sqrt(max|x_j| max|W_j|): the spread about its square root.
    assert spread(x * inverse) < spread(x) / 5


def spread(a: np.ndarray) -> float:
    channel = np.abs(a).max(axis=0)
    return float(channel.max() / channel.min())
