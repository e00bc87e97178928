"""`edgec compile --target x86-64` end to end on random-weight transformers, both torch exporters."""

import json

import numpy as np
import pytest

import zoo
from edgec.cli import main

CASES = [(a, e) for a in zoo.ARCHS for e in zoo.EXPORTERS if (a, e) not in zoo.KNOWN_EXPORT_FAILURES]


@pytest.mark.slow
@pytest.mark.parametrize("arch, exporter", CASES, ids=[f"{a}-{e}" for a, e in CASES])
def test_compile_x86_64_matches_original(arch, exporter, zoo_model, tmp_path, capsys):
    src = zoo_model(arch, exporter)
    data = tmp_path / "inputs.npz"
    np.savez(data, **zoo.zoo_inputs(arch, src))
    before = src.read_bytes()
    out = tmp_path / "out"
    rc = main(["compile", str(src), "--target", "x86-64", "-o", str(out), "--inputs", str(data), "--verify-each"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    v, s = report["verification"], report["sizes"]
    assert v["passed"] and v["cosine_min"] >= 0.99999 and v["max_abs_error"] < 1e-3, v
    assert s["final_nodes"] <= s["original_nodes"]
    assert src.read_bytes() == before

    # The artifact keeps the model's dynamic dims: it runs at another sequence length / batch too.
    from edgec.verify import run_model

    other = zoo.zoo_inputs(arch, src, batch=3, seq_len=11, seed=1)
    ref, got = run_model(src, other), run_model(out / "model.onnx", other)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-4, atol=1e-4)
