"""Plugins through real entry points: a separately installed distribution adds a pass, a target, a backend."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from edgec.errors import UserError
from edgec.plugins import Registry

PLUGIN_MODULE = '''
"""A user's plugin package, as it would ship on its own."""
from edgec.passes.core import Pass, PassResult


class SigmoidToRelu(Pass):
    """Replaces Sigmoid with Relu (a toy rewrite)."""

    name = "sigmoid-to-relu"

    def run(self, model, ctx):
        changed = 0
        for node in list(model.graph):
            if node.op_type == "Sigmoid" and ctx.allow(self.name):
                node.op_type = "Relu"
                changed += 1
        return PassResult(model, bool(changed), {"replaced": changed})


class Clash(SigmoidToRelu):
    name = "fold-constants"
'''


def _install_plugin(root, entry_points: str):
    """Writes a module and a .dist-info folder: what pip leaves behind, found by importlib.metadata."""
    (root / "edgec_demo_plugin.py").write_text(PLUGIN_MODULE)
    info = root / "edgec_demo_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: edgec-demo-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    _install_plugin(tmp_path, "[edgec.passes]\nsigmoid-to-relu = edgec_demo_plugin:SigmoidToRelu\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_entry_point_pass_is_found_lazily(plugin_path):
    loaded = []
    registry = Registry("pass", "edgec.passes", lambda: loaded.append(1) or {})
    assert "sigmoid-to-relu" in registry
    assert registry.get("sigmoid-to-relu").__name__ == "SigmoidToRelu"
    assert "entry point" in registry.origin("sigmoid-to-relu")


def test_duplicate_plugin_name_is_an_error(tmp_path, monkeypatch):
    _install_plugin(tmp_path, "[edgec.passes]\nfold-constants = edgec_demo_plugin:Clash\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("pass", "edgec.passes", lambda: {"fold-constants": object()})
    with pytest.raises(UserError, match="already registered"):
        registry.names()


def test_broken_plugin_is_named(tmp_path, monkeypatch):
    _install_plugin(tmp_path, "[edgec.passes]\nbroken = edgec_demo_plugin:DoesNotExist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("pass", "edgec.passes")
    with pytest.raises(UserError, match="broken"):
        registry.names()


def test_cli_runs_a_plugin_pass(plugin_path, tmp_path):
    from edgec import ir as eir
    from edgec.testing import parse

    src = tmp_path / "in.onnx"
    eir.save(
        parse('<ir_version: 10, opset_import: ["" : 20]> g (float[N,4] x) => (float[N,4] y) { y = Sigmoid(x) }'), src
    )
    env = {**os.environ, "PYTHONPATH": str(plugin_path)}
    listed = subprocess.run(
        [sys.executable, "-m", "edgec.cli", "passes", "--json"], capture_output=True, text=True, env=env, check=True
    )
    names = {p["name"]: p for p in json.loads(listed.stdout)["passes"]}
    assert "sigmoid-to-relu" in names and "entry point" in names["sigmoid-to-relu"]["origin"]
    out = tmp_path / "out.onnx"
    run = subprocess.run(
        [sys.executable, "-m", "edgec.cli", "opt", str(src), "--pipeline", "sigmoid-to-relu", "-o", str(out), "--stats"],
        capture_output=True, text=True, env=env,
    )
    assert run.returncode == 0, run.stderr
    assert [n.op_type for n in eir.load(out).graph] == ["Relu"]
    assert [n.op_type for n in eir.load(src).graph] == ["Sigmoid"]  # the input is never modified
