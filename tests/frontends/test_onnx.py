"""The ONNX frontend: every model reaches edgec's one opset with its dynamic dims intact."""

import numpy as np
import onnx
import onnx.helper as h
import pytest

from edgec import ir as eir
from edgec.errors import UserError
from edgec.frontends.onnx import CANONICAL_OPSET, ORIGINAL_OPSET_KEY, load_onnx
from edgec.testing import assert_numerically_equal


def _save(tmp_path, nodes, opsets, name="m.onnx"):
    graph = h.make_graph(
        nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
    )
    path = tmp_path / name
    onnx.save(h.make_model(graph, opset_imports=opsets), str(path))
    return path


def test_old_opset_is_converted_and_keeps_dynamic_dims(tmp_path):
    axes = h.make_node("Constant", [], ["axes"], value=onnx.numpy_helper.from_array(np.array([1], dtype=np.int64)))
    path = _save(tmp_path, [axes, h.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)], [h.make_opsetid("", 13)])
    model = load_onnx(path)
    assert model.opset_imports[""] == CANONICAL_OPSET and model.meta[ORIGINAL_OPSET_KEY] == 13
    assert str(model.graph.inputs[0].shape[0]) == "N" and model.graph.outputs[0].shape is not None
    assert_numerically_equal(eir.load(path), model)


def test_ai_onnx_domain_is_the_default_domain(tmp_path):
    path = _save(tmp_path, [h.make_node("Relu", ["x"], ["y"], domain="ai.onnx")], [h.make_opsetid("ai.onnx", 17)])
    model = load_onnx(path)
    assert dict(model.opset_imports) == {"": CANONICAL_OPSET}
    assert [n.domain for n in model.graph] == [""]


def test_model_without_default_opset_is_user_error(tmp_path):
    path = _save(tmp_path, [h.make_node("Foo", ["x"], ["y"], domain="com.example")], [h.make_opsetid("com.example", 1)])
    with pytest.raises(UserError, match="no default ONNX opset"):
        load_onnx(path)
