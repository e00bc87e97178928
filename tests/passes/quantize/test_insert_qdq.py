import numpy as np
import onnx
import onnx_ir as ir
import pytest
from quant_helpers import consts, text

from edgec import ir as eir
from edgec.errors import UserError
from edgec.passes.core import DebugCounter, PassContext
from edgec.passes.quantize.insert_qdq import InsertQdqOptions, InsertQdqPass, near_misses, quantizable_activations
from edgec.testing import assert_graph_equal, check_pass, graph, run_pass
from edgec.verify import run_model

model = graph

MLP = "g (float[N,4] x) => (float[N,3] y)"
W = np.array([[1.27, -2.54, 0.635],
              [0.5, 1.0, -0.25],
              [-0.01, 0.02, 0.005],
              [0.0, -1.0, 0.3]], np.float32)


def ctx_with(ranges: dict) -> PassContext:
    return PassContext(options={"activation_ranges": ranges})


def quantize(before: ir.Model, ranges: dict, expected: ir.Model | None = None, **options):
    """insert-qdq on a clone: valid IR, the golden graph when given, and a second run changes nothing."""
    pass_ = InsertQdqPass(**options)
    result = run_pass(pass_, before, ctx_with(ranges))
    eir.verify(result.model)
    assert result.modified
    if expected is not None:
        assert_graph_equal(result.model, expected)
    again = pass_(result.model, ctx_with(ranges))
    assert not again.modified, "insert-qdq is not idempotent"
    return result


def ops(m: ir.Model, op_type: str) -> list[ir.Node]:
    return [n for n in m.graph if n.op_type == op_type]


def const(value: ir.Value | None) -> np.ndarray:
    return value.const_value.numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def exposed_ranges(m: ir.Model, names: list[str], feeds: dict) -> dict[str, tuple[float, float]]:
    """Calibration in small: min and max of every named tensor over `feeds`, by onnxruntime."""
    import onnxruntime as ort

    proto = eir.to_proto(m)
    known = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names if n not in known)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    outs = session.run(names, {k: v for k, v in feeds.items() if k in wanted})
    return {n: (float(o.min()), float(o.max())) for n, o in zip(names, outs)}


# --- golden -----------------------------------------------------------------------------------------

def test_matmul_gets_int8_weight_and_activation_pair():
    before = model(MLP, "y = MatMul(x, w)", f"float[4,3] w = {{{text(W)}}}")
    scales = np.array([1.27, 2.54, 0.635], np.float32) / np.float32(127)  # max |column| / 127
    codes = np.array([[127, -127, 127],
                      [50, 50, -50],
                      [-1, 1, 1],
                      [0, -50, 60]], np.int8)
    assert np.array_equal(codes, np.rint(W / scales).astype(np.int8))
    x_scale = np.float32(4.0 / 255)  # range [-1, 3]: 4 over 255 steps, 0 at step 64 (63.75 rounded)
    expected = consts(model(MLP, """
        xq = QuantizeLinear(x, xs, xz)
        xd = DequantizeLinear(xq, xs, xz)
        wd = DequantizeLinear <axis = 1> (wq, ws)
        y = MatMul(xd, wd)""", "float xs = {0.0}, uint8 xz = {64}, int8[4,3] wq = {0,0,0,0,0,0,0,0,0,0,0,0}, float[3] ws = {0,0,0}"),
        xs=x_scale, wq=codes, ws=scales)
    result = quantize(before, {"x": (-1.0, 3.0)}, expected)
    assert result.stats == {"ops_quantized": 1, "weights_quantized": 1, "activations_quantized": 1,
                            "attention_matmuls": 0, "embeddings_quantized": 0, "outputs_quantized": 0, "ops_int16": 0,
                            "ops_fp16": 0, "weight_bytes_saved": 48 - 12 - 12}


def test_gather_from_constant_table_dequantizes_the_rows():
    table = np.array([[1.27, 0.1, -0.5, 0.0],
                      [-0.635, 0.2, 0.25, 0.0],
                      [0.0, -0.254, 0.127, 0.0]], np.float32)
    before = model("g (int64[B,S] ids) => (float[B,S,4] y)", "y = Gather(t, ids)", f"float[3,4] t = {{{text(table)}}}")
    scales = np.array([1.27, 0.254, 0.5, 127], np.float32) / np.float32(127)
    scales[3] = 1.0  # an all-zero column gets scale 1, never 0
    codes = np.array([[127, 50, -127, 0], [-64, 100, 64, 0], [0, -127, 32, 0]], np.int8)
    assert np.array_equal(codes, np.rint(table / scales).astype(np.int8))
    expected = consts(model("g (int64[B,S] ids) => (float[B,S,4] y)", """
        r = Gather(tq, ids)
        y = DequantizeLinear <axis = 2> (r, ts)""", "int8[3,4] tq = {0,0,0,0,0,0,0,0,0,0,0,0}, float[4] ts = {0,0,0,0}"),
        tq=codes, ts=scales)
    result = quantize(before, {}, expected)
    assert result.stats["embeddings_quantized"] == 1 and result.stats["weights_quantized"] == 1
    assert result.stats["weight_bytes_saved"] == 48 - 12 - 16
    assert [v.name for v in result.model.graph.outputs] == ["y"]
    ids = np.array([[0, 2, 1], [1, 1, 0]], np.int64)
    out = run_model(result.model, {"ids": ids})["y"]
    np.testing.assert_allclose(out, table[ids], atol=float(scales[:3].max()) / 2 + 1e-7)


# --- what gets quantized how ----------------------------------------------------------------------------

@pytest.mark.parametrize("op, weight_shape, axis", [
    ("y = MatMul(x, w)", (4, 3), 1),
    ("y = Gemm <transB = 1> (x, w, b)", (3, 4), 0),
    ("y = Gemm(x, w, b)", (4, 3), 1),
])
def test_per_channel_axis_is_the_output_channel(op, weight_shape, axis):
    w = np.random.default_rng(0).standard_normal(weight_shape).astype(np.float32)
    before = model(MLP, op, f"float[{weight_shape[0]},{weight_shape[1]}] w = {{{text(w)}}}, float[3] b = {{0.5, -0.5, 1.0}}")
    result = quantize(before, {"x": (-2.0, 2.0)})
    (dq,) = [n for n in ops(result.model, "DequantizeLinear") if n.inputs[0].dtype == ir.DataType.INT8]
    assert dq.attributes.get_int("axis") == axis
    scale = const(dq.inputs[1])
    np.testing.assert_array_equal(scale, np.abs(w).max(axis=1 - axis) / np.float32(127))
    (node,) = ops(result.model, op.split()[2].split("(")[0])
    if node.op_type == "Gemm":
        assert node.inputs[2].is_initializer() and node.inputs[2].dtype == ir.DataType.FLOAT  # bias stays float
    x = np.random.default_rng(1).uniform(-2, 2, (5, 4)).astype(np.float32)
    assert cosine(run_model(result.model, {"x": x})["y"], run_model(before, {"x": x})["y"]) > 0.999


def test_per_tensor_weights_have_one_scale_and_no_axis():
    before = model(MLP, "y = MatMul(x, w)", f"float[4,3] w = {{{text(W)}}}")
    result = quantize(before, {"x": (-1.0, 3.0)}, per_channel=False)
    dq = ops(result.model, "DequantizeLinear")[-1]
    assert "axis" not in dq.attributes
    assert const(dq.inputs[1]).shape == () and const(dq.inputs[1]) == np.float32(2.54) / np.float32(127)


def test_conv_weight_is_per_output_channel():
    w = np.random.default_rng(0).standard_normal((6, 3, 3, 3)).astype(np.float32)
    before = model("g (float[1,3,8,8] x) => (float[1,6,6,6] y)", "y = Conv(x, w, b)",
                   f"float[6,3,3,3] w = {{{text(w)}}}, float[6] b = {{1, 2, 3, 4, 5, 6}}")
    result = quantize(before, {"x": (-1.0, 1.0)})
    dq = ops(result.model, "DequantizeLinear")[-1]
    assert dq.attributes.get_int("axis") == 0 and const(dq.inputs[1]).shape == (6,)
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32)
    assert cosine(run_model(result.model, {"x": x})["y"], run_model(before, {"x": x})["y"]) > 0.999


def test_three_readers_share_one_pair():
    rng = np.random.default_rng(0)
    ws = {k: rng.standard_normal((4, 4)).astype(np.float32) for k in "qkv"}
    before = model("g (float[N,4] x) => (float[N,4] y)", """
        q = MatMul(x, wq)
        k = MatMul(x, wk)
        v = MatMul(x, wv)
        s = Sum(q, k, v)
        y = Add(s, x)""", ", ".join(f"float[4,4] w{k} = {{{text(w)}}}" for k, w in ws.items()))
    assert quantizable_activations(before, InsertQdqOptions()) == ["x"]
    result = quantize(before, {"x": (-3.0, 3.0)})
    assert result.stats["activations_quantized"] == 1 and result.stats["ops_quantized"] == 3
    (q,) = ops(result.model, "QuantizeLinear")
    dq = q.outputs[0].uses()[0].node
    assert sorted(u.node.op_type for u in dq.outputs[0].uses()) == ["MatMul"] * 3
    (add,) = ops(result.model, "Add")
    assert add.inputs[1].name == "x"  # the residual keeps reading float


@pytest.mark.parametrize("scheme, low, high, scale, zero", [
    ("uint8", -1.0, 3.0, 4 / 255, 64),
    ("uint8", 2.0, 5.0, 5 / 255, 0),        # widened to [0, 5]: zero stays exact
    ("uint8", -6.0, -2.0, 6 / 255, 255),    # widened to [-6, 0]
    ("int8", -1.0, 3.0, 3 / 127, 0),
    ("int8", 2.0, 5.0, 5 / 127, 0),
    ("int8", -6.0, -2.0, 6 / 127, 0),
    ("uint16", -1.0, 3.0, 4 / 65535, 16384),  # 16383.75 rounded
    ("int16", -1.0, 3.0, 3 / 32767, 0),
])
def test_activation_scale_and_zero_point(scheme, low, high, scale, zero):
    before = model(MLP, "y = MatMul(x, w)", f"float[4,3] w = {{{text(W)}}}")
    result = quantize(before, {"x": (low, high)}, activations=scheme)
    (q,) = ops(result.model, "QuantizeLinear")
    assert const(q.inputs[1]) == np.float32(scale)
    assert const(q.inputs[2]).dtype == np.dtype(scheme) and const(q.inputs[2]) == zero
    sixteen = scheme.endswith("16")
    # QuantizeLinear takes 16-bit types from opset 21; at opset 20 onnxruntime's contrib ops do.
    assert q.domain == ("com.microsoft" if sixteen else "")
    assert ("com.microsoft" in result.model.opset_imports) == sixteen
    x = np.random.default_rng(0).uniform(low, high, (8, 4)).astype(np.float32)
    # The QDQ semantics, unfused: on x86 without VNNI onnxruntime's fused u8s8 kernel saturates its
    # 16-bit pair sums when, as in W, two large weights meet a near-full-scale activation.
    assert cosine(run_model(result.model, {"x": x}, optimize=False)["y"], x @ W) > 0.999


def test_float16_model_gets_float16_scales():
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float16)
    before = consts(model("g (float16[N,8] x) => (float16[N,4] y)", "y = MatMul(x, w)",
                          "float16[8,4] w = {" + ", ".join(["0"] * 32) + "}"), w=w)
    result = quantize(before, {"x": (-3.0, 3.0)})
    q, dq = ops(result.model, "QuantizeLinear")[0], ops(result.model, "DequantizeLinear")[-1]
    assert const(q.inputs[1]).dtype == np.float16 and const(dq.inputs[1]).dtype == np.float16
    x = np.random.default_rng(1).uniform(-3, 3, (5, 8)).astype(np.float16)
    y = run_model(result.model, {"x": x}, optimize=False)["y"]
    assert y.dtype == np.float16 and cosine(y, x.astype(np.float32) @ w.astype(np.float32)) > 0.999


def test_attention_matmul_quantizes_both_inputs():
    before = model("g (float[B,4,8] q, float[B,8,4] k) => (float[B,4,4] y)", "s = MatMul(q, k)\n y = Softmax(s)")
    assert quantizable_activations(before, InsertQdqOptions()) == ["q", "k"]
    result = quantize(before, {"q": (-2.0, 2.0), "k": (-1.0, 1.5)})
    assert result.stats["attention_matmuls"] == 1 and result.stats["activations_quantized"] == 2
    (mm,) = ops(result.model, "MatMul")
    assert [i.producer().op_type for i in mm.inputs] == ["DequantizeLinear"] * 2
    assert quantizable_activations(before, InsertQdqOptions(attention=False)) == []
    check_pass(InsertQdqPass(attention=False), before, None)


def test_exclude_keeps_a_node_float():
    before = model("g (float[N,4] x) => (float[N,3] y)", "h = MatMul(x, w1)\n y = MatMul(h, w2)",
                   f"float[4,4] w1 = {{{text(np.eye(4, dtype=np.float32))}}}, float[4,3] w2 = {{{text(W)}}}")
    eir.name_nodes(before)
    names = [n.name for n in before.graph]
    options = InsertQdqOptions(exclude=(names[1],))
    assert quantizable_activations(before, options) == ["x"]
    assert near_misses(before, options) == {names[1]: "excluded"}
    result = quantize(before, {"x": (-1.0, 1.0)}, exclude=(names[1],))
    assert result.stats["ops_quantized"] == 1
    second = [n for n in result.model.graph if n.name == names[1]][0]
    assert second.inputs[1].is_initializer() and second.inputs[1].dtype == ir.DataType.FLOAT


TIED = ("g (int64[S] ids) => (float[S,6] y)", "h = Gather(t, ids)\n y = Gemm <transB = 1> (h, t)")


def test_tied_table_gets_a_copy_per_reader_when_both_are_quantized():
    # The output projection's per-row scales are not the Gather's per-column ones: two int8 copies.
    table = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    before = model(*TIED, f"float[6,4] t = {{{text(table)}}}")
    result = quantize(before, {"h": (-3.0, 3.0)})
    assert result.stats["embeddings_quantized"] == 1 and result.stats["ops_quantized"] == 2
    assert result.stats["weight_bytes_saved"] == 96 - (24 + 6 * 4) - (24 + 4 * 4)
    assert [n.op_type for n in result.model.graph] == [
        "Gather", "DequantizeLinear", "QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "Gemm"]
    assert all(v.dtype != ir.DataType.FLOAT or v.const_value.size <= 6 for v in result.model.graph.initializers.values())


def test_tied_table_whose_other_reader_stays_float_keeps_its_gather_float():
    table = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    before = model(*TIED, f"float[6,4] t = {{{text(table)}}}")
    eir.name_nodes(before)
    gather, gemm = (n.name for n in before.graph)
    options = InsertQdqOptions(exclude=(gemm,))
    assert near_misses(before, options) == {gemm: "excluded", gather: f"table is also read by Gemm {gemm!r}, which keeps it float"}
    check_pass(InsertQdqPass(options), before, None)
    # The same through a Transpose, as some exports write the output projection.
    before = model("g (int64[S] ids) => (float[S,6] y)", "h = Gather(t, ids)\n tt = Transpose(t)\n y = MatMul(h, tt)",
                   f"float[6,4] t = {{{text(table)}}}")
    check_pass(InsertQdqPass(attention=False), before, None)


def test_table_read_by_two_gathers_is_quantized_once():
    table = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    before = model("g (int64[S] a, int64[S] b) => (float[S,4] y)", "p = Gather(t, a)\n q = Gather(t, b)\n y = Add(p, q)",
                   f"float[6,4] t = {{{text(table)}}}")
    result = quantize(before, {})
    assert result.stats["embeddings_quantized"] == 2 and result.stats["weights_quantized"] == 1
    assert [v.dtype for v in result.model.graph.initializers.values()] == [ir.DataType.INT8, ir.DataType.FLOAT]
    dq = ops(result.model, "DequantizeLinear")
    assert [n.attributes.get_int("axis") for n in dq] == [1, 1]


def test_options_parse_from_pipeline_text():
    pass_ = InsertQdqPass(activations="int8", per_channel="false", exclude="a:b")
    assert pass_.options == InsertQdqOptions(activations="int8", per_channel=False, exclude=("a", "b"))
    assert pass_.spec() == "insert-qdq{activations=int8,per_channel=false,exclude=a:b}"
    with pytest.raises(UserError, match="activations"):
        InsertQdqPass(activations="int4")


def test_debug_counter_stops_after_one_op():
    before = model("g (float[N,4] x) => (float[N,3] y)", "h = MatMul(x, w1)\n y = MatMul(h, w2)",
                   f"float[4,4] w1 = {{{text(np.eye(4, dtype=np.float32))}}}, float[4,3] w2 = {{{text(W)}}}")
    ctx = PassContext(options={"activation_ranges": {"x": (-1.0, 1.0)}}, counter=DebugCounter({"insert-qdq": 1}))
    result = run_pass(InsertQdqPass(), before, ctx)
    eir.verify(result.model)
    assert result.stats["ops_quantized"] == 1
    assert [n.op_type for n in result.model.graph] == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "MatMul", "MatMul"]


# --- near-misses --------------------------------------------------------------------------------------

@pytest.mark.parametrize("signature, body, inits", [
    # Conv whose weight is an input
    ("g (float[1,3,8,8] x, float[4,3,3,3] w) => (float[1,4,6,6] y)", "y = Conv(x, w)", ""),
    # integer weights
    ("g (int32[N,2] x) => (int32[N,2] y)", "y = MatMul(x, w)", "int32[2,2] w = {1, 2, 3, 4}"),
    # a 1-D weight
    ("g (float[N,2] x) => (float[N] y)", "y = MatMul(x, w)", "float[2] w = {1, 2}"),
    # already quantized
    ("g (float[N,2] x) => (float[N,2] y)",
     "q = QuantizeLinear(x, s, z)\n d = DequantizeLinear(q, s, z)\n wd = DequantizeLinear(wq, ws)\n y = MatMul(d, wd)",
     "float s = {0.1}, uint8 z = {128}, int8[2,2] wq = {1, -2, 3, 4}, float ws = {0.5}"),
    # activation-only input of an otherwise quantized MatMul: an input from DequantizeLinear
    ("g (float[N,2] x) => (float[N,2] y)", "q = QuantizeLinear(x, s, z)\n d = DequantizeLinear(q, s, z)\n y = MatMul(d, w)",
     "float s = {0.1}, uint8 z = {128}, float[2,2] w = {1, 2, 3, 4}"),
    # a Gather of indices (shape arithmetic), not an embedding
    ("g (float[N,2] x) => (int64[1] y)", "s = Shape(x)\n y = Gather(s, i)", "int64[1] i = {0}"),
    # gathering along the table's last axis
    ("g (int64[S] i) => (float[2,S] y)", "y = Gather <axis = 1> (t, i)", "float[2,3] t = {1, 2, 3, 4, 5, 6}"),
])
def test_left_alone(signature, body, inits):
    before = model(signature, body, inits)
    check_pass(InsertQdqPass(), before, None)
    assert quantizable_activations(before, InsertQdqOptions()) == []


def test_missing_ranges_are_a_user_error():
    before = model("g (float[N,4] x) => (float[N,3] y)", "h = MatMul(x, w1)\n y = MatMul(h, w2)",
                   f"float[4,4] w1 = {{{text(np.eye(4, dtype=np.float32))}}}, float[4,3] w2 = {{{text(W)}}}")
    with pytest.raises(UserError, match="needs calibration ranges for 2 tensors") as info:
        run_pass(InsertQdqPass(), before)
    assert info.value.fix == "compile with --precision int8 --calib DATA.npz"
    with pytest.raises(UserError, match="needs calibration ranges for 1 tensors"):
        run_pass(InsertQdqPass(), before, ctx_with({"x": (0.0, 1.0)}))
    with pytest.raises(UserError, match="calibration range of 'h'"):
        run_pass(InsertQdqPass(), before, ctx_with({"x": (0.0, 1.0), "h": (1.0, float("inf"))}))


# --- numerics ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["uint8", "int8", "uint16", "int16"])
def test_mlp_stays_close_in_onnxruntime(scheme):
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((16, 32)).astype(np.float32), rng.standard_normal((32, 8)).astype(np.float32) / 4
    b1 = rng.standard_normal(32).astype(np.float32)
    before = model("g (float[N,16] x) => (float[N,8] y)", "a = MatMul(x, w1)\n h0 = Add(a, b1)\n h = Relu(h0)\n y = MatMul(h, w2)",
                   f"float[16,32] w1 = {{{text(w1)}}}, float[32] b1 = {{{text(b1)}}}, float[32,8] w2 = {{{text(w2)}}}")
    x = rng.standard_normal((64, 16)).astype(np.float32)
    h = np.maximum(x @ w1 + b1, 0)
    ranges = {"x": (float(x.min()), float(x.max())), "h": (float(h.min()), float(h.max()))}
    assert quantizable_activations(before, InsertQdqOptions()) == list(ranges)
    result = quantize(before, ranges, activations=scheme)
    assert result.stats["weight_bytes_saved"] == (16 * 32 + 32 * 8) * 3 - (32 + 8) * 4
    assert cosine(run_model(result.model, {"x": x})["y"], h @ w2) > 0.999


@pytest.mark.slow
def test_zoo_bert_quantized_stays_close(zoo_model):
    import zoo

    from edgec.frontends.onnx import load_onnx
    from edgec.passes.manager import PassManager

    path = zoo_model("bert", "dynamo")
    model_ = load_onnx(path)
    PassManager("cleanup", PassContext()).run(model_)
    feeds = zoo.zoo_inputs("bert", path)
    names = quantizable_activations(model_, InsertQdqOptions())
    ranges = exposed_ranges(model_, names, feeds)
    result = run_pass(InsertQdqPass(), model_, ctx_with(ranges))
    eir.verify(result.model)
    stats = result.stats
    assert stats["attention_matmuls"] == 4 and stats["embeddings_quantized"] == 3
    assert stats["ops_quantized"] == 16 + 3 and stats["activations_quantized"] == len(names)
    # What the weights gave up, less a float scale and a uint8 zero point per activation pair.
    freed = eir.initializer_bytes(model_) - eir.initializer_bytes(result.model)
    assert freed == stats["weight_bytes_saved"] - 5 * len(names) > 0
    float_out = run_model(model_, feeds)
    int8_out = run_model(result.model, feeds)
    for name, ref in float_out.items():
        assert cosine(int8_out[name], ref) > 0.99, name
    # Fresh inputs (other ids, other lengths): calibration ranges still hold.
    other = zoo.zoo_inputs("bert", path, seed=1, seq_len=12)
    assert cosine(run_model(result.model, other)["last_hidden_state"], run_model(model_, other)["last_hidden_state"]) > 0.99
    assert not InsertQdqPass()(result.model, ctx_with(ranges)).modified


# --- outputs: the results of quantized ops, for kernels that write integers ---------------------------

DENSE_SIG = "g (float[N,4] x, float[N,3] r) => (float[N,3] y)"
DENSE_BODY = "h = MatMul(x, w)\nb = Add(h, bias)\ny = Add(b, r)"
DENSE_INITS = "float[3] bias = {0.5, -0.25, 1.0}"


def weighted(signature, body, inits="", **arrays):
    """A graph whose named weights get exact contents."""
    declared = ", ".join(f"float[{','.join(map(str, a.shape))}] {name} = {{{','.join(['0'] * a.size)}}}"
                         for name, a in arrays.items())
    return consts(model(signature, body, ", ".join(filter(None, [inits, declared]))), **arrays)


def dense(body=DENSE_BODY, signature=DENSE_SIG, inits=DENSE_INITS):
    return weighted(signature, body, inits, w=W)


def test_outputs_quantizes_the_result_after_its_bias():
    before = dense()
    assert quantizable_activations(before, InsertQdqOptions(outputs=True)) == ["x", "b"]
    result = quantize(before, {"x": (-2.0, 2.0), "b": (-4.0, 4.0)}, outputs=True, activations="int8")
    m = result.model
    q = [n for n in ops(m, "QuantizeLinear") if n.inputs[0].name == "b"]
    assert len(q) == 1
    (dq,) = [u.node for u in q[0].outputs[0].uses()]
    # The residual Add reads the pair, and nothing reads the float sum but its QuantizeLinear.
    assert [u.node.op_type for u in dq.outputs[0].uses()] == ["Add"]
    assert {u.node.op_type for u in q[0].inputs[0].uses()} == {"QuantizeLinear"}
    assert result.stats["outputs_quantized"] == 1
    x = np.random.default_rng(0).uniform(-2, 2, (5, 4)).astype(np.float32)
    r = np.random.default_rng(1).uniform(-1, 1, (5, 3)).astype(np.float32)
    want = run_model(before, {"x": x, "r": r})["y"]
    assert cosine(run_model(m, {"x": x, "r": r})["y"], want) > 0.999


def test_outputs_near_misses():
    # A bias computed at run time is no bias: the product itself is quantized.
    m = weighted("g (float[N,4] x, float[3] c) => (float[N,3] y)", "h = MatMul(x, w)\nb = Add(h, c)\ny = Relu(b)", w=W)
    assert quantizable_activations(m, InsertQdqOptions(outputs=True)) == ["x", "h"]
    # A graph output keeps its float type and name.
    m = weighted("g (float[N,4] x) => (float[N,3] y)", "h = MatMul(x, w)\ny = Add(h, bias)", DENSE_INITS, w=W)
    assert quantizable_activations(m, InsertQdqOptions(outputs=True)) == ["x"]
    # float_outputs keeps a node's result float; outputs=False (the default) quantizes no result.
    m = dense()
    node = next(n.name for n in m.graph if n.op_type == "MatMul")
    assert quantizable_activations(m, InsertQdqOptions(outputs=True, float_outputs=(node,))) == ["x"]
    assert quantizable_activations(m, InsertQdqOptions()) == ["x"]


def test_outputs_of_a_chain_share_one_pair():
    """The result of one quantized op read by the next quantized op gets one pair, not two."""
    w2 = np.linspace(-1, 1, 9, dtype=np.float32).reshape(3, 3)
    m = weighted("g (float[N,4] x) => (float[N,3] y)", "h = MatMul(x, w)\nz = MatMul(h, w2)\ny = Relu(z)", w=W, w2=w2)
    result = quantize(m, {"x": (-2.0, 2.0), "h": (-3.0, 3.0), "z": (-3.0, 3.0)}, outputs=True)
    assert len(ops(result.model, "QuantizeLinear")) == 3


def test_outputs_golden_graph():
    codes = np.rint(W / (np.abs(W).max(axis=0) / np.float32(127))).astype(np.int8)
    expected = consts(weighted(DENSE_SIG, """
        xq = QuantizeLinear(x, xs, xz)
        xd = DequantizeLinear(xq, xs, xz)
        wd = DequantizeLinear <axis = 1> (wq, ws)
        h = MatMul(xd, wd)
        b = Add(h, bias)
        bq = QuantizeLinear(b, bs, bz)
        bd = DequantizeLinear(bq, bs, bz)
        y = Add(bd, r)""", DENSE_INITS + ", float xs = {0.0}, int8 xz = {0}, float bs = {0.0}, int8 bz = {0}, "
        "int8[4,3] wq = {0,0,0,0,0,0,0,0,0,0,0,0}, float[3] ws = {0,0,0}"),
        xs=np.float32(2.0 / 127), bs=np.float32(4.0 / 127), wq=codes, ws=np.abs(W).max(axis=0) / np.float32(127))
    quantize(dense(), {"x": (-2.0, 2.0), "b": (-4.0, 4.0)}, expected, outputs=True, activations="int8")


# --- mixed precision's wider rungs: A16W8 (`wide`) and fp16 (`half`) ------------------------------------

TWO_READERS = ("g (float[N,4] x) => (float[N,3] y1, float[N,3] y2)", "y1 = MatMul(x, w1)\n y2 = MatMul(x, w2)")


def two_readers() -> tuple[ir.Model, list[str]]:
    before = model(*TWO_READERS, f"float[4,3] w1 = {{{text(W)}}}, float[4,3] w2 = {{{text(-W)}}}")
    eir.name_nodes(before)
    return before, [n.name for n in before.graph]


def test_wide_op_reads_its_own_16bit_pair():
    before, (narrow, wide) = two_readers()
    result = quantize(before, {"x": (-1.0, 3.0)}, wide=(wide,))
    assert result.stats["ops_quantized"] == 2 and result.stats["ops_int16"] == 1
    assert result.stats["activations_quantized"] == 2  # one activation, one pair per scheme
    by_node = {n.name: n for n in result.model.graph}
    zero = {name: const(by_node[name].inputs[0].producer().inputs[2]) for name in (narrow, wide)}
    assert zero[narrow].dtype == np.uint8 and zero[narrow] == 64
    assert zero[wide].dtype == np.uint16 and zero[wide] == 16384
    # Weights stay int8 and are shared by neither (two weights), one DequantizeLinear each.
    assert [const(by_node[n].inputs[1].producer().inputs[0]).dtype for n in (narrow, wide)] == [np.int8] * 2
    assert by_node[wide].inputs[0].producer().domain == "com.microsoft"  # 16-bit at opset 20
    x = np.random.default_rng(0).uniform(-1, 3, (16, 4)).astype(np.float32)
    out = run_model(result.model, {"x": x}, optimize=False)
    err = {"y1": np.abs(out["y1"] - x @ W).max(), "y2": np.abs(out["y2"] + x @ W).max()}
    assert err["y2"] < err["y1"] / 2  # the 16-bit grid leaves only the weights' rounding


def test_wide_ranges_come_from_their_own_key():
    before, (_, wide) = two_readers()
    ctx = PassContext(options={"activation_ranges": {"x": (-1.0, 1.0)},
                               "activation_ranges_16bit": {"x": (-2.0, 2.0)}})
    m = run_pass(InsertQdqPass(wide=(wide,), activations="int8"), before, ctx).model
    scales = {str(const(q.inputs[2]).dtype): float(const(q.inputs[1])) for q in ops(m, "QuantizeLinear")}
    assert scales == {"int8": pytest.approx(1 / 127), "int16": pytest.approx(2 / 32767)}


def test_half_op_computes_in_fp16_and_keeps_its_output_name():
    before, (narrow, half) = two_readers()
    result = quantize(before, {"x": (-1.0, 3.0)}, half=(half,))
    assert result.stats["ops_quantized"] == 1 and result.stats["ops_fp16"] == 1
    m = result.model
    (computed,) = [n for n in m.graph if n.name == half]
    assert computed.op_type == "MatMul" and computed.outputs[0].dtype == ir.DataType.FLOAT16
    assert const(computed.inputs[1]).dtype == np.float16  # the weight is stored in fp16
    assert computed.inputs[0].producer().op_type == "Cast"
    (back,) = [u.node for u in computed.outputs[0].uses()]
    assert back.op_type == "Cast" and back.outputs[0].name == "y2" and back.outputs[0].is_graph_output()
    assert [o.name for o in m.graph.outputs] == ["y1", "y2"]
    x = np.random.default_rng(0).uniform(-1, 3, (16, 4)).astype(np.float32)
    out = run_model(m, {"x": x})
    assert out["y2"].dtype == np.float32
    np.testing.assert_allclose(out["y2"], -x @ W, rtol=2e-3, atol=2e-3)
    assert "x" in quantizable_activations(before, InsertQdqOptions(half=(half,)))  # int8 reader still needs it


def test_half_gemm_and_embedding_convert_every_float_constant():
    rng = np.random.default_rng(0)
    table, w, c = (rng.standard_normal(s).astype(np.float32) for s in ((6, 4), (3, 4), (3,)))
    before = consts(model("g (int64[S] ids) => (float[S,3] y)", "h = Gather(t, ids)\n y = Gemm <transB = 1> (h, w, c)",
                          "float[6,4] t = {" + ",".join(["0"] * 24) + "}, float[3,4] w = {" + ",".join(["0"] * 12)
                          + "}, float[3] c = {0,0,0}"), t=table, w=w, c=c)
    eir.name_nodes(before)
    names = tuple(n.name for n in before.graph)
    assert quantizable_activations(before, InsertQdqOptions(half=names)) == []
    result = quantize(before, {}, half=names)
    assert result.stats["ops_fp16"] == 2 and result.stats["ops_quantized"] == 0
    m = result.model
    assert sorted(str(v.const_value.numpy().dtype) for v in m.graph.initializers.values()) == ["float16"] * 3
    ids = np.array([5, 0, 2])
    np.testing.assert_allclose(run_model(m, {"ids": ids})["y"], table[ids] @ w.T + c, rtol=3e-3, atol=3e-3)


def test_half_clips_weights_to_the_fp16_range():
    before = consts(model("g (float[N,2] x) => (float[N,1] y)", "y = MatMul(x, w)", "float[2,1] w = {0, 0}"),
                    w=np.array([[1e6], [-1.0]], np.float32))
    eir.name_nodes(before)
    m = quantize(before, {}, half=(next(iter(before.graph)).name,)).model
    (w16,) = [v.const_value.numpy() for v in m.graph.initializers.values()]
    assert w16.dtype == np.float16 and np.isfinite(w16).all() and w16[0, 0] == np.finfo(np.float16).max


def test_half_near_miss_on_an_fp16_model():
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float16)
    before = consts(model("g (float16[N,8] x) => (float16[N,4] y)", "y = MatMul(x, w)",
                          "float16[8,4] w = {" + ", ".join(["0"] * 32) + "}"), w=w)
    eir.name_nodes(before)
    name = next(iter(before.graph)).name
    assert near_misses(before, InsertQdqOptions(half=(name,))) == {name: "computes in fp16 already"}
    check_pass(InsertQdqPass(half=(name,)), before, None)


# --- 7-bit weights (x86 without VNNI) ----------------------------------------------------------------------

def _host_has_vnni() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return True  # unknown: claim nothing about saturation
    return any(f in flags.split() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def test_int7_weights_use_63_levels_and_tables_keep_127():
    table = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    before = consts(model("g (int64[S] ids) => (float[S,3] y)", "h = Gather(t, ids)\n y = MatMul(h, w)",
                          "float[6,4] t = {" + ",".join(["0"] * 24) + f"}}, float[4,3] w = {{{text(W)}}}"), t=table, w=W)
    m = quantize(before, {"h": (-3.0, 3.0)}, weights="int7").model
    codes = {n.op_type: const(n.inputs[0]) for n in m.graph if n.op_type == "Gather" and n.inputs[0].dtype == ir.DataType.INT8}
    (dq_w,) = [n for n in ops(m, "DequantizeLinear") if n.inputs[0].is_initializer() and n.outputs[0].uses()[0].node.op_type == "MatMul"]
    w_codes, w_scales = const(dq_w.inputs[0]), const(dq_w.inputs[1])
    np.testing.assert_allclose(w_scales, np.abs(W).max(axis=0) / 63, rtol=1e-6)
    assert np.abs(w_codes).max(axis=0).tolist() == [63, 63, 63]
    assert np.abs(codes["Gather"]).max() == 127  # a Gather does no integer arithmetic: all of int8
    assert InsertQdqPass(weights="int7").spec() == "insert-qdq{weights=int7}"


def test_int7_weights_do_not_saturate_the_fused_u8s8_kernel():
    # Every activation at the top of its uint8 range meets weights at the top of theirs: each pair of
    # products sums to 255 * 127 * 2 = 64770 in int8, past int16, and 255 * 63 * 2 = 32130 in int7.
    w = np.full((16, 4), 1.0, np.float32)
    w[:, 1] = -1.0
    before = consts(model("g (float[N,16] x) => (float[N,4] y)", "y = MatMul(x, w)",
                          "float[16,4] w = {" + ",".join(["0"] * 64) + "}"), w=w)
    x = np.ones((8, 16), np.float32)
    expected = x @ w
    errors = {}
    for weights in ("int8", "int7"):
        m = quantize(before, {"x": (0.0, 1.0)}, weights=weights).model
        fused = run_model(m, {"x": x})["y"]  # onnxruntime fuses the QDQ MatMul into its u8s8 kernel
        unfused = run_model(m, {"x": x}, optimize=False)["y"]
        np.testing.assert_allclose(unfused, expected, rtol=1e-5)  # both grids hold these values exactly
        errors[weights] = float(np.abs(fused - expected).max())
    assert errors["int7"] < 1e-4
    if not _host_has_vnni():
        assert errors["int8"] > 0.1  # the saturation that int7 avoids, seen on this host
