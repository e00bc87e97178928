"""Approximate passes in a compile: measured on the calibration data, refused beyond the budget."""

import numpy as np
import onnx_ir as ir

from edgec import ir as eir
from edgec.analysis.attention import _values_by_name, find_attention
from edgec.compiler import CompileOptions, compile_model
from edgec.frontends.onnx import load_onnx
from edgec.ir.constants import constant_array
from edgec.passes.core import PassContext
from edgec.passes.manager import PassManager

PIPELINE = "cleanup,sliding-window-attention{window=4}"


def _model_with_sharp_attention(zoo_model, tmp_path):
    """The zoo BERT with every attention weight x8: random-weight attention is nearly uniform and adds
    about 1% to the output, too little for a window to change the output enough to test a budget."""
    model = load_onnx(zoo_model("bert", "torchscript"))
    PassManager("cleanup", PassContext()).run(model)  # the analysis reads cleaned graphs
    values = _values_by_name(model)
    blocks = find_attention(model).blocks
    assert len(blocks) == 2
    for block in blocks:
        for p in (block.q, block.k, block.v, block.o):
            values[p.weight].const_value = ir.tensor(constant_array(values[p.weight]) * 8, name=p.weight)
    return eir.save(model, tmp_path / "sharp.onnx")


def _calibration(tmp_path, sequence=16):
    rng = np.random.default_rng(0)
    path = tmp_path / "calib.npz"
    np.savez(path, input_ids=rng.integers(1, 250, (4, sequence)), attention_mask=np.ones((4, sequence), np.int64),
             token_type_ids=np.zeros((4, sequence), np.int64))
    return path


def test_window_beyond_budget_is_refused_on_calibration_data(zoo_model, tmp_path):
    source = _model_with_sharp_attention(zoo_model, tmp_path)
    calib = _calibration(tmp_path)
    result = compile_model(source, CompileOptions(target="x86-64", outdir=tmp_path / "out", pipeline=PIPELINE, calib=calib))
    assert not result.passed and result.artifact is None
    assert not (tmp_path / "out" / "model.onnx").exists()
    (failure,) = result.failures
    assert failure.startswith("sliding-window-attention{window=4} breaks the accuracy budget on " + str(calib))
    verification = result.report["verification"]
    assert verification["inputs"] == str(calib) and verification["approximate_passes"] == ["sliding-window-attention{window=4}"]
    assert verification["cosine_min"] < 0.9999


def test_window_within_a_wider_budget_is_published(zoo_model, tmp_path):
    source = _model_with_sharp_attention(zoo_model, tmp_path)
    options = CompileOptions(target="x86-64", outdir=tmp_path / "out", pipeline=PIPELINE, calib=_calibration(tmp_path),
                             tolerance="min_cosine=0.5,min_sqnr_db=0")
    result = compile_model(source, options)
    assert result.passed, result.failures
    assert (tmp_path / "out" / "model.onnx").exists()
    # The window is really there: what was verified is not exact attention.
    assert result.report["verification"]["cosine_min"] < 0.99999


def test_window_wider_than_the_data_is_exact(zoo_model, tmp_path):
    source = _model_with_sharp_attention(zoo_model, tmp_path)
    options = CompileOptions(target="x86-64", outdir=tmp_path / "out", pipeline="cleanup,sliding-window-attention{window=16}",
                             calib=_calibration(tmp_path))
    result = compile_model(source, options)
    assert result.passed, result.failures
