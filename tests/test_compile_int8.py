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
    assert result.report["sizes"]["artifact_bytes"] < result.report["sizes"]["original_bytes"]
    # A second compile reads the calibration statistics from the cache.
    again = compile_model(source, CompileOptions(target="x86-64", outdir=tmp_path / "again", cache_dir=tmp_path / "cache",
                                                 precision="int8", calib=calib, calib_method="mse"))
    assert again.report["quantization"]["calibration"]["cache"] == "hit"
    assert json.loads(again.report_path.read_text())["quantization"]["calibration"]["method"] == "mse"


def test_mixed_compile_meets_its_budget_and_explains_the_choice(zoo_model, tmp_path):
    result = compile_model(zoo_model("bert", "dynamo"),
                           _options(tmp_path, precision="mixed", calib=_calibration(tmp_path), accuracy_budget=0.9999))
    assert result.passed, result.failures
    q = result.report["quantization"]
    assert q["assignment"]["cosine_mean"] >= 0.9999
    layers = q["layers"]
    assert {row["precision"] for row in layers} <= {"int8", "fp32"} and len(layers) == q["assignment"]["float_ops"] + q["assignment"]["int8_ops"]
    floats = [row for row in layers if row["precision"] == "fp32"]
    ints = [row for row in layers if row["precision"] == "int8"]
    # The ops kept in float are the most sensitive ones.
    if floats and ints:
        assert min(r["sensitivity"] for r in floats) >= max(r["sensitivity"] for r in ints)


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
