"""`edgec compile --precision int8|mixed`: calibration, QDQ, mixed precision, and the bad input around them."""

import json

import numpy as np
import pytest

from edgec.compiler import CompileOptions, compile_model
from edgec.errors import UserError
from edgec.frontends.onnx import load_onnx
from edgec.verify import run_model


def _calibration(tmp_path, samples=16, sequence=16, name="calib.npz", **overrides):
    rng = np.random.default_rng(0)
    arrays = dict(input_ids=rng.integers(1, 250, (samples, sequence)), attention_mask=np.ones((samples, sequence), np.int64),
                  token_type_ids=np.zeros((samples, sequence), np.int64))
    arrays.update(overrides)
    np.savez(tmp_path / name, **arrays)
    return tmp_path / name


def _options(tmp_path, **kw):
    return CompileOptions(target="x86-64", outdir=tmp_path / "out", cache_dir=tmp_path / "cache", **kw)


def test_int8_compile_writes_a_qdq_model_that_onnxruntime_runs(zoo_model, tmp_path):
    source = zoo_model("bert", "dynamo")
    calib = _calibration(tmp_path)
    result = compile_model(source, _options(tmp_path, precision="int8", calib=calib))
    assert result.passed, result.failures
    model = load_onnx(result.artifact.path)
    ops = {n.op_type for n in model.graph}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # Attention was lowered to MatMuls so that they are quantized too; the fused op would run in float.
    assert not any(n.domain == "com.microsoft" and n.op_type == "Attention" for n in model.graph)
    q = result.report["quantization"]
    assert q["scheme"]["activations"] == "uint8" and q["calibration"]["samples"] == 16
    assert q["calibration"]["cache"] == "miss" and q["calibration"]["method"] == "minmax"
    stats = next(r["stats"] for r in result.report["passes"] if r["pass"] == "insert-qdq")
    assert stats["attention_matmuls"] == 4 and stats["embeddings_quantized"] == 3
    # Then the form onnxruntime's CPU kernels run best: integer MatMuls reading the int8 weights (2 layers
    # x Q, K, V, O, FFN up, FFN down; this random model's biases are zero, cleanup removed them), the
    # embedding rows dequantized by Cast and Mul, the residual Adds before the 5 LayerNorms (embeddings,
    # 2 per layer) written as Sum so that onnxruntime keeps them out of its slow SkipLayerNormalization.
    after = {r["pass"]: r["stats"] for r in result.report["passes"]}
    assert after["fuse-integer-matmul"] == {"matmuls_fused": 12, "biases_fused": 0}
    assert after["expand-dequantize"] == {"dequantizes_expanded": 3}
    assert after["residual-sum"] == {"residual_adds_summed": 5}
    assert "approximate-gelu" in after  # whether a GELU qualifies depends on its calibrated step
    assert sum(n.op_type == "MatMulIntegerToFloat" for n in model.graph) == 12
    assert result.report["sizes"]["artifact_bytes"] < result.report["sizes"]["original_bytes"]
    # Smoothing was measured for every LayerNorm/GELU/attention output read by MatMuls; the ones it
    # helps are smoothed by the smooth-quant pass, each with its alpha.
    smoothing = q["smoothing"]
    assert len(smoothing["activations"]) == 2 * 4  # 2 layers: LayerNorm x2, GELU, attention output
    chosen = [row for row in smoothing["activations"] if row["alpha"] is not None]
    assert smoothing["smoothed"] == len(chosen) and all(row["error_after"] < row["error_before"] for row in chosen)
    smooth_runs = [r for r in result.report["passes"] if r["pass"] == "smooth-quant"]
    assert (smooth_runs[0]["stats"]["activations_smoothed"] if smooth_runs else 0) == len(chosen)
    # A second compile reads the calibration statistics from the cache.
    again = compile_model(source, CompileOptions(target="x86-64", outdir=tmp_path / "again", cache_dir=tmp_path / "cache",
                                                 precision="int8", calib=calib, calib_method="mse"))
    assert again.report["quantization"]["calibration"]["cache"] == "hit"
    assert json.loads(again.report_path.read_text())["quantization"]["calibration"]["method"] == "mse"


def test_smoothing_can_be_turned_off(zoo_model, tmp_path):
    result = compile_model(zoo_model("bert", "dynamo"), _options(tmp_path, precision="int8", calib=_calibration(tmp_path), smooth=False))
    assert result.passed, result.failures
    assert result.report["quantization"]["smoothing"] is None
    assert not any(r["pass"] == "smooth-quant" for r in result.report["passes"])
    assert not any(n.op_type == "Mul" and "edgec.smooth_quant" in n.metadata_props for n in load_onnx(result.artifact.path).graph)


def test_mixed_compile_meets_its_budget_and_explains_the_choice(zoo_model, tmp_path):
    result = compile_model(zoo_model("bert", "dynamo"),
                           _options(tmp_path, precision="mixed", calib=_calibration(tmp_path), accuracy_budget=0.9999))
    assert result.passed, result.failures
    q = result.report["quantization"]
    assert q["assignment"]["cosine_mean"] >= 0.9999
    layers = q["layers"]
    assert {row["precision"] for row in layers} <= {"int8", "fp32"} and len(layers) == q["assignment"]["float_ops"] + q["assignment"]["int8_ops"]
    assert q["assignment"]["ladder"] == ["int8", "fp32"]  # x86-64 has no int16 or fp16 arithmetic
    floats = [row for row in layers if row["precision"] == "fp32"]
    ints = [row for row in layers if row["precision"] == "int8"]
    # The ops kept in float are the most sensitive ones.
    if floats and ints:
        assert min(r["sensitivity"] for r in floats) >= max(r["sensitivity"] for r in ints)


def test_int8_for_x86_without_vnni_stores_7bit_weights(zoo_model, tmp_path):
    options = CompileOptions(target="x86-64-avx2", outdir=tmp_path / "out", cache_dir=tmp_path / "cache",
                             precision="int8", calib=_calibration(tmp_path))
    result = compile_model(zoo_model("bert", "dynamo"), options)
    assert result.passed, result.failures
    assert result.report["quantization"]["scheme"]["weights"] == "int7 symmetric per-channel"
    model = load_onnx(result.artifact.path)
    # onnxruntime's integer MatMuls read the int8 weights directly (fuse-integer-matmul)
    matmul_weights = [n.inputs[1].const_value.numpy() for n in model.graph if n.op_type == "MatMulIntegerToFloat"]
    assert matmul_weights and max(int(np.abs(w).max()) for w in matmul_weights) == 63


def test_mixed_for_snapdragon_climbs_the_npu_ladder(zoo_model, tmp_path):
    # Hexagon's HTP runs int8, A16W8 and fp16: an op int8 cannot hold tries int16, then fp16, then float.
    options = CompileOptions(target="snapdragon-8", backend="onnxruntime", outdir=tmp_path / "out", cache_dir=tmp_path / "cache",
                             precision="mixed", calib=_calibration(tmp_path), accuracy_budget=0.999999)
    result = compile_model(zoo_model("bert", "dynamo"), options)
    assert result.passed, result.failures
    a, layers = result.report["quantization"]["assignment"], result.report["quantization"]["layers"]
    assert a["ladder"] == ["int8", "int16", "fp16", "fp32"] and a["cosine_mean"] >= 0.999999
    assert sum(a["ops"].values()) == len(layers) and a["ops"]["int8"] == a["int8_ops"]
    assert a["ops"]["int8"] > 0 and a["ops"]["int16"] + a["ops"]["fp16"] > 0  # the budget needs more than int8 here
    for row in layers:  # measured at every rung up to the one it got, and no higher
        rungs = a["ladder"][:a["ladder"].index(row["precision"]) + 1]
        expected = [r for r in rungs if r != "fp32" and not (r == "int16" and row["kind"] == "embedding")]
        assert list(row["sensitivities"]) == expected
    (run,) = [r for r in result.report["passes"] if r["pass"].startswith("insert-qdq")]
    assert run["pass"].startswith("insert-qdq{")  # the record names the wide/half ops
    stats = run["stats"]
    assert (stats["ops_int16"], stats["ops_fp16"]) == (a["ops"]["int16"], a["ops"]["fp16"])
    model = load_onnx(result.artifact.path)
    sixteen = [n for n in model.graph if n.op_type == "QuantizeLinear" and n.outputs[0].dtype.itemsize == 2]
    assert bool(sixteen) == (a["ops"]["int16"] > 0)
    halves = [n for n in model.graph if n.op_type in ("MatMul", "Gemm", "Gather") and n.outputs[0].dtype.name == "FLOAT16"]
    assert len(halves) == a["ops"]["fp16"]


def _classifier(tmp_path):
    """A 4-class classifier of 8 features (two MatMuls), its calibration data, and labelled
    evaluation data whose labels are the float model's own answers on a margin that int8 can flip."""
    from edgec import ir as eir
    from edgec.testing import graph
    import onnx_ir as ir

    rng = np.random.default_rng(3)
    zeros = lambda n: "{" + ",".join(["0"] * n) + "}"  # noqa: E731
    m = graph("g (float[N,8] x) => (float[N,4] logits)", "h = MatMul(x, w1)\n logits = MatMul(h, w2)",
              f"float[8,16] w1 = {zeros(128)}, float[16,4] w2 = {zeros(64)}")
    m.graph.initializers["w1"].const_value = ir.tensor(rng.standard_normal((8, 16)).astype(np.float32))
    m.graph.initializers["w2"].const_value = ir.tensor(rng.standard_normal((16, 4)).astype(np.float32))
    path = eir.save(m, tmp_path / "classifier.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((32, 8)).astype(np.float32))
    x = rng.standard_normal((200, 8)).astype(np.float32)
    labels = np.argmax(run_model(path, {"x": x})["logits"], axis=-1)
    np.savez(tmp_path / "eval.npz", x=x, labels=labels)
    return path, tmp_path / "calib.npz", tmp_path / "eval.npz"


def test_mixed_top1_budget_is_checked_on_the_labelled_data(tmp_path):
    source, calib, evaluation = _classifier(tmp_path)
    result = compile_model(source, _options(tmp_path, precision="mixed", calib=calib, eval=evaluation, metric="top1",
                                            accuracy_budget=0.0))
    assert result.passed, result.failures
    a = result.report["quantization"]["assignment"]
    assert a["metric"] == "top1" and a["budget"] == 0.0 and a["samples"] == 200 and a["data"] == str(evaluation)
    assert a["float_value"] == 1.0 and a["value"] == 1.0  # lose nothing: the labels are the float answers
    # The artifact computes that: every label kept.
    x, labels = (np.load(evaluation)[k] for k in ("x", "labels"))
    out = run_model(result.artifact.path, {"x": x})["logits"]
    assert np.mean(np.argmax(out, axis=-1) == labels) == 1.0
    # A generous budget quantizes everything.
    loose = compile_model(source, CompileOptions(target="x86-64", outdir=tmp_path / "loose", cache_dir=tmp_path / "cache",
                                                 precision="mixed", calib=calib, eval=evaluation, metric="top1",
                                                 accuracy_budget=0.5))
    assert loose.report["quantization"]["assignment"]["float_ops"] == 0
    assert loose.report["quantization"]["assignment"]["value"] < 1.0  # all-int8 flips labels: the strict budget mattered


@pytest.mark.parametrize("kwargs, words", [
    (dict(precision="mixed", metric="top5"), ["unknown metric", "top1"]),
    (dict(precision="mixed", metric="top1"), ["needs labelled data", "--eval"]),
    (dict(precision="int8", accuracy_budget=0.99), ["choose mixed precision", "--precision mixed"]),
    (dict(precision="mixed", accuracy_budget=1.5), ["not a cosine", "0.999"]),
    (dict(precision="mixed", metric="top1", accuracy_budget=1.0, eval="eval.npz"), ["not a top-1 drop", "0.01"]),
])
def test_bad_budget_options_are_refused_before_anything_runs(zoo_model, tmp_path, kwargs, words):
    if "eval" in kwargs:
        kwargs["eval"] = tmp_path / kwargs["eval"]
    with pytest.raises(UserError) as err:
        compile_model(zoo_model("bert", "dynamo"), _options(tmp_path, calib=_calibration(tmp_path), **kwargs))
    assert all(w in str(err.value) for w in words), str(err.value)


def test_top1_needs_labels_and_a_classifier(zoo_model, tmp_path):
    source, calib, evaluation = _classifier(tmp_path)
    np.savez(tmp_path / "unlabelled.npz", x=np.load(evaluation)["x"])
    with pytest.raises(UserError, match="no array 'labels'"):
        compile_model(source, _options(tmp_path, precision="mixed", calib=calib, eval=tmp_path / "unlabelled.npz", metric="top1"))
    np.savez(tmp_path / "short.npz", x=np.load(evaluation)["x"], labels=np.zeros(3, np.int64))
    with pytest.raises(UserError, match="not 200 integer classes"):
        compile_model(source, _options(tmp_path, precision="mixed", calib=calib, eval=tmp_path / "short.npz", metric="top1"))
    # A model whose output is not [batch, classes] has no top-1.
    tokens = _calibration(tmp_path, name="tokens.npz")
    np.savez(tmp_path / "tokens_labelled.npz", **dict(np.load(tokens)), labels=np.zeros(16, np.int64))
    with pytest.raises(UserError, match=r"\[batch, classes\]"):
        compile_model(zoo_model("bert", "dynamo"), _options(tmp_path, precision="mixed", calib=tokens,
                                                            eval=tmp_path / "tokens_labelled.npz", metric="top1"))


@pytest.mark.parametrize("kwargs, words", [
    (dict(precision="int8"), ["needs calibration data", "--calib"]),
    (dict(precision="int8", calib_method="magic"), ["calibration method", "minmax"]),
])
def test_quantizing_without_what_it_needs_is_refused(zoo_model, tmp_path, kwargs, words):
    if "calib_method" in kwargs:
        kwargs["calib"] = _calibration(tmp_path)
    with pytest.raises(UserError) as err:
        compile_model(zoo_model("bert", "dynamo"), _options(tmp_path, **kwargs))
    assert all(w in str(err.value) for w in words)


def test_too_few_calibration_samples_are_refused(zoo_model, tmp_path):
    with pytest.raises(UserError, match="has 3 samples"):
        compile_model(zoo_model("bert", "dynamo"), _options(tmp_path, precision="int8", calib=_calibration(tmp_path, samples=3)))


def test_calibration_data_that_does_not_fit_is_refused(zoo_model, tmp_path):
    calib = tmp_path / "wrong.npz"
    np.savez(calib, tokens=np.ones((16, 8), np.int64))
    with pytest.raises(UserError):
        compile_model(zoo_model("bert", "dynamo"), _options(tmp_path, precision="int8", calib=calib))
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_padding_positions_are_not_compared(zoo_model, tmp_path):
    # The int8 model's outputs at padded tokens are not part of the comparison: changing them
    # cannot change the verification figures.
    from edgec.verify import compare, token_mask

    source = zoo_model("bert", "dynamo")
    feeds = dict(np.load(_calibration(tmp_path, samples=2)))
    feeds["attention_mask"][0, -4:] = 0
    reference = run_model(load_onnx(source), feeds)
    noisy = {k: v.copy() for k, v in reference.items()}
    noisy["last_hidden_state"][0, -4:] += 100.0
    assert compare(reference, noisy, token_mask(feeds))["cosine_min"] == pytest.approx(1.0)
    assert compare(reference, noisy)["cosine_min"] < 0.9
