import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgec import ir as eir
from edgec.passes.fuse.residual_sum import ResidualSumPass
from edgec.testing import check_pass, graph, output_names, run_pass

SIGNATURE = "g (float[N,S,4] x, float[N,S,4] r) => (float[N,S,4] y)"
INITS = "float[4] g = {1, 0.5, 2, 1}, float[4] b = {0, 0.1, -0.2, 0.3}"
NORM = "y = LayerNormalization <axis = -1, epsilon = 1e-5> (s, g, b)"


def feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((2, 3, 4)).astype(np.float32), "r": rng.standard_normal((2, 3, 4)).astype(np.float32)}


def session_ops(model) -> list[str]:
    """The ops onnxruntime runs after its own session optimizations (ORT_ENABLE_ALL)."""
    with tempfile.TemporaryDirectory() as folder:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        ort.InferenceSession(eir.to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]


def test_residual_add_before_layer_norm_becomes_sum():
    before = graph(SIGNATURE, "s = Add(x, r)\n" + NORM, INITS)
    expected = graph(SIGNATURE, "s = Sum(x, r)\n" + NORM, INITS)
    result = check_pass(ResidualSumPass(), before, expected, feeds=feeds())
    assert result.stats == {"residual_adds_summed": 1}
    # What the rewrite is for: onnxruntime fuses the Add into SkipLayerNormalization, not the Sum.
    assert session_ops(before) == ["SkipLayerNormalization"]
    assert session_ops(result.model) == ["Sum", "LayerNormalization"]


def test_sum_read_by_the_next_residual_branch_too():
    # Pre-LN blocks (GPT-2, ViT): the residual sum is normalized and also carried on.
    signature = "g (float[N,S,4] x, float[N,S,4] r) => (float[N,S,4] y, float[N,S,4] z)"
    before = graph(signature, "s = Add(x, r)\n" + NORM + "\n z = Add(s, y)", INITS)
    expected = graph(signature, "s = Sum(x, r)\n" + NORM + "\n z = Add(s, y)", INITS)
    check_pass(ResidualSumPass(), before, expected, feeds=feeds())


def test_sum_that_is_a_graph_output_keeps_its_name():
    signature = "g (float[N,S,4] x, float[N,S,4] r) => (float[N,S,4] y, float[N,S,4] s)"
    before = graph(signature, "s = Add(x, r)\n" + NORM, INITS)
    result = check_pass(ResidualSumPass(), before, graph(signature, "s = Sum(x, r)\n" + NORM, INITS), feeds=feeds())
    assert output_names(result.model) == ["y", "s"]


@pytest.mark.parametrize("body", [
    "s = Add(x, b)\n y = LayerNormalization <axis = -1> (s, g, b)",  # a bias: a constant operand
    "s = Add(x, r)\n y = Relu(s)",  # no norm reads it
    "s = Mul(x, r)\n" + NORM,  # not an Add
])
def test_left_alone(body):
    check_pass(ResidualSumPass(), graph(SIGNATURE, body, INITS), None, feeds=feeds())


def test_bfloat16_add_is_left_alone():
    # onnxruntime's CPU Sum has no bfloat16 kernel; the Add stays as the exporter wrote it.
    signature = "g (bfloat16[N,S,4] x, bfloat16[N,S,4] r) => (bfloat16[N,S,4] y)"
    inits = "bfloat16[4] g = {1, 1, 1, 1}, bfloat16[4] b = {0, 0, 0, 0}"
    assert not run_pass(ResidualSumPass(), graph(signature, "s = Add(x, r)\n" + NORM, inits)).modified
