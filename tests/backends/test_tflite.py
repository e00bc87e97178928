"""The tflite backend: each lowering rule against onnxruntime on a small graph, MiniLM on real sentences
(fp32 and fp16), the zoo through the backend, and the refusals. Everything runs in LiteRT's interpreter."""

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")

import zoo  # noqa: E402
from ai_edge_litert import schema_py_generated as schema  # noqa: E402

from edgec import ir as eir  # noqa: E402
from edgec.analysis.shapes import infer_shapes, specialize_inputs  # noqa: E402
from edgec.backends import BACKENDS  # noqa: E402
from edgec.backends.tflite import TFLiteBackend, run_tflite, unsupported_ops  # noqa: E402
from edgec.errors import UserError  # noqa: E402
from edgec.frontends.onnx import load_onnx  # noqa: E402
from edgec.passes.core import PassContext  # noqa: E402
from edgec.passes.manager import PassManager  # noqa: E402
from edgec.targets import get_target  # noqa: E402
from edgec.testing import graph  # noqa: E402
from edgec.verify import compare, run_model, token_mask  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BACKEND = TFLiteBackend()
TARGET = get_target("snapdragon-8")
RNG = np.random.default_rng(0)


def onnx_graph(signature, body, inits=""):
    """A hand-written graph with every value's type and shape inferred, as the compile leaves it."""
    return infer_shapes(graph(signature, body, inits))


def emit(model, tmp_path, precision="fp32", stem="model"):
    return BACKEND.emit(model, tmp_path, target=TARGET, precision=precision, stem=stem)


def compile_for_tflite(path, shapes, precision="fp32"):
    """What `edgec compile --backend tflite` does before emitting: static inputs, cleanup, lowering."""
    model = load_onnx(path)
    specialize_inputs(model, shapes)
    PassManager("cleanup," + BACKEND.lowering_pipeline(TARGET, precision), PassContext()).run(model)
    return model


def random(shape, dtype=np.float32, low=-2.0, high=2.0):
    if np.dtype(dtype) == np.bool_:
        return RNG.random(shape) > 0.3
    if np.issubdtype(dtype, np.integer):
        return RNG.integers(int(low), int(high), shape).astype(dtype)
    return RNG.uniform(low, high, shape).astype(dtype)


def tflite_ops(path) -> list[str]:
    model = schema.ModelT.InitFromPackedBuf(Path(path).read_bytes(), 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    codes = [names[c.builtinCode] for c in model.operatorCodes]
    return [codes[op.opcodeIndex] for op in model.subgraphs[0].operators]


# Builtins the reference op resolver does not register.
NO_REFERENCE_KERNEL = {"ELU"}

# (id, signature, body, initializers, {input: (shape, dtype, low, high)}, TFLite ops expected)
W = "float[3,4] w = {" + ",".join(str(round(v, 2)) for v in np.linspace(-1, 1, 12)) + "}"
CASES = [
    ("add-broadcast", "g (float[2,3,4] x, float[4] y) => (float[2,3,4] z)", "z = Add(x, y)", "", {}, ["ADD"]),
    ("sub-div-mul-const", "g (float[2,3] x) => (float[2,3] z)",
     "a = Sub(x, c)\nb = Mul(a, c)\nz = Div(b, d)", "float[3] c = {1.0, 2.0, 3.0}, float d = {4.0}", {},
     ["SUB", "MUL", "DIV"]),
    ("add-5d-broadcast", "g (float[1,2,3,4,5] x, float[1,2,1,4,1] y) => (float[1,2,3,4,5] z)",
     "a = Add(x, y)\nz = Mul(a, y)", "", {}, ["ADD", "MUL"]),
    ("max-min-5d", "g (float[1,2,3,4,5] x, float[1,2,1,4,1] y) => (float[1,2,3,4,5] z)",
     "a = Max(x, y)\nz = Min(a, y)", "", {}, ["MAXIMUM", "MINIMUM"]),
    ("pow", "g (float[2,8] x) => (float[2,8] a, float[2,8] b, float[2,8] c)",
     "a = Pow(x, two)\nb = Pow(x, half)\nc = Pow(x, three)", "float two = {2.0}, float half = {0.5}, float three = {3.0}",
     {"x": ((2, 8), np.float32, 0.1, 2.0)}, ["MUL", "SQRT", "POW"]),
    ("unary", "g (float[2,8] x) => (float[2,8] y)",
     "a = Relu(x)\nb = Sigmoid(a)\nc = Tanh(b)\nd = Neg(c)\ne = Exp(d)\nf = Sqrt(e)\ng2 = Reciprocal(f)\n"
     "h = Abs(g2)\ny = Log(h)", "", {}, ["RELU", "LOGISTIC", "TANH", "NEG", "EXP", "SQRT", "DIV", "ABS", "LOG"]),
    ("gelu", "g (float[2,16] x) => (float[2,16] a, float[2,16] b)",
     'a = Gelu(x)\nb = Gelu <approximate = "tanh"> (x)', "", {}, ["GELU", "GELU"]),
    ("activations", "g (float[2,8] x) => (float[2,8] a, float[2,8] b, float[2,8] c, float[2,8] d, float[2,8] e)",
     "a = LeakyRelu <alpha = 0.2> (x)\nb = Clip(x, zero, six)\nc = Clip(x, lo, hi)\nd = Elu(x)\ne = HardSwish(x)",
     "float zero = {0.0}, float six = {6.0}, float lo = {-0.5}, float hi = {0.7}",
     {"x": ((2, 8), np.float32, -8, 8)}, ["LEAKY_RELU", "RELU6", "MAXIMUM", "MINIMUM", "ELU", "HARD_SWISH"]),
    ("layer-norm", "g (float[2,5,8] x) => (float[2,5,8] y)", "y = LayerNormalization <epsilon = 1e-12> (x, s, b)",
     "float[8] s = {1.0,2.0,0.5,1.0,1.5,1.0,0.2,1.0}, float[8] b = {0.0,0.1,0.2,0.3,0.4,0.5,0.6,0.7}", {},
     ["MEAN", "SQUARED_DIFFERENCE", "MEAN", "ADD", "RSQRT", "SUB", "MUL", "MUL", "ADD"]),
    ("layer-norm-two-axes", "g (float[2,3,4] x) => (float[2,3,4] y)", "y = LayerNormalization <axis = 1> (x, s)",
     "float[3,4] s = {1.0,2.0,0.5,1.0,1.5,1.0,0.2,1.0,1.0,1.0,1.0,3.0}", {}, None),
    ("softmax", "g (float[2,3,5] x) => (float[2,3,5] a, float[2,3,5] b, float[2,3,5] c)",
     "a = Softmax(x)\nb = Softmax <axis = 1> (x)\nc = LogSoftmax(x)", "", {}, None),
    ("matmul-fc-bias", "g (float[2,5,3] x) => (float[2,5,4] y)", "m = MatMul(x, w)\ny = Add(m, bias)",
     W + ", float[4] bias = {0.1, 0.2, 0.3, 0.4}", {}, ["FULLY_CONNECTED"]),
    ("matmul-fc", "g (float[5,3] x) => (float[5,4] y)", "y = MatMul(x, w)", W, {}, ["FULLY_CONNECTED"]),
    ("matmul-batch", "g (float[2,3,5,4] a, float[2,1,4,6] b) => (float[2,3,5,6] y)", "y = MatMul(a, b)", "", {},
     ["BATCH_MATMUL"]),
    ("gemm", "g (float[5,4] x) => (float[5,3] y)",
     "y = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (x, w, c)", W + ", float[3] c = {1.0, 2.0, 3.0}", {},
     ["FULLY_CONNECTED"]),
    ("gemm-trans-a-matrix-bias", "g (float[4,5] x) => (float[5,3] y)",
     "y = Gemm <transA = 1, transB = 1> (x, w, c)", W + ", float[5,1] c = {1.0, 2.0, 3.0, 4.0, 5.0}", {},
     ["TRANSPOSE", "FULLY_CONNECTED", "ADD"]),
    ("gather-embedding", "g (int64[2,6] ids) => (float[2,6,4] y)", "y = Gather(w2, ids)",
     "float[10,4] w2 = {" + ",".join(str(i / 10) for i in range(40)) + "}", {"ids": ((2, 6), np.int64, 0, 10)},
     ["GATHER"]),
    ("gather-negative-const", "g (float[3,5] x) => (float[3,2] y)", "y = Gather <axis = 1> (x, idx)",
     "int64[2] idx = {-1, 1}", {}, ["GATHER"]),
    ("gather-nd-bool-mask", "g (int64[1,6] mask) => (float[1,1,6,6] y)",
     "b = Cast <to = 9> (mask)\nsel = GatherND(b, idx)\nkeep = And(rows, sel)\ny = Where(keep, zero, low)",
     "int64[1,1,1,6,2] idx = {0,0,0,1,0,2,0,3,0,4,0,5}, bool[1,1,6,1] rows = {1,1,1,1,1,1}, "
     "float zero = {0.0}, float low = {-3.4e38}", {"mask": ((1, 6), np.int64, 0, 2)},
     ["CAST", "GATHER_ND", "LOGICAL_AND", "SELECT_V2"]),
    ("gather-elements", "g (int64[1,6] pos) => (int64[1,6] y)", "y = GatherElements <axis = 1> (table, pos)",
     "int64[1,8] table = {10, 11, 12, 13, 14, 15, 16, 17}", {"pos": ((1, 6), np.int64, 0, 8)},
     ["RESHAPE", "CONCATENATION", "GATHER_ND"]),
    ("compare-logic-cumsum", "g (int64[2,6] ids) => (int64[2,6] y, bool[2,6] lt)",
     "e = Equal(ids, one)\nn = Not(e)\ni = Cast <to = 7> (n)\ny = CumSum <exclusive = 1, reverse = 1> (i, ax)\n"
     "lt = Less(ids, one)", "int64 one = {1}, int64 ax = {1}", {"ids": ((2, 6), np.int64, 0, 3)},
     ["EQUAL", "LOGICAL_NOT", "CAST", "CUMSUM", "LESS"]),
    ("reshapes", "g (float[2,3,4] x) => (float[3,8] a, float[2,12] b, float[1,2,3,4] c, float[6,4] d)",
     "a = Reshape(x, s)\nb = Flatten(x)\nc = Unsqueeze(x, ax0)\nsq = Squeeze(c, ax0)\nd = Reshape(sq, s2)",
     "int64[2] s = {3, -1}, int64[1] ax0 = {0}, int64[2] s2 = {-1, 4}", {},
     ["RESHAPE"] * 5),
    ("transpose-concat", "g (float[2,3,4] x) => (float[4,3,3] y)",
     "t = Transpose <perm = [2, 1, 0]> (x)\ny = Concat <axis = -1> (t, c)", "float[4,3,1] c = {" + ",".join(["0.5"] * 12) + "}",
     {}, ["TRANSPOSE", "CONCATENATION"]),
    ("slices", "g (float[4,6,5] x) => (float[4,4,5] a, float[2,3,5] b, float[4,6,2] c)",
     "a = Slice(x, s1, e1, ax1)\nb = Slice(x, s2, e2, ax2, st2)\nc = Slice(x, s3, e3, ax3, st3)",
     "int64[1] s1 = {1}, int64[1] e1 = {-1}, int64[1] ax1 = {1}, "
     "int64[2] s2 = {0, 1}, int64[2] e2 = {9223372036854775807, 6}, int64[2] ax2 = {0, 1}, int64[2] st2 = {2, 2}, "
     "int64[1] s3 = {-1}, int64[1] e3 = {-9223372036854775807}, int64[1] ax3 = {2}, int64[1] st3 = {-3}", {},
     ["SLICE", "STRIDED_SLICE", "STRIDED_SLICE"]),
    ("split-pad-expand-tile", "g (float[2,6] x) => (float[2,2] a, float[2,4] b, float[4,9] p, float[4,7] r, "
     "float[3,2,6] e, float[4,12] t)",
     "a, b = Split <axis = 1> (x, sp)\np = Pad(x, pads, v)\nr = Pad <mode = \"reflect\"> (x, rp)\ne = Expand(x, es)\n"
     "t = Tile(x, reps)", "int64[2] sp = {2, 4}, int64[4] pads = {1, 2, 1, 1}, float v = {0.5}, "
     "int64[4] rp = {1, 0, 1, 1}, int64[3] es = {3, 1, 1}, int64[2] reps = {2, 2}", {},
     ["SPLIT_V", "PADV2", "MIRROR_PAD", "BROADCAST_TO", "TILE"]),
    ("reductions", "g (float[2,3,4] x) => (float[2,4] m, float[2,3,1] s, float[1,3,1] mx)",
     "m = ReduceMean <keepdims = 0> (x, a1)\ns = ReduceSum(x, a2)\nmx = ReduceMax(x, a02)",
     "int64[1] a1 = {1}, int64[1] a2 = {-1}, int64[2] a02 = {0, 2}", {}, ["MEAN", "SUM", "REDUCE_MAX"]),
    ("conv-dense-same", "g (float[1,3,9,9] x) => (float[1,4,5,5] y)",
     "y = Conv <pads = [1, 1, 1, 1], strides = [2, 2]> (x, cw, cb)",
     "float[4,3,3,3] cw = {" + ",".join(f"{v:.3f}" for v in np.linspace(-1, 1, 108)) + "}, float[4] cb = {0.1,0.2,0.3,0.4}",
     {}, ["TRANSPOSE", "CONV_2D", "TRANSPOSE"]),
    ("conv-explicit-pad-dilated", "g (float[1,3,8,8] x) => (float[1,4,6,5] y)",
     "y = Conv <pads = [1, 0, 2, 1], dilations = [2, 2]> (x, cw)",
     "float[4,3,3,3] cw = {" + ",".join(f"{v:.3f}" for v in np.linspace(-1, 1, 108)) + "}",
     {}, ["TRANSPOSE", "PAD", "CONV_2D", "TRANSPOSE"]),
    ("conv-depthwise", "g (float[1,4,8,8] x) => (float[1,8,8,8] y)",
     "y = Conv <group = 4, pads = [1, 1, 1, 1]> (x, dw, db)",
     "float[8,1,3,3] dw = {" + ",".join(f"{v:.3f}" for v in np.linspace(-1, 1, 72)) + "}, "
     "float[8] db = {0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8}", {}, ["TRANSPOSE", "DEPTHWISE_CONV_2D", "TRANSPOSE"]),
    ("pools", "g (float[1,3,8,8] x) => (float[1,3,4,4] a, float[1,3,8,8] b, float[1,3,9,9] c, float[1,3,1,1] d)",
     "a = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (x)\n"
     "b = AveragePool <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x)\n"
     "c = AveragePool <kernel_shape = [2, 2], pads = [1, 1, 1, 1], count_include_pad = 1> (x)\n"
     "d = GlobalAveragePool(x)", "", {}, None),
    ("resize", "g (float[1,2,3,4] x) => (float[1,2,6,8] a, float[1,2,6,8] b, float[1,2,1,1] c)",
     'a = Resize <mode = "linear"> (x, , , size)\n'
     'b = Resize <mode = "nearest", coordinate_transformation_mode = "asymmetric", nearest_mode = "floor"> (x, , sc)\n'
     'c = Resize <mode = "linear"> (x, , , size1)',
     "int64[4] size = {1, 2, 6, 8}, float[4] sc = {1.0, 1.0, 2.0, 2.0}, int64[4] size1 = {1, 2, 1, 1}", {},
     # x is transposed to NHWC once for all three; the outputs go back to NCHW at the end.
     ["TRANSPOSE", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "RESIZE_BILINEAR"] + ["TRANSPOSE"] * 3),
    ("nhwc-chain", "g (float[1,3,8,8] x) => (float[1,16] y)",
     "c1 = Conv <pads = [1, 1, 1, 1]> (x, cw)\ns = Sigmoid(c1)\nsilu = Mul(c1, s)\nb = Add(silu, chan)\n"
     "c2 = Conv(b, pw)\ncat = Concat <axis = 1> (b, c2)\np = GlobalAveragePool(cat)\ny = Flatten(p)",
     "float[4,3,3,3] cw = {" + ",".join(f"{v:.3f}" for v in np.linspace(-1, 1, 108)) + "}, "
     "float[4,1,1] chan = {0.1, -0.2, 0.3, -0.4}, "
     "float[12,4,1,1] pw = {" + ",".join(f"{v:.3f}" for v in np.linspace(-1, 1, 48)) + "}", {},
     # NCHW only where the graph starts and where Flatten reads it: no transposes between the convolutions.
     ["TRANSPOSE", "CONV_2D", "LOGISTIC", "MUL", "ADD", "CONV_2D", "CONCATENATION", "MEAN", "TRANSPOSE", "RESHAPE"]),
    ("batch-norm", "g (float[1,3,4,4] x) => (float[1,3,4,4] y)",
     "y = BatchNormalization(x, bs, bb, bm, bv)",
     "float[3] bs = {1.0, 0.5, 2.0}, float[3] bb = {0.0, 0.1, -0.1}, float[3] bm = {0.2, -0.3, 0.0}, "
     "float[3] bv = {1.0, 4.0, 0.25}", {}, ["MUL", "ADD"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rule_matches_onnxruntime(case, tmp_path):
    name, signature, body, inits, ranges, expected_ops = case
    model = onnx_graph(signature, body, inits)
    feeds = {}
    for value in model.graph.inputs:
        dims, dtype, low, high = ranges.get(value.name, (tuple(value.shape), value.dtype.numpy(), -2.0, 2.0))
        feeds[value.name] = random(dims, dtype, low, high)
    assert unsupported_ops(model) == {}
    artifact = emit(model, tmp_path)
    expected = run_model(model, feeds, optimize=False)
    runs = [BACKEND.run(artifact, feeds)]
    if not NO_REFERENCE_KERNEL & set(tflite_ops(artifact.path)):
        runs.append(run_tflite(artifact.path, feeds, reference_kernels=True))
    for got in runs:
        assert list(got) == list(expected)
        for out in expected:
            assert got[out].dtype == expected[out].dtype, out
            np.testing.assert_allclose(got[out], expected[out], rtol=1e-5, atol=1e-5, err_msg=f"{name}: {out}")
    if expected_ops is not None:
        assert tflite_ops(artifact.path) == expected_ops


def test_artifact_keeps_names_types_and_signature(tmp_path):
    model = onnx_graph("g (int64[1,6] ids, float[1,6,4] h) => (float[1,6,4] out)",
                  "e = Gather(w2, ids)\nout = Add(e, h)", "float[10,4] w2 = {" + ",".join(["0.1"] * 40) + "}")
    artifact = emit(model, tmp_path, stem="named")
    assert artifact.path == tmp_path / "named.tflite" and artifact.files == [artifact.path]
    assert BACKEND.artifact_names("named") == ("named.tflite",)
    assert artifact.meta["inputs"] == {"ids": [1, 6], "h": [1, 6, 4]} and artifact.meta["op_counts"] == {"ADD": 1, "GATHER": 1}
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(artifact.path))
    assert [(d["name"], d["dtype"]) for d in interpreter.get_input_details()] == [("ids", np.int64), ("h", np.float32)]
    assert interpreter.get_signature_list() == {"serving_default": {"inputs": ["h", "ids"], "outputs": ["out"]}}
    assert [p.name for p in tmp_path.iterdir()] == ["named.tflite"]  # no temporary file left behind


def test_run_chunks_batches_pads_and_crops(tmp_path):
    """A 1x8 artifact runs 5x3 feeds: five invocations, padded to 8 tokens, outputs cropped back to 3."""
    model = onnx_graph("g (int64[1,8] ids, int64[1,8] attention_mask) => (float[1,8,4] y)",
                  "e = Gather(w2, ids)\nm = Cast <to = 1> (attention_mask)\nu = Unsqueeze(m, ax)\ny = Mul(e, u)",
                  "float[10,4] w2 = {" + ",".join(str(i) for i in range(40)) + "}, int64[1] ax = {-1}")
    artifact = emit(model, tmp_path)
    ids = RNG.integers(0, 10, (5, 3)).astype(np.int64)
    mask = np.ones((5, 3), np.int64)
    got = BACKEND.run(artifact, {"ids": ids, "attention_mask": mask})["y"]
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    np.testing.assert_array_equal(got, table[ids])
    with pytest.raises(RuntimeError, match="1x8"):
        BACKEND.run(artifact, {"ids": np.zeros((1, 9), np.int64), "attention_mask": np.ones((1, 9), np.int64)})


def test_fp16_stores_weights_as_float16(tmp_path):
    model = onnx_graph("g (float[2,5,3] x) => (float[2,5,4] y)", "m = MatMul(x, w)\ny = Add(m, bias)",
                  W + ", float[4] bias = {0.1, 0.2, 0.3, 0.4}")
    feeds = {"x": random((2, 5, 3))}
    artifact = emit(model, tmp_path, precision="fp16")
    parsed = schema.ModelT.InitFromPackedBuf(artifact.path.read_bytes(), 0)
    types = {t.name.decode(): t.type for t in parsed.subgraphs[0].tensors}
    # The 12-element weight is below FP16_MIN_ELEMENTS: only weights of 16 or more go to float16.
    assert schema.TensorType.FLOAT16 not in types.values()
    big = onnx_graph("g (float[2,16] x) => (float[2,16] y)", "y = MatMul(x, w)",
                "float[16,16] w = {" + ",".join(f"{v:.4f}" for v in np.linspace(-1, 1, 256)) + "}")
    artifact = emit(big, tmp_path, precision="fp16", stem="big")
    parsed = schema.ModelT.InitFromPackedBuf(artifact.path.read_bytes(), 0)
    assert schema.TensorType.FLOAT16 in {t.type for t in parsed.subgraphs[0].tensors}
    assert tflite_ops(artifact.path) == ["DEQUANTIZE", "FULLY_CONNECTED"]
    feeds = {"x": random((2, 16))}
    np.testing.assert_allclose(BACKEND.run(artifact, feeds)["y"], run_model(big, feeds)["y"], rtol=1e-2, atol=1e-2)
    assert artifact.meta["precision"] == "fp16"


def test_unknown_op_is_a_user_error_and_writes_nothing(tmp_path):
    model = onnx_graph("g (float[2,8] x) => (float[2,8] y)", "e = Erf(x)\ny = Relu(e)")
    problems = unsupported_ops(model)
    assert len(problems) == 1 and "Erf" in next(iter(problems.values()))
    with pytest.raises(UserError, match="Erf") as info:
        emit(model, tmp_path)
    assert next(iter(problems)) in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signature, body, inits, reason", [
    ("g (float[4] x, float[4,3] w) => (float[3] y)", "y = MatMul(x, w)", "", "1-D"),
    ("g (float[1,4,8,8] x) => (float[1,4,8,8] y)", "y = Conv <group = 2, pads = [1, 1, 1, 1]> (x, cw)",
     "float[4,2,3,3] cw = {" + ",".join(["0.1"] * 72) + "}", "groups"),
    ("g (float[2,8] x, int64[1] r) => (float[2,8] y)", "y = ReduceMean(x, r)", "", "run time"),
    ("g (double[2,8] x) => (double[2,8] y)", "y = Relu(x)", "", "DOUBLE"),
    ("g (float[N,8] x) => (float[N,8] y)", "y = Relu(x)", "", "static shape"),
])
def test_unsupported_ops_say_why(signature, body, inits, reason, tmp_path):
    model = onnx_graph(signature, body, inits)
    (why,) = unsupported_ops(model).values()
    assert reason in why
    with pytest.raises(UserError):
        emit(model, tmp_path)


def test_backend_contract():
    assert BACKENDS.get("tflite") is TFLiteBackend
    assert BACKEND.supports(get_target("snapdragon-8")) and BACKEND.supports(get_target("raspberry-pi-5"))
    assert BACKEND.unavailable_reason() is None
    assert BACKEND.lowering_pipeline(TARGET, "fp32") == "lower-attention{form=decomposed},fuse-gelu,cleanup"
    assert BACKEND.quantization(TARGET) == {"activations": "int8-asym", "outputs": True, "attention": False}
    with pytest.raises(UserError, match="int4"):
        emit(onnx_graph("g (float[2] x) => (float[2] y)", "y = Relu(x)"), Path("/nonexistent"), precision="int4")


# --- the zoo --------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
@pytest.mark.parametrize("arch", zoo.ARCHS)
def test_zoo_model_through_tflite(arch, exporter, zoo_model, tmp_path):
    path = zoo_model(arch, exporter)
    feeds = zoo.zoo_inputs(arch, path)  # batch 2, second row padded: chunked to the 1-row artifact
    model = compile_for_tflite(path, {k: (1, *v.shape[1:]) for k, v in feeds.items()})
    assert unsupported_ops(model) == {}
    artifact = emit(model, tmp_path)
    figures = compare(run_model(path, feeds), BACKEND.run(artifact, feeds), token_mask(feeds))
    assert figures["cosine_min"] >= 0.99999, figures


@pytest.mark.slow
def test_zoo_model_without_gelu_fusion_names_erf(zoo_model):
    """Without fuse-gelu a TorchScript GELU keeps its Erf, which TFLite has no builtin for."""
    model = load_onnx(zoo_model("bert", "torchscript"))
    specialize_inputs(model, {v.name: (1, 16) for v in model.graph.inputs})
    PassManager("cleanup,lower-attention{form=decomposed},cleanup", PassContext()).run(model)
    problems = unsupported_ops(model)
    assert len(problems) == 2 and all(reason.startswith("Erf ") for reason in problems.values()), problems


# --- MiniLM on real sentences ------------------------------------------------------------------------

MINILM_ROWS = 64  # of the 200 polarity sentences: the 1x128 artifact runs one per invocation


@pytest.fixture(scope="module")
def polarity_feeds(polarity_npz):
    with np.load(polarity_npz) as data:
        return {k: data[k][:MINILM_ROWS] for k in ("input_ids", "attention_mask", "token_type_ids")}


@pytest.mark.slow
@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_minilm_matches_onnxruntime(exporter, minilm_exports, polarity_feeds, tmp_path):
    path = minilm_exports[exporter]
    model = compile_for_tflite(path, {name: (1, 128) for name in polarity_feeds})
    assert unsupported_ops(model) == {}
    reference = run_model(path, polarity_feeds)
    mask = token_mask(polarity_feeds)
    fp32 = emit(model, tmp_path, "fp32", stem="fp32")
    figures = compare(reference, BACKEND.run(fp32, polarity_feeds), mask)
    assert figures["cosine_min"] >= 0.9999, figures
    assert fp32.meta["inputs"] == {name: [1, 128] for name in polarity_feeds}
    fp16 = emit(model, tmp_path, "fp16", stem="fp16")
    figures = compare(reference, BACKEND.run(fp16, polarity_feeds), mask)
    assert figures["cosine_min"] >= 0.999, figures
    assert fp16.size_bytes < 0.55 * fp32.size_bytes


@pytest.mark.slow
def test_cli_compiles_for_snapdragon_with_the_shapes_given(zoo_model, tmp_path, capsys):
    from edgec.cli import main

    source = zoo_model("bert", "dynamo")
    out = tmp_path / "sd8"
    code = main(["compile", str(source), "--target", "snapdragon-8", "--precision", "fp16",
                 "--shape", "input_ids=1x24,attention_mask=1x24,token_type_ids=1x24", "-o", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "static shapes" in printed and "input_ids 1x24" in printed and "in tflite" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["backend"] == "tflite" and report["static_shapes"]["input_ids"] == [1, 24]
    assert (out / "model.tflite").is_file()
    # snapdragon-8 names its SoC: the NPU build is offered, and where Qualcomm's SDK is missing the
    # compile says so and keeps the portable .tflite.
    aot = report["artifact_meta"]["npu_aot"]
    assert aot["soc"] == "SM8650" and "SM8650 NPU AOT" in printed
    if aot["status"] == "skipped":
        assert "libQnnHtp.so" in aot["reason"] and "LD_LIBRARY_PATH" in aot["reason"]
    else:
        assert (out / aot["file"]).is_file()
    # A shape that does not fit the model is one clear error, and nothing is written.
    bad = tmp_path / "bad"
    assert main(["compile", str(source), "--target", "snapdragon-8", "--shape", "input_ids=1x24x3", "-o", str(bad)]) == 2
    assert "does not fit the model" in capsys.readouterr().err and not (bad / "model.tflite").exists()


# --- int8 from the IR's QDQ ---------------------------------------------------------------------------

def quantized(signature, body, inits, feeds, **options):
    """The graph through insert-qdq with ranges measured on `feeds` (calibration in small)."""
    from edgec.passes.quantize.insert_qdq import InsertQdqOptions, InsertQdqPass, quantizable_activations

    model = onnx_graph(signature, body, inits)
    qdq = InsertQdqOptions(**{"activations": "int8-asym", "outputs": True, **options})
    names = quantizable_activations(model, qdq)
    probe = eir.clone(model)
    values = {v.name: v for n in probe.graph for v in n.outputs}
    probe.graph.outputs.extend(values[n] for n in names if n in values and values[n] not in probe.graph.outputs)
    seen = {**feeds, **run_model(probe, feeds)}
    ranges = {n: (float(seen[n].min()), float(seen[n].max())) for n in names}
    PassManager([InsertQdqPass(qdq)], PassContext(options={"activation_ranges": ranges})).run(model)
    return infer_shapes(model)


def tensor_types(path) -> dict[str, str]:
    model = schema.ModelT.InitFromPackedBuf(Path(path).read_bytes(), 0)
    names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    return {t.name.decode(): names[t.type] for t in model.subgraphs[0].tensors}


DENSE = ("g (float[1,8,16] x) => (float[1,8,12] y)", "h = MatMul(x, w)\nb = Add(h, bias)\ny = Relu(b)",
         "float[16,12] w = {" + ",".join(f"{v:.3f}" for v in np.linspace(-1, 1, 192)) + "}, float[12] bias = {"
         + ",".join(f"{v:.2f}" for v in np.linspace(-0.5, 0.5, 12)) + "}")


def test_int8_dense_is_one_integer_fully_connected(tmp_path):
    """x -> Q/DQ -> MatMul(DQ(int8 W)) -> +bias -> Q/DQ -> Relu: QUANTIZE, an int8 FULLY_CONNECTED with its
    int32 bias, then DEQUANTIZE for the float Relu; the same numbers as onnxruntime runs the QDQ graph."""
    feeds = {"x": random((1, 8, 16))}
    model = quantized(*DENSE, feeds)
    artifact = emit(model, tmp_path, "int8")
    assert tflite_ops(artifact.path) == ["QUANTIZE", "FULLY_CONNECTED", "DEQUANTIZE", "RELU"]
    types = tensor_types(artifact.path)
    assert sorted(types.values()).count("INT8") == 3 and "INT32" in types.values()  # x, w, out; the bias
    got, want = BACKEND.run(artifact, feeds)["y"], run_model(model, feeds)["y"]
    step = float(np.abs(want).max()) / 127
    assert np.abs(got - want).max() <= 2 * step  # the same grid, rounding apart
    assert compare({"y": run_model(onnx_graph(*DENSE), feeds)["y"]}, {"y": got})["cosine_min"] > 0.999


def test_int8_product_without_quantized_output_runs_hybrid(tmp_path):
    """A float result (graph output, or one calibration kept float) leaves no QUANTIZE/DEQUANTIZE pair
    around the product: TFLite's hybrid kernel takes the float input and the int8 weights."""
    feeds = {"x": random((1, 8, 16))}
    signature, body, inits = DENSE
    names = [n.name for n in onnx_graph(signature, body, inits).graph if n.op_type == "MatMul"]
    model = quantized(signature, body, inits, feeds, float_outputs=tuple(names))
    artifact = emit(model, tmp_path, "int8")
    assert tflite_ops(artifact.path) == ["FULLY_CONNECTED", "RELU"]
    assert "INT8" in tensor_types(artifact.path).values()
    figures = compare(run_model(onnx_graph(*DENSE), feeds), BACKEND.run(artifact, feeds))
    assert figures["cosine_min"] > 0.999, figures


def test_int8_activation_product_is_an_integer_batch_matmul(tmp_path):
    signature = "g (float[1,2,8,4] a, float[1,2,4,8] b) => (float[1,2,8,8] y)"
    feeds = {"a": random((1, 2, 8, 4)), "b": random((1, 2, 4, 8))}
    model = quantized(signature, "p = MatMul(a, b)\ny = Relu(p)", "", feeds, attention=True)
    artifact = emit(model, tmp_path, "int8")
    assert tflite_ops(artifact.path) == ["QUANTIZE", "QUANTIZE", "BATCH_MATMUL", "DEQUANTIZE", "RELU"]
    got, want = BACKEND.run(artifact, feeds)["y"], run_model(model, feeds)["y"]
    assert np.abs(got - want).max() <= 2 * float(np.abs(want).max()) / 127


def test_int8_bias_beyond_int32_runs_hybrid(tmp_path):
    """Near miss: a bias that int32 cannot hold at x_scale * w_scale keeps the product off the integer kernel."""
    signature, body, _ = DENSE
    inits = "float[16,12] w = {" + ",".join("1e-6" for _ in range(192)) + "}, float[12] bias = {" + \
        ",".join("3e6" for _ in range(12)) + "}"
    feeds = {"x": random((1, 8, 16))}
    model = quantized(signature, body, inits, feeds)
    artifact = emit(model, tmp_path, "int8")
    # The hybrid product writes the float sum; its quantized pair stays for the float Relu.
    assert tflite_ops(artifact.path) == ["FULLY_CONNECTED", "QUANTIZE", "DEQUANTIZE", "RELU"]
    assert "INT32" not in tensor_types(artifact.path).values(), "the int32 bias would overflow"
    # (onnxruntime's own QDQ fusion overflows that bias: the float graph is the reference)
    got, want = BACKEND.run(artifact, feeds)["y"], run_model(onnx_graph(signature, body, inits), feeds)["y"]
    assert np.allclose(got, want, rtol=1e-2)


def test_int8_weights_of_float_ops_are_folded(tmp_path):
    """A DequantizeLinear of constants that no integer kernel takes (a Conv's) becomes its float array."""
    signature = "g (float[1,2,6,6] x) => (float[1,3,6,6] y)"
    body = "w = DequantizeLinear(q, s)\ny = Conv <pads = [1, 1, 1, 1]> (x, w)"
    inits = "int8[3,2,3,3] q = {" + ",".join(str(i % 7 - 3) for i in range(54)) + "}, float s = {0.25}"
    model = onnx_graph(signature, body, inits)
    artifact = emit(model, tmp_path, "int8")
    assert "DEQUANTIZE" not in tflite_ops(artifact.path) and "CONV_2D" in tflite_ops(artifact.path)
    feeds = {"x": random((1, 2, 6, 6))}
    assert np.allclose(BACKEND.run(artifact, feeds)["y"], run_model(model, feeds)["y"], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["bert", "distilbert", "vit"])
def test_zoo_model_int8_for_snapdragon(arch, zoo_model, tmp_path):
    """The compile for snapdragon-8 at int8: calibrated QDQ lowered to TFLite's integer kernels, verified
    in the interpreter against the original."""
    from edgec.compiler import CompileOptions, compile_model

    path = zoo_model(arch, "dynamo")
    feeds = zoo.zoo_inputs(arch, path)
    rng = np.random.default_rng(1)
    calib = {k: np.concatenate([v] * 8) for k, v in feeds.items()}
    for k, v in calib.items():
        if np.issubdtype(v.dtype, np.floating):
            calib[k] = (v + rng.normal(0, 0.1, v.shape)).astype(v.dtype)
        elif k == "input_ids":
            calib[k] = rng.integers(1, int(v.max()) + 1, v.shape).astype(v.dtype)
    tokens = "input_ids" in calib
    if tokens:  # longer than the artifact's static sequence: cut to it, and the report says so
        calib = {k: np.concatenate([v, v[:, :4]], axis=1) for k, v in calib.items()}
    np.savez(tmp_path / "calib.npz", **calib)
    np.savez(tmp_path / "inputs.npz", **feeds)
    result = compile_model(path, CompileOptions(target="snapdragon-8", outdir=tmp_path / "out", precision="int8",
                                                calib=tmp_path / "calib.npz", inputs=tmp_path / "inputs.npz",
                                                cache_dir=tmp_path / "cache"))
    assert result.passed, result.failures
    ops = tflite_ops(result.artifact.path)
    assert "FULLY_CONNECTED" in ops and "QUANTIZE" in ops, ops
    assert result.report["quantization"]["outputs"]["quantized"] > 0
    assert any("cut to the static shapes" in note for note in result.report["notes"]) == tokens


@pytest.mark.slow
def test_minilm_int8_for_snapdragon(minilm_exports, polarity_npz, tmp_path):
    """The issue's goal: MiniLM int8 .tflite within cosine 0.99 of the original, at most 25 MB."""
    from edgec.compiler import CompileOptions, compile_model

    shapes = {k: (1, 128) for k in ("input_ids", "attention_mask", "token_type_ids")}
    result = compile_model(minilm_exports["dynamo"], CompileOptions(
        target="snapdragon-8", outdir=tmp_path / "out", precision="int8", calib=polarity_npz.with_name("calib.npz"),
        inputs=polarity_npz, shapes=shapes, cache_dir=tmp_path / "cache"))
    assert result.passed, result.failures
    verification = result.report["verification"]
    assert verification["cosine_min"] >= 0.99 and verification["samples"] == 200, verification
    assert result.artifact.size_bytes <= 25e6
    outputs = result.report["quantization"]["outputs"]
    assert outputs["float"] and outputs["quantized"]  # the residual branches stay float, the rest is int8


def test_npu_aot_is_offered_only_where_asked_and_known(tmp_path):
    from edgec.backends.tflite import aot
    from edgec.compiler import CompileOptions

    model = onnx_graph("g (float[2] x) => (float[2] y)", "y = Relu(x)")
    backend = TFLiteBackend()
    backend.configure(CompileOptions(target="snapdragon-8", npu_aot="off"), print)
    assert "npu_aot" not in backend.emit(model, tmp_path / "off", target=TARGET, precision="fp32").meta
    with pytest.raises(UserError, match="auto or off"):
        backend.configure(CompileOptions(target="snapdragon-8", npu_aot="yes"), print)
    assert "names no Qualcomm SoC" in aot.unavailable_reason(get_target("raspberry-pi-5"))
    assert "npu_aot" not in BACKEND.emit(model, tmp_path / "pi", target=get_target("raspberry-pi-5"), precision="fp32").meta


def test_npu_aot_compiles_where_qualcomm_sdk_is_installed(zoo_model, tmp_path):
    from edgec.backends.tflite import aot

    reason = aot.unavailable_reason(TARGET)
    if reason is not None:
        pytest.skip(reason)
    path = zoo_model("bert", "dynamo")
    model = compile_for_tflite(path, {"input_ids": (1, 16), "attention_mask": (1, 16), "token_type_ids": (1, 16)})
    artifact = emit(model, tmp_path, "fp16")
    assert artifact.meta["npu_aot"]["status"] == "compiled"
    assert (tmp_path / artifact.meta["npu_aot"]["file"]).stat().st_size > 0


def test_inspect_lists_the_nodes_the_backend_cannot_take(tmp_path, capsys):
    import onnx

    from edgec.cli import main

    path = tmp_path / "erf.onnx"
    onnx.save(onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4] x) => (float[N,4] y) { e = Erf(x)\n y = Relu(e) }"""), path)
    assert main(["inspect", str(path), "--target", "snapdragon-8", "--json"]) == 0
    check = json.loads(capsys.readouterr().out)["target"]["backend"]
    assert check["name"] == "tflite" and [p["op"] for p in check["unsupported"].values()] == ["Erf"]
    assert main(["inspect", str(path), "--target", "snapdragon-8", "--backend", "onnxruntime"]) == 0
    assert "the onnxruntime backend takes every node" in capsys.readouterr().out
    assert main(["inspect", str(path), "--target", "snapdragon-8"]) == 0
    assert "nodes the tflite backend cannot take (1)" in capsys.readouterr().out
    assert main(["inspect", str(path), "--target", "snapdragon-8", "--backend", "tvm"]) == 2
    assert "does not use backend 'tvm'" in capsys.readouterr().err
    assert main(["inspect", str(path), "--backend", "tflite"]) == 2
    assert "add --target" in capsys.readouterr().err
