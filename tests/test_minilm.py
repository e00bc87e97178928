"""The real model: all-MiniLM-L6-v2 (shipped offline) through `edgec compile --target x86-64`,
both exporters, verified on the 200 labelled polarity sentences from gensim's test data."""

import json
from pathlib import Path

import pytest

from edgec.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_minilm_compiles_for_x86_64(exporter, minilm_exports, polarity_npz, tmp_path, capsys):
    src = minilm_exports[exporter]
    out = tmp_path / "out"
    rc = main(["compile", str(src), "--target", "x86-64", "-o", str(out), "--inputs", str(polarity_npz)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    v, s = report["verification"], report["sizes"]
    assert v["samples"] == 200 and v["cosine_min"] >= 0.99999 and v["cosine_mean"] >= 0.99999, v
    assert s["final_nodes"] < s["original_nodes"], s
    assert s["artifact_bytes"] <= s["original_bytes"] * 1.01
    passes = {p["pass"]: p for p in report["passes"]}
    assert passes["fold-constants"]["modified"] or passes["simplify-shapes"]["modified"]


@pytest.mark.slow
def test_compile_takes_a_hugging_face_folder(minilm_folder, tmp_path, capsys):
    """MODEL may be the model folder itself: edgec exports it (offline) and compiles the export."""
    out = tmp_path / "out"
    rc = main(["compile", str(minilm_folder), "--target", "x86-64", "-o", str(out), "--exporter", "torchscript"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["passed"] and report["sizes"]["final_nodes"] < report["sizes"]["original_nodes"]
    assert report["verification"]["second_shape"]["cosine_min"] >= 0.99999
    assert report["verification"]["export_vs_pytorch"]["cosine_min"] >= 0.99999
    assert not list(minilm_folder.glob("*.onnx")), "the export must not be written into the model folder"
