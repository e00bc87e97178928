"""Static input shapes: specialize_inputs, and --shape in the compile."""

import pytest

from edgec import ir as eir
from edgec.analysis.shapes import specialize_inputs
from edgec.compiler import CompileOptions, compile_model, parse_shapes
from edgec.errors import UserError
from edgec.frontends.onnx import load_onnx
from edgec.passes.core import PassContext
from edgec.passes.manager import PassManager
from edgec.testing import graph
from edgec.verify import compare, generate_inputs, run_model

SHAPE_OPS = {"Shape", "ConstantOfShape", "Range", "Expand"}


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_static_inputs_let_cleanup_fold_the_shape_arithmetic(zoo_model, exporter):
    source = zoo_model("bert", exporter)
    model = load_onnx(source)
    names = [v.name for v in model.graph.inputs]
    specialize_inputs(model, {name: (2, 16) for name in names})
    assert all(list(v.shape) == [2, 16] for v in model.graph.inputs)
    PassManager("cleanup", PassContext()).run(model)
    # Every value has a static shape, and no shape arithmetic is left to run.
    assert all(v.shape is not None and all(isinstance(d, int) for d in v.shape) for n in model.graph for v in n.outputs)
    assert not SHAPE_OPS & set(eir.op_histogram(model))
    feeds = generate_inputs(load_onnx(source), batch=2, sequence=16)
    figures = compare(run_model(source, feeds), run_model(model, feeds))
    assert figures["cosine_min"] > 0.99999


def test_only_the_dims_given_change_and_fixed_dims_must_agree():
    m = graph("g (float[N,T,4] x) => (float[N,T,4] y)", "y = Relu(x)")
    specialize_inputs(m, {"x": (1, 7, 4)})
    assert list(m.graph.inputs[0].shape) == [1, 7, 4] and list(m.graph.outputs[0].shape) == [1, 7, 4]


@pytest.mark.parametrize("shapes, words", [
    ({"z": (1, 2, 4)}, "no input named 'z'"),
    ({"x": (1, 2)}, "rank 3"),
    ({"x": (1, 2, 5)}, "has 4 at axis 2"),
    ({"x": (0, 2, 4)}, "at least 1"),
])
def test_shapes_that_do_not_fit_are_refused(shapes, words):
    m = graph("g (float[N,T,4] x) => (float[N,T,4] y)", "y = Relu(x)")
    with pytest.raises(ValueError, match=words):
        specialize_inputs(m, shapes)


def test_shape_text():
    assert parse_shapes(None) is None
    assert parse_shapes(["input_ids=1x128", "attention_mask=1X128,token_type_ids=1x128"]) == {
        "input_ids": (1, 128), "attention_mask": (1, 128), "token_type_ids": (1, 128)}
    for bad in ("input_ids", "input_ids=", "=1x2", "input_ids=1xa", "input_ids=0x4"):
        with pytest.raises(UserError, match="NAME=DIMS"):
            parse_shapes([bad])


def test_shape_for_a_dynamic_backend_is_refused(zoo_model, tmp_path):
    with pytest.raises(UserError, match="keeps the model's dynamic shapes"):
        compile_model(zoo_model("bert", "dynamo"), CompileOptions(target="x86-64", outdir=tmp_path, shapes={"input_ids": (1, 8)}))
    assert not any(tmp_path.iterdir())
