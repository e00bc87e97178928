"""The tvm backend: the zoo through TVM's Relax ONNX frontend into the Relax VM (against onnxruntime),
MetaSchedule tuning writing and reusing its database, batch chunking, aarch64 cross builds, and the
refusals. Everything runs in TVM's Relax VM on this machine's CPU."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

import zoo  # noqa: E402

from edgec import ir as eir  # noqa: E402
from edgec.analysis.shapes import infer_shapes, specialize_inputs  # noqa: E402
from edgec.backends import BACKENDS, RuntimeUnavailable  # noqa: E402
from edgec.backends.tvm import DATABASE_FOLDER, TVMBackend, run_tvm  # noqa: E402
from edgec.backends.tvm.convert import unsupported_ops  # noqa: E402
from edgec.errors import UserError  # noqa: E402
from edgec.frontends.onnx import load_onnx  # noqa: E402
from edgec.passes.core import PassContext  # noqa: E402
from edgec.passes.manager import PassManager  # noqa: E402
from edgec.targets import get_target  # noqa: E402
from edgec.testing import graph  # noqa: E402
from edgec.verify import compare, run_model, token_mask  # noqa: E402

TARGET = get_target("x86-64")
RNG = np.random.default_rng(0)


@dataclass
class Options:
    """The CompileOptions fields a backend's configure reads."""
    tune_trials: int = 0
    tuning_db: Path | None = None
    cache_dir: Path | None = None


def backend(tmp_path, trials=0, messages=None) -> TVMBackend:
    chosen = TVMBackend()
    chosen.configure(Options(trials, tmp_path / "db"), (messages if messages is not None else []).append)
    return chosen


def onnx_graph(signature, body, inits=""):
    """A hand-written graph, named and shape-inferred as the compile leaves it."""
    model = infer_shapes(graph(signature, body, inits))
    eir.name_nodes(model)
    return model


def matmul_graph(n=32):
    weights = ",".join(f"{v:.3f}" for v in np.linspace(-1, 1, n * n))
    return onnx_graph(f"g (float[1,{n},{n}] x) => (float[1,{n},{n}] y)", "m = MatMul(x, w)\ny = Relu(m)",
                      f"float[{n},{n}] w = {{{weights}}}")


def compile_for_tvm(path, shapes):
    """What `edgec compile --backend tvm` does before emitting: static inputs, cleanup, lowering."""
    model = load_onnx(path)
    specialize_inputs(model, shapes)
    PassManager("cleanup," + TVMBackend().lowering_pipeline(TARGET, "fp32"), PassContext()).run(model)
    return model


def test_backend_contract():
    assert BACKENDS.get("tvm") is TVMBackend
    chosen = TVMBackend()
    assert chosen.supports(TARGET) and chosen.supports(get_target("raspberry-pi-5"))
    assert chosen.unavailable_reason() is None
    assert not chosen.dynamic_shapes and chosen.precisions == ("fp32",)
    # Cleanup is what makes the Relax frontend take real exports: it always ends the lowering.
    assert chosen.lowering_pipeline(TARGET, "fp32") == "lower-attention{form=decomposed},fuse-layer-norm,fuse-gelu,cleanup"
    assert chosen.artifact_names("m") == ("m.so", "m.json")


def test_artifact_runs_in_the_relax_vm_and_keeps_its_signature(tmp_path):
    model = onnx_graph("g (int64[1,6] ids, float[1,6,4] h) => (float[1,6,4] out, float[1,6] s)",
                       "e = Gather(w2, ids)\nout = Add(e, h)\ns = ReduceSum <keepdims = 0> (out, ax)",
                       "float[10,4] w2 = {" + ",".join(str(i / 10) for i in range(40)) + "}, int64[1] ax = {-1}")
    artifact = backend(tmp_path).emit(model, tmp_path / "out", target=TARGET, precision="fp32", stem="named")
    assert artifact.files == [tmp_path / "out" / "named.so", tmp_path / "out" / "named.json"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["named.json", "named.so"]  # no temporary left
    meta = json.loads((tmp_path / "out" / "named.json").read_text())
    assert meta["inputs"] == {"ids": [1, 6], "h": [1, 6, 4]} and meta["outputs"] == ["out", "s"]
    assert meta["llvm_target"]["kind"] == "llvm" and meta["llvm_target"]["num-cores"] >= 1
    assert meta["latency_ms"]["artifact"] > 0 and meta["tuning"]["trials_run"] == 0
    feeds = {"ids": RNG.integers(0, 10, (1, 6)), "h": RNG.standard_normal((1, 6, 4)).astype(np.float32)}
    got, expected = run_tvm(artifact.path, feeds), run_model(model, feeds)
    assert list(got) == ["out", "s"]
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-5)


def test_gelu_erf_and_softmax_are_vectorizable_tir_not_libm_calls(tmp_path):
    # TVM's llvm codegen calls libm's erff/expf once per element for T.erf/T.exp; the fast forms are TIR.
    model = onnx_graph("g (float[2,8,16] x) => (float[2,8,16] y, float[2,8,16] p, float[2,8,16] e)",
                       "y = Gelu(x)\np = Softmax <axis = -1> (x)\ne = Erf(x)")
    artifact = backend(tmp_path).emit(model, tmp_path / "out", target=TARGET, precision="fp32")
    symbols = set(artifact.path.read_bytes().split(b"\x00"))
    assert not {b"erff", b"expf"} & symbols
    feeds = {"x": (RNG.standard_normal((2, 8, 16)) * 3).astype(np.float32)}
    got, expected = run_tvm(artifact.path, feeds), run_model(model, feeds)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-5)


def test_run_chunks_batches_pads_and_crops(tmp_path):
    """A 1x8 artifact runs 5x3 feeds: five calls, padded to 8 tokens, outputs cropped back to 3."""
    model = onnx_graph("g (int64[1,8] ids, int64[1,8] attention_mask) => (float[1,8,4] y)",
                       "e = Gather(w2, ids)\nm = Cast <to = 1> (attention_mask)\nu = Unsqueeze(m, ax)\ny = Mul(e, u)",
                       "float[10,4] w2 = {" + ",".join(str(i) for i in range(40)) + "}, int64[1] ax = {-1}")
    chosen = backend(tmp_path)
    artifact = chosen.emit(model, tmp_path, target=TARGET, precision="fp32")
    ids = RNG.integers(0, 10, (5, 3)).astype(np.int64)
    got = chosen.run(artifact, {"ids": ids, "attention_mask": np.ones((5, 3), np.int64)})["y"]
    np.testing.assert_array_equal(got, np.arange(40, dtype=np.float32).reshape(10, 4)[ids])
    with pytest.raises(RuntimeError, match="1x8"):
        chosen.run(artifact, {"ids": np.zeros((1, 9), np.int64), "attention_mask": np.ones((1, 9), np.int64)})


# MetaSchedule's first search in a process imports TVM's tensor-intrinsic library, whose TVMScript
# parser inspects the call stack per kernel: over a minute of CPU, several on a loaded 2-core machine.
@pytest.mark.slow
def test_tuning_writes_the_database_and_the_second_compile_reuses_it(tmp_path):
    model = matmul_graph()
    feeds = {"x": RNG.standard_normal((1, 32, 32)).astype(np.float32)}
    messages = []
    first = backend(tmp_path, trials=2, messages=messages).emit(model, tmp_path / "a", target=TARGET, precision="fp32")
    tuning = first.meta["tuning"]
    assert tuning["trials_run"] == 2 and tuning["records_reused"] == 0 and tuning["tasks_tuned"] == tuning["tasks"] == 1
    assert (tmp_path / "db" / "database_tuning_record.json").stat().st_size > 0
    assert any(m.startswith("tuning: ") for m in messages)  # progress reached the callback
    latency = first.meta["latency_ms"]
    # No direction: a 32x32 MatMul takes microseconds, and a parallel kernel waits for its second
    # core wherever another process holds it.
    assert latency["artifact"] > 0 and latency["untuned"] > 0
    assert latency["speedup"] == pytest.approx(latency["untuned"] / latency["artifact"], rel=0.01)
    np.testing.assert_allclose(run_tvm(first.path, feeds)["y"], run_model(model, feeds)["y"], rtol=1e-4, atol=1e-4)
    # The same budget again: the records count towards it, so nothing is measured and they are applied.
    second = backend(tmp_path, trials=2).emit(model, tmp_path / "b", target=TARGET, precision="fp32")
    assert second.meta["tuning"]["trials_run"] == 0 and second.meta["tuning"]["records_reused"] >= 1
    assert second.meta["tuning"]["tasks_tuned"] == 1 and "untuned" in second.meta["latency_ms"]
    np.testing.assert_allclose(run_tvm(second.path, feeds)["y"], run_model(model, feeds)["y"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("trials", [-1, 2.5, True])
def test_bad_trial_counts_are_user_errors(trials, tmp_path):
    with pytest.raises(UserError, match="tune-trials"):
        TVMBackend().configure(Options(trials), print)


def test_tuning_database_must_be_a_writable_folder(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="not a folder"):
        TVMBackend().configure(Options(0, tmp_path / "file"), print)
    with pytest.raises(UserError, match="writable"):
        TVMBackend().configure(Options(0, tmp_path / "file" / "db"), print)


def test_default_database_is_under_the_cache(tmp_path):
    chosen = TVMBackend()
    chosen.configure(Options(0, None, tmp_path / "cache"), print)
    assert chosen.database == tmp_path / "cache" / DATABASE_FOLDER


def test_other_precisions_are_refused(tmp_path):
    with pytest.raises(UserError, match="fp32"):
        backend(tmp_path).emit(matmul_graph(), tmp_path, target=TARGET, precision="int8")


def test_an_op_without_converter_is_named_before_building(tmp_path):
    model = onnx_graph("g (float[4,4] x) => (float[4] y)", "d = Det(x)\ny = Expand(d, s)", "int64[1] s = {4}")
    (node, why), = unsupported_ops(model).items()
    assert "Det" in why and model.graph.node(0).name == node
    with pytest.raises(UserError, match=f"Det \\(e.g. node '{node}'\\)"):
        backend(tmp_path).emit(model, tmp_path / "out", target=TARGET, precision="fp32")
    assert not (tmp_path / "out").exists()


def test_a_converter_failure_names_the_node(tmp_path):
    model = onnx_graph("g (float[2,3] x, int64[1] k) => (float[2,2] y, int64[2,2] i)", "y, i = TopK(x, k)")
    assert unsupported_ops(model) == {}
    with pytest.raises(UserError, match=f"TopK node '{model.graph.node(0).name}'"):
        backend(tmp_path).emit(model, tmp_path, target=TARGET, precision="fp32")


def test_dynamic_inputs_are_refused(tmp_path):
    model = onnx_graph("g (float[N,8] x) => (float[N,8] y)", "y = Relu(x)")
    with pytest.raises(UserError, match="static input shapes"):
        backend(tmp_path).emit(model, tmp_path, target=TARGET, precision="fp32")


def test_aarch64_builds_with_the_cross_compiler(tmp_path):
    """Raspberry Pi 5: a cross-compiled library, run under emulation where it is set up here."""
    from edgec.backends.tvm import emulate

    if emulate.cross_compiler() is None:
        pytest.skip("no aarch64 cross compiler: apt-get install g++-aarch64-linux-gnu")
    model = matmul_graph(8)
    pi = get_target("raspberry-pi-5")
    with pytest.raises(UserError, match="tuning measures"):
        backend(tmp_path, trials=4).emit(model, tmp_path, target=pi, precision="fp32")
    artifact = backend(tmp_path).emit(model, tmp_path, target=pi, precision="fp32")
    assert artifact.path.read_bytes()[:4] == b"\x7fELF" and artifact.path.read_bytes()[18] == 183  # EM_AARCH64
    assert artifact.meta["llvm_target"]["mtriple"] == "aarch64-linux-gnu" and artifact.meta["latency_ms"] is None
    assert "+dotprod" in artifact.meta["llvm_target"]["mattr"]
    feeds = {"x": RNG.standard_normal((1, 8, 8)).astype(np.float32)}
    try:
        got = TVMBackend().run(artifact, feeds)
    except RuntimeUnavailable as exc:
        pytest.skip(f"aarch64 emulation is not set up here: {exc}")
    np.testing.assert_allclose(got["y"], run_model(model, feeds)["y"], rtol=1e-5, atol=1e-5)


# --- the zoo --------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
@pytest.mark.parametrize("arch", zoo.ARCHS)
def test_zoo_model_through_tvm(arch, exporter, zoo_model, tmp_path):
    path = zoo_model(arch, exporter)
    feeds = zoo.zoo_inputs(arch, path)  # batch 2, second row padded: chunked to the 1-row artifact
    model = compile_for_tvm(path, {k: (1, *v.shape[1:]) for k, v in feeds.items()})
    assert unsupported_ops(model) == {}
    chosen = backend(tmp_path)
    artifact = chosen.emit(model, tmp_path, target=TARGET, precision="fp32")
    figures = compare(run_model(path, feeds), chosen.run(artifact, feeds), token_mask(feeds))
    assert figures["cosine_min"] >= 0.9999, figures


@pytest.mark.slow
def test_cli_compiles_for_x86_with_tvm(zoo_model, tmp_path, capsys):
    from edgec.cli import main

    out = tmp_path / "x86"
    code = main(["compile", str(zoo_model("bert", "torchscript")), "--target", "x86-64", "--backend", "tvm",
                 "--tuning-db", str(tmp_path / "db"), "-o", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads((out / "report.json").read_text())
    assert report["backend"] == "tvm" and report["verification"]["verified_in"] == "tvm"
    assert report["static_shapes"]["input_ids"][0] == 1
    assert (out / "model.so").is_file() and json.loads((out / "model.json").read_text())["outputs"]
    assert main(["compile", str(zoo_model("bert", "torchscript")), "--target", "x86-64", "--backend", "tvm",
                 "--tune-trials", "-3", "-o", str(tmp_path / "bad")]) == 2
    assert "tune-trials" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_tvm_runs_one_thread_per_core_unless_told_otherwise(monkeypatch):
    # TVM's own default on x86 is half the logical CPUs: one core of a 2-core host without SMT.
    from edgec.backends.tvm.targets import host_cores

    probe = ("from edgec.backends.tvm.targets import use_host_cores; use_host_cores(); import tvm; "
             "print(tvm.get_global_func('runtime.NumThreads')())")
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    threads = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert int(threads.stdout.split()[-1]) == host_cores() <= os.cpu_count()
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    threads = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert int(threads.stdout.split()[-1]) == 1
