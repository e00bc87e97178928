"""The IR layer: loading bad files, atomic saves, external data, invariants, clone, graph-surgeon interop."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from edgec import ir as eir
from edgec.errors import UserError
from edgec.ir.graphsurgeon import from_graphsurgeon, graphsurgeon_pass, to_graphsurgeon
from edgec.passes.core import PassContext
from edgec.testing import assert_numerically_equal, parse

MODEL = """
<ir_version: 10, opset_import: ["" : 20]>
g (float[N,4] x) => (float[N,4] y) <float[4] w = {1.0, 2.0, 3.0, 4.0}> {
  a = Mul(x, w)
  y = Relu(a)
}
"""


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "m.onnx"
    eir.save(parse(MODEL), path)
    return path


def test_load_round_trip(model_file):
    model = eir.load(model_file)
    assert [n.op_type for n in model.graph] == ["Mul", "Relu"]
    eir.verify(model)


@pytest.mark.parametrize(
    "content, words",
    [(None, "does not exist"), (b"", "empty"), (b"\x00\xffnot a model at all" * 10, "not a readable ONNX")],
)
def test_bad_files_are_user_errors(tmp_path, content, words):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=words):
        eir.load(path)


def test_truncated_file_is_user_error(model_file, tmp_path):
    data = model_file.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError):
        eir.load(cut)
    assert model_file.read_bytes() == data


def _model_with_big_weight() -> ir.Model:
    """Relu(x * w) with a 4 KB weight: big enough that onnx-ir moves it to the side file."""
    w = np.arange(1024, dtype=np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Mul", ["x", "w"], ["a"]), onnx.helper.make_node("Relu", ["a"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1024])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 1024])],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    return ir.from_proto(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)]))


def test_missing_external_data_is_user_error(tmp_path):
    path = tmp_path / "ext.onnx"
    eir.save(_model_with_big_weight(), path, external_data=True)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(UserError, match="missing"):
        eir.load(path)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, model_file):
    before = model_file.read_bytes()
    eir.save(parse(MODEL), model_file)
    assert model_file.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_save_to_unwritable_folder_is_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write"):
        eir.save(parse(MODEL), blocker / "sub" / "m.onnx")


def test_large_models_use_external_data(tmp_path, monkeypatch):
    # Stand-in for a >2 GB model: lower the threshold instead of allocating gigabytes.
    monkeypatch.setattr(eir, "EXTERNAL_DATA_THRESHOLD", 8)
    path = eir.save(_model_with_big_weight(), tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()
    proto = onnx.load(str(path), load_external_data=False)
    assert proto.graph.initializer[0].data_location == onnx.TensorProto.EXTERNAL
    loaded = eir.load(path)
    np.testing.assert_array_equal(loaded.graph.initializers["w"].const_value.numpy(), np.arange(1024))
    assert eir.file_bytes(path) > path.stat().st_size
    assert_numerically_equal(_model_with_big_weight(), loaded)


def test_clone_is_independent():
    model = parse(MODEL)
    copy = eir.clone(model)
    node = next(iter(copy.graph))
    node.op_type = "Add"
    assert [n.op_type for n in model.graph] == ["Mul", "Relu"]


def test_verify_finds_broken_invariants():
    model = parse(MODEL)
    mul, relu = list(model.graph)
    model.graph.remove(mul, safe=False)  # relu now reads a value nothing produces
    with pytest.raises(eir.VerificationError, match="nothing defines"):
        eir.verify(model)


def test_verify_finds_wrong_order():
    model = parse(MODEL)
    mul, relu = list(model.graph)
    model.graph.remove(relu)
    model.graph.insert_before(mul, relu)
    with pytest.raises(eir.VerificationError, match="before it is produced"):
        eir.verify(model)


def test_verify_finds_unimported_domain():
    model = parse(MODEL)
    next(iter(model.graph)).domain = "com.example"
    with pytest.raises(eir.VerificationError, match="does not import"):
        eir.verify(model)


def test_graphsurgeon_round_trip():
    model = parse(MODEL)
    back = from_graphsurgeon(to_graphsurgeon(model), template=model)
    assert eir.structure_key(back) == eir.structure_key(model)


def test_users_graphsurgeon_function_runs_as_a_pass():
    def relu_to_sigmoid(graph):
        """Swap Relu for Sigmoid, the way a user's existing script would."""
        for node in graph.nodes:
            if node.op == "Relu":
                node.op = "Sigmoid"
        return graph

    SwapPass = graphsurgeon_pass("swap-relu", relu_to_sigmoid)
    assert SwapPass.name == "swap-relu" and "Swap Relu" in SwapPass.summary()
    result = SwapPass()(parse(MODEL), PassContext())
    assert result.modified
    assert [n.op_type for n in result.model.graph] == ["Mul", "Sigmoid"]
    again = SwapPass()(result.model, PassContext())
    assert not again.modified
