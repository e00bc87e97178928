"""`edgec` as a user runs it: bad input gives one line and exit 2, nothing is lost or half-written."""

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from edgec import ir as eir
from edgec.cli import main
from edgec.passes.core import Pass, PassResult
from edgec.passes.instruments import PassBrokeModel
from edgec.passes.registry import register_pass
from edgec.testing import graph, parse

MODEL = """
<ir_version: 10, opset_import: ["" : 20]>
g (int64[batch,seq] input_ids, int64[batch,seq] attention_mask) => (float[batch,seq,8] out)
  <float[50,8] emb = {""" + ", ".join(str((i % 13) / 10.0) for i in range(400)) + """}> {
  e = Gather(emb, input_ids)
  i1 = Identity(e)
  m = Cast<to=1>(attention_mask)
  axes = Constant<value=int64[1] {2}>()
  mu = Unsqueeze(m, axes)
  out = Mul(i1, mu)
}
"""


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.onnx"
    eir.save(parse(MODEL), path)
    return path


def run_cli(*args, cwd=None):
    """The installed console entry point in a fresh process, as a user would run it."""
    proc = subprocess.run([sys.executable, "-m", "edgec.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)
    return proc.returncode, proc.stdout, proc.stderr


def assert_user_error(rc, stderr, *words):
    assert rc == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_compile_writes_artifact_and_report(model_file, tmp_path):
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli("compile", model_file, "--target", "x86-64", "-o", out)
    assert rc == 0, stderr
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok" and report["backend"] == "onnxruntime" and report["target"] == "x86-64"
    assert (out / "model.onnx").exists() and report["artifact"] == str(out / "model.onnx")
    assert report["verification"]["cosine_min"] >= 0.99999 and report["verification"]["inputs"] == "generated"
    assert report["sizes"]["final_nodes"] < report["sizes"]["original_nodes"]
    assert {p["pass"] for p in report["passes"]} >= {"fold-constants", "remove-identity", "remove-dead-code"}
    assert all("seconds" in p and "stats" in p for p in report["passes"])
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "staging files left behind"


def test_compile_with_user_inputs(model_file, tmp_path):
    data = tmp_path / "data.npz"
    ids = np.array([[1, 2, 3, 4], [5, 6, 7, 0]], dtype=np.int64)
    np.savez(data, input_ids=ids, attention_mask=(ids > 0).astype(np.int64), labels=np.array([0, 1]))
    rc, stdout, stderr = run_cli("compile", model_file, "--target", "x86-64", "-o", tmp_path / "o", "--inputs", data, "--json")
    assert rc == 0, stderr
    report = json.loads(stdout)
    assert report["verification"]["inputs"] == str(data) and report["verification"]["samples"] == 2


class _NegateRelu(Pass):
    """A pass with a bug (Mul becomes Sub), to prove verification catches one."""

    name = "test-negate-relu"

    def run(self, model, ctx):
        for node in model.graph:
            if node.op_type == "Mul":
                node.op_type = "Sub"
                return PassResult(model, True)
        return PassResult(model, False)


register_pass(_NegateRelu)


def test_verification_failure_exits_1_and_removes_the_stale_artifact(model_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compile", str(model_file), "--target", "x86-64", "-o", str(out)]) == 0
    assert (out / "model.onnx").exists()
    rc = main(["compile", str(model_file), "--target", "x86-64", "-o", str(out), "--pipeline", "cleanup,test-negate-relu"])
    err = capsys.readouterr().err
    assert rc == 1 and "verification failed" in err and "Traceback" not in err
    assert not (out / "model.onnx").exists(), "the earlier artifact must not pass for this compile's result"
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "failed" and report["artifact"] is None
    assert any("earlier compile" in n for n in report["notes"])
    # --verify-each names the pass that broke the numerics.
    with pytest.raises(PassBrokeModel, match="test-negate-relu"):
        main(["compile", str(model_file), "--target", "x86-64", "-o", str(out), "--pipeline", "cleanup,test-negate-relu", "--verify-each"])


def test_report_is_readable_like_the_model(model_file, tmp_path):
    out = tmp_path / "out"
    assert main(["compile", str(model_file), "--target", "x86-64", "-o", str(out)]) == 0
    assert (out / "report.json").stat().st_mode & 0o777 == (out / "model.onnx").stat().st_mode & 0o777


def test_compiling_into_the_models_own_folder_is_refused(tmp_path, capsys):
    src = tmp_path / "model.onnx"
    eir.save(parse(MODEL), src)
    before = src.read_bytes()
    assert main(["compile", str(src), "--target", "x86-64", "-o", str(tmp_path)]) == 2
    assert "overwrite the input" in capsys.readouterr().err
    assert src.read_bytes() == before


@pytest.mark.parametrize(
    "argv, words",
    [
        (["compile", "{missing}", "--target", "x86-64"], ["does not exist"]),
        (["compile", "{notonnx}", "--target", "x86-64"], ["not a readable ONNX"]),
        (["compile", "{truncated}", "--target", "x86-64"], ["truncated"]),
        (["compile", "{model}", "--target", "pentium-3"], ["unknown target", "x86-64"]),
        (["compile", "{model}", "--target", "x86-64", "--pipeline", "cleanup,frobnicate"], ["unknown pass", "fold-constants"]),
        (["compile", "{model}", "--target", "x86-64", "--pipeline", "fold-constants{colour=red}"], ["no option", "colour"]),
        (["compile", "{model}", "--target", "x86-64", "--inputs", "{badnames}"], ["no array named", "input_ids"]),
        (["compile", "{model}", "--target", "x86-64", "--inputs", "{badshape}"], ["shape", "rank"]),
        (["compile", "{model}", "--target", "x86-64", "-o", "{unwritable}"], ["output"]),
        (["compile", "{model}", "--target", "x86-64", "--precision", "fp8"], ["unknown precision"]),
        (["compile", "{model}", "--target", "x86-64", "--precision", "fp16"], ["supports no fp16", "fp32, int8"]),
        (["compile", "{model}", "--target", "jetson-orin-nano", "--backend", "onnxruntime", "--precision", "fp16"],
         ["onnxruntime cannot emit fp16"]),
        (["compile", "{model}", "--target", "x86-64", "--precision", "int8"], ["int8", "needs calibration data", "--calib"]),
        (["compile", "{model}", "--target", "x86-64", "--calib", "{badnames}"], ["--calib"]),
        (["compile", "{model}", "--target", "x86-64", "--backend", "coreml"], ["does not use backend"]),
        (["compile", "{model}", "--target", "x86-64", "--tolerance", "cos=0.9"], ["tolerance"]),
        (["compile", "{model}", "--target", "x86-64", "--debug-counter", "cse"], ["PASS=N"]),
        (["compile", "{model}"], ["--target"]),
        (["compile", "{model}", "--target", "x86-64", "--inputs", "{npy}"], ["unnamed array"]),
        (["compile", "{model}", "--target", "x86-64", "--inputs", "{negative}"], ["outside", "range"]),
        (["compile", "{model}", "--target", "x86-64", "--inputs", "{empty}"], ["empty"]),
        (["compile", "{model}", "--target", "x86-64", "--inputs", "{outofvocab}"], ["does not run", "inputs"]),
        (["compile", "{model}", "--target", "x86-64", "--tolerance", "min_cosine=nan"], ["not usable"]),
        (["compile", "{model}", "--target", "x86-64", "--debug-counter", "csee=1"], ["csee", "does not run"]),
        (["compile", "{model}", "--target", "x86-64", "--dump-ir", "{model}"], ["--dump-ir"]),
        (["compile", "{model}", "--target", "x86-64", "--exporter", "jit"], ["invalid choice"]),
        (["opt", "{model}", "--pipeline", "cleanup", "-o", "newdir/"], ["is a folder"]),
        (["opt", "{model}", "--pipeline", "cleanup", "-o", "{model}"], ["is the input model"]),
        (["inspect", "{model}", "--target", "nope"], ["unknown target"]),
        (["targets", "show", "nope"], ["unknown target"]),
        (["frobnicate"], ["invalid choice"]),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, words, model_file, tmp_path):
    notonnx = tmp_path / "notes.onnx"
    notonnx.write_text("these are my notes, not a model\n" * 20)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model_file.read_bytes()[:300])
    badnames = tmp_path / "badnames.npz"
    np.savez(badnames, ids=np.zeros((1, 4), dtype=np.int64))
    badshape = tmp_path / "badshape.npz"
    np.savez(badshape, input_ids=np.zeros((4,), dtype=np.int64), attention_mask=np.ones((4,), dtype=np.int64))
    npy = tmp_path / "ids.npy"
    np.save(npy, np.zeros((1, 4), dtype=np.int64))
    negative = tmp_path / "negative.npz"
    np.savez(negative, input_ids=np.full((1, 4), -1, dtype=np.int64), attention_mask=np.ones((1, 4), dtype=np.uint64) * (2**63))
    empty = tmp_path / "empty.npz"
    np.savez(empty, input_ids=np.zeros((0, 4), dtype=np.int64), attention_mask=np.zeros((0, 4), dtype=np.int64))
    outofvocab = tmp_path / "outofvocab.npz"
    np.savez(outofvocab, input_ids=np.full((1, 4), 10**6, dtype=np.int64), attention_mask=np.ones((1, 4), dtype=np.int64))
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should go")
    subs = {
        "{missing}": tmp_path / "nope.onnx", "{notonnx}": notonnx, "{truncated}": truncated, "{model}": model_file,
        "{badnames}": badnames, "{badshape}": badshape, "{unwritable}": blocker / "out",
        "{npy}": npy, "{negative}": negative, "{empty}": empty, "{outofvocab}": outofvocab,
    }
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    rc, stdout, stderr = run_cli(*[subs.get(a, a) for a in argv], cwd=tmp_path)
    assert_user_error(rc, stderr, *words)
    after = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before, "an input file was modified or a stray file was written"
    assert not (tmp_path / "out").exists(), "a failed compile left an output folder behind"


def test_truncated_model_message_names_the_file(model_file, tmp_path):
    truncated = tmp_path / "t.onnx"
    truncated.write_bytes(model_file.read_bytes()[:-40])
    rc, _, stderr = run_cli("inspect", truncated)
    assert_user_error(rc, stderr, str(truncated))


def test_inspect_json(model_file):
    rc, stdout, stderr = run_cli("inspect", model_file, "--json", "--target", "snapdragon-8")
    assert rc == 0, stderr
    info = json.loads(stdout)
    assert [i["name"] for i in info["inputs"]] == ["input_ids", "attention_mask"]
    assert info["inputs"][0]["shape"] == ["batch", "seq"]
    assert info["outputs"][0]["shape"] == ["batch", "seq", 8]
    assert info["ops"]["Gather"] == 1 and info["nodes"] == sum(info["ops"].values())
    assert info["parameters"] == 400 and info["parameter_bytes"] == 1600
    assert info["flops"] > 0 and info["target"]["name"] == "snapdragon-8"
    assert "unsupported_ops" in info["target"]
    # The TFLite backend specializes its copy to the generated inputs' shapes: the estimate keeps the
    # model's own (batch 1, other dims 128), as exported.
    assert "as exported" in info["target"]["estimate_note"]


def test_inspect_estimates_the_model_as_its_backend_lowers_it(model_file):
    rc, stdout, stderr = run_cli("inspect", model_file, "--json", "--target", "x86-64")
    assert rc == 0, stderr
    info = json.loads(stdout)
    assert "as the onnxruntime backend lowers it" in info["target"]["estimate_note"]
    assert info["target"]["estimated_latency_s"] > 0


def test_inspect_table(model_file):
    rc, stdout, stderr = run_cli("inspect", model_file, "--target", "x86-64")
    assert rc == 0, stderr
    assert "input_ids" in stdout and "Gather" in stdout and "parameters" in stdout


def test_inspect_does_not_call_ops_the_backend_runs_ones_the_target_cannot_run(tmp_path):
    # A weight-only int4 MatMul (com.microsoft) is outside x86-64's standard op set, but the onnxruntime
    # backend takes it and its runtime runs it.
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = graph("g (float[batch,seq,64] a) => (float[batch,seq,32] y)", "h = MatMul(a, w)\ny = Relu(h)",
                  "float[64,32] w = {" + ",".join(["0"] * 64 * 32) + "}")
    model.graph.initializers["w"].const_value = ir.tensor(np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32))
    quantizer = MatMulNBitsQuantizer(eir.to_proto(model), bits=4, block_size=32, is_symmetric=True)
    quantizer.process()
    path = tmp_path / "int4.onnx"
    onnx.save(quantizer.model.model, path)
    rc, stdout, stderr = run_cli("inspect", path, "--target", "x86-64")
    assert rc == 0, stderr
    assert "MatMulNBits" in stdout and "cannot run" not in stdout
    assert "which the onnxruntime backend's runtime runs" in stdout and "takes every node" in stdout
    # The FLOPs are the MatMul's: 2·128·64·32 at the default bindings.
    info = json.loads(run_cli("inspect", path, "--json")[1])
    assert info["flops"] >= 2 * 128 * 64 * 32


def test_opt_prints_after_change_and_stats(model_file, tmp_path):
    out = tmp_path / "opt.onnx"
    rc, stdout, stderr = run_cli("opt", model_file, "--pipeline", "remove-identity", "-o", out, "--print-after-change", "--stats")
    assert rc == 0, stderr
    assert "IR after remove-identity" in stdout and "Identity" not in stdout.split("IR after remove-identity")[1]
    assert "identities_removed" in stderr
    assert [n.op_type for n in eir.load(out).graph].count("Identity") == 0


def test_passes_and_targets_listings():
    rc, stdout, _ = run_cli("passes")
    assert rc == 0 and "fold-constants" in stdout and "cleanup" in stdout
    rc, stdout, _ = run_cli("targets")
    assert rc == 0
    for name in ("snapdragon-8", "jetson-orin-nano", "apple-a17", "raspberry-pi-5", "x86-64"):
        assert name in stdout
    rc, stdout, _ = run_cli("targets", "show", "snapdragon-8", "--json")
    assert rc == 0 and json.loads(stdout)["name"] == "snapdragon-8"
    rc, stdout, _ = run_cli("targets", "show", "raspberry-pi-5")
    assert rc == 0 and "raspberry-pi-5" in stdout


def test_main_returns_exit_codes_in_process(model_file, capsys):
    assert main(["compile", str(model_file) + ".missing", "--target", "x86-64"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_precision_table_shows_each_rung_measured():
    from rich.console import Console

    from edgec.commands import _precision_table

    layers = [dict(node="emb", kind="embedding", sensitivity=9e-6, precision="fp16", sensitivities={"int8": 9e-6, "fp16": 7e-9}),
              dict(node="ffn", kind="linear", sensitivity=5e-7, precision="int16", sensitivities={"int8": 5e-7, "int16": 3e-9}),
              dict(node="qk", kind="attention", sensitivity=1e-13, precision="int8", sensitivities={"int8": 1e-13})]
    assignment = dict(metric="cosine", value=0.9999992, budget=0.999999, float_value=1.0, samples=16, data="calib.npz",
                      ladder=["int8", "int16", "fp16", "fp32"], ops={"int8": 1, "int16": 1, "fp16": 1, "fp32": 0},
                      float_ops=0, int8_ops=1)
    console = Console(width=200, record=True)
    console.print(_precision_table({"assignment": assignment, "layers": layers}))
    text = console.export_text()
    assert "1 int8, 1 int16, 1 fp16, 0 fp32" in text and "mean cosine 0.9999992 (budget 0.999999)" in text
    cells = [[c.strip() for c in line.split("│")] for line in text.splitlines()]
    rows = {row[0]: row[2:] for row in cells if row[0] in ("emb", "ffn", "qk")}
    assert rows == {"emb": ["9.00e-06", "-", "7.00e-09", "fp16"], "ffn": ["5.00e-07", "3.00e-09", "-", "int16"],
                    "qk": ["1.00e-13", "-", "-", "int8"]}
