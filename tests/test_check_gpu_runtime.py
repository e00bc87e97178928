"""tools/check_gpu_runtime.py: artifacts prepared here, run on a named onnxruntime provider there."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "check_gpu_runtime.py"


def _tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=600)


def test_prepared_artifacts_run_on_the_provider_named_and_are_compared(zoo_model, tmp_path):
    zoo_model("bert", "torchscript")  # exported (cached) here, where torch is
    prepared = _tool("prepare", tmp_path, "--models", "bert-torchscript")
    assert prepared.returncode == 0, prepared.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["bert-torchscript-fp32", "bert-torchscript-int8"]
    ran = _tool("run", tmp_path, "--provider", "CPUExecutionProvider")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    rows = [line.split() for line in ran.stdout.splitlines() if line.startswith("bert-torchscript")]
    assert [row[1] for row in rows] == ["fp32", "int8"]
    assert all(float(row[4]) >= 0.99 and row[3] == "CPUExecutionProvider" for row in rows)
    # Without the provider (no GPU build here) it says so and fails.
    missing = _tool("run", tmp_path, "--provider", "NoSuchExecutionProvider")
    assert missing.returncode == 1 and "install onnxruntime-gpu" in missing.stdout
