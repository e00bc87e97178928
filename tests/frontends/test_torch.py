"""The PyTorch frontend: exports run in onnxruntime, match PyTorch, keep batch/sequence dynamic."""

import json
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import zoo  # noqa: E402  (tests/zoo.py, on sys.path via tests/conftest.py)
from edgec.errors import UserError  # noqa: E402
from edgec.frontends.torch import export_hf_folder, export_module  # noqa: E402


class TinyEncoder(torch.nn.Module):
    """Embedding, masked attention over the sequence, projection: enough to need dynamic batch and sequence."""

    def __init__(self, vocab=50, dim=8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids)
        scores = x @ x.transpose(1, 2) / x.shape[-1] ** 0.5
        scores = scores.masked_fill(attention_mask[:, None, :] == 0, -1e4)
        return self.proj(scores.softmax(-1) @ x)


AXES = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
        "out": {0: "batch", 1: "sequence"}}


def _tokens(batch, seq, vocab=50, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[-1, seq // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _run(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _assert_close(got, want, rtol=1e-4):
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
@pytest.mark.parametrize("as_dict", [True, False], ids=["dict", "tuple"])
def test_export_module_matches_torch_at_two_shapes(tmp_path, exporter, as_dict):
    torch.manual_seed(0)
    module = TinyEncoder().eval()
    example = {k: torch.from_numpy(v) for k, v in _tokens(2, 6).items()}
    inputs = example if as_dict else tuple(example.values())
    path = export_module(module, inputs, tmp_path / "tiny.onnx", exporter=exporter,
                         output_names=["out"], dynamic_axes=AXES)
    assert path == tmp_path / "tiny.onnx"

    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert _dims(graph.input[0]) == ["batch", "sequence"]
    assert [o.name for o in graph.output] == ["out"]
    assert _dims(graph.output[0]) == ["batch", "sequence", 8]
    for batch, seq in [(2, 6), (3, 11)]:
        feeds = _tokens(batch, seq, seed=batch)
        with torch.no_grad():
            want = module(*(torch.from_numpy(v) for v in feeds.values())).numpy()
        (got,) = _run(path, feeds)
        _assert_close(got, want)


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_dict_inputs_follow_the_forward_signature_whatever_the_dict_order(tmp_path, exporter):
    module = TinyEncoder().eval()
    example = {k: torch.from_numpy(v) for k, v in reversed(_tokens(2, 6).items())}
    path = export_module(module, example, tmp_path / "m.onnx", exporter=exporter, output_names=["out"],
                         dynamic_axes=AXES)
    feeds = _tokens(2, 5, seed=3)
    with torch.no_grad():
        want = module(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
    _assert_close(_run(path, feeds)[0], want)


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_default_dynamic_axis_is_batch_and_input_names_apply(tmp_path, exporter):
    module = torch.nn.Linear(4, 3).eval()
    path = export_module(module, (torch.randn(2, 4),), tmp_path / "lin.onnx", exporter=exporter,
                         input_names=["x"], output_names=["y"])
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["x"] and _dims(graph.input[0]) == ["batch", 4]
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    _assert_close(_run(path, {"x": x})[0], want)


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_export_is_quiet(tmp_path, capfd, exporter):
    export_module(TinyEncoder().eval(), {k: torch.from_numpy(v) for k, v in _tokens(2, 6).items()},
                  tmp_path / "q.onnx", exporter=exporter, output_names=["out"], dynamic_axes=AXES)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


class Broken(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("broken on purpose")


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_failed_export_leaves_no_file_and_keeps_the_old_one(tmp_path, exporter):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(Exception, match="broken on purpose"):
        export_module(Broken(), (torch.randn(2, 3),), target, exporter=exporter)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_unknown_exporter_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown exporter"):
        export_module(torch.nn.Linear(2, 2), (torch.randn(2, 2),), tmp_path / "m.onnx", exporter="jit")


def test_missing_torch_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(UserError, match=r"PyTorch is not installed: pip install 'edgec\[torch\]'"):
        export_module(object(), (), tmp_path / "m.onnx")


def test_folder_without_config_is_a_user_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="no config.json"):
        export_hf_folder(tmp_path, tmp_path / "m.onnx")


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        export_hf_folder(tmp_path / "nowhere", tmp_path / "m.onnx")


def test_folder_without_weights_is_a_user_error(tmp_path, minilm_folder):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text((minilm_folder / "config.json").read_text())
    with pytest.raises(UserError, match="no model weights"):
        export_hf_folder(folder, tmp_path / "m.onnx")


def test_folder_with_broken_weights_is_a_user_error(tmp_path, minilm_folder):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text((minilm_folder / "config.json").read_text())
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot load the model"):
        export_hf_folder(folder, tmp_path / "m.onnx")


def test_unknown_model_type_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="cannot load the model"):
        export_hf_folder(tmp_path, tmp_path / "m.onnx")


@pytest.mark.slow
def test_export_hf_folder_minilm_matches_torch(tmp_path, minilm_folder):
    from transformers import AutoModel, AutoTokenizer

    path = export_hf_folder(minilm_folder, tmp_path / "minilm.onnx", exporter="torchscript")
    graph = onnx.load(str(path), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in graph.output] == ["last_hidden_state"]
    assert _dims(graph.output[0]) == ["batch", "sequence", 384]

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder, local_files_only=True)
    sentences = ["A tiny sentence.", "Edge hardware runs transformers with a little help from a compiler.",
                 "Three rows and a longer sequence than the export example had."]
    feeds = {k: v.astype(np.int64) for k, v in tokenizer(sentences, padding=True, return_tensors="np").items()}
    assert feeds["input_ids"].shape[1] != 16  # not the export's example shape
    model = AutoModel.from_pretrained(minilm_folder, local_files_only=True).eval()
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    (got,) = _run(path, {i.name: feeds[i.name] for i in graph.input})
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


ZOO_CASES = [
    pytest.param(arch, exporter, marks=[pytest.mark.xfail(reason=zoo.KNOWN_EXPORT_FAILURES[arch, exporter],
                                                          strict=True)]
                 if (arch, exporter) in zoo.KNOWN_EXPORT_FAILURES else [])
    for arch in zoo.ARCHS for exporter in zoo.EXPORTERS
]


@pytest.mark.slow
@pytest.mark.parametrize("arch,exporter", ZOO_CASES)
def test_zoo_export_runs_in_onnxruntime_and_matches_torch(zoo_model, arch, exporter):
    path = zoo_model(arch, exporter)
    graph = onnx.load(str(path), load_external_data=False).graph
    for value in graph.input:
        dims = _dims(value)
        assert dims[0] == "batch", (value.name, dims)
        if value.name != "pixel_values":
            assert dims[1] == "sequence", (value.name, dims)
    assert [o.name for o in graph.output] == ["last_hidden_state"]
    # The export's example was batch 2, sequence 16: also run another shape.
    for batch, seq in [(2, 16), (3, 9)]:
        feeds = zoo.zoo_inputs(arch, path, batch=batch, seq_len=seq, seed=batch)
        want = zoo.zoo_reference(arch, feeds)
        (got,) = _run(path, feeds)
        assert got.shape == want.shape
        assert float(np.abs(want).max()) > 1e-3, "random weights gave a vacuous (all ~0) output"
        _assert_close(got, want)


def _two_weight_model():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("one_file", [True, False], ids=["dynamo-style", "torchscript-style"])
def test_publish_moves_external_weights_into_one_data_file(tmp_path, one_file):
    from edgec.frontends.torch import _publish

    scratch, dest = tmp_path / "scratch", tmp_path / "out" / "m.onnx"
    scratch.mkdir()
    dest.parent.mkdir()
    model = _two_weight_model()
    x = np.ones((2, 64), dtype=np.float32)
    want = _run_proto(model, x)
    onnx.save(model, str(scratch / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=one_file,
              location="m.onnx.data" if one_file else None, size_threshold=0)
    _publish(scratch / "m.onnx", dest)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    np.testing.assert_array_equal(_run(dest, {"x": x})[0], want)


def test_publish_removes_a_stale_data_file(tmp_path):
    from edgec.frontends.torch import _publish

    (tmp_path / "scratch").mkdir()
    onnx.save(_two_weight_model(), str(tmp_path / "scratch" / "m.onnx"))
    (tmp_path / "m.onnx.data").write_bytes(b"weights of an older, larger export")
    _publish(tmp_path / "scratch" / "m.onnx", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx.data").exists()


def _run_proto(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_checkpoint_missing_the_head_weights_is_a_user_error(tmp_path, minilm_folder):
    """A head the checkpoint lacks would be exported as random numbers: refuse, naming the weights."""
    folder = tmp_path / "model"
    folder.mkdir()
    config = json.loads((minilm_folder / "config.json").read_text())
    config["architectures"] = ["BertForSequenceClassification"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").symlink_to(minilm_folder / "model.safetensors")
    with pytest.raises(UserError, match="classifier.bias"):
        export_hf_folder(folder, tmp_path / "m.onnx")


def test_head_model_folder_exports_logits(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=3)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "model")
    path = export_hf_folder(tmp_path / "model", tmp_path / "cls.onnx", exporter="torchscript")
    graph = onnx.load(str(path)).graph
    assert [o.name for o in graph.output] == ["logits"] and _dims(graph.output[0]) == ["batch", 3]
    feeds = _tokens(3, 7, vocab=64)
    feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    _assert_close(_run(path, feeds)[0], want)
