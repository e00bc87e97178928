"""The real model: all-MiniLM-L6-v2 (shipped offline) through `edgec compile --target x86-64`,
both exporters, verified on the 200 labelled polarity sentences from gensim's test data."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import zoo
from edgec.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def minilm_exports(minilm_folder):
    """Both exports via tools/export_minilm.py (what `make demo` runs), cached with the zoo."""
    pytest.importorskip("torch")
    out = zoo.cache_dir() / "minilm"
    paths = {e: out / f"minilm-{e}.onnx" for e in ("torchscript", "dynamo")}
    out.mkdir(parents=True, exist_ok=True)
    with zoo._lock(out / "export.lock"):
        if not all(p.exists() for p in paths.values()):
            subprocess.run([sys.executable, str(ROOT / "tools/export_minilm.py"), "--out", str(out)], check=True)
    return paths


@pytest.fixture(scope="session")
def polarity_npz(tmp_path_factory):
    pytest.importorskip("gensim")
    out = tmp_path_factory.mktemp("data")
    subprocess.run([sys.executable, str(ROOT / "tools/prepare_data.py"), "--out", str(out)], check=True)
    with np.load(out / "polarity.npz") as data:
        assert data["input_ids"].shape[0] == 200 and set(np.unique(data["labels"])) == {0, 1}
    return out / "polarity.npz"


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
