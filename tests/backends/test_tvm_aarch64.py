"""aarch64 for the TVM backend: the llvm target each aarch64 profile asks for, a cross-linked library that
really is aarch64, and the same numbers from it under qemu-aarch64 as from the host build in TVM's Relax VM
and from onnxruntime."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402
from tvm.relax.frontend.onnx import from_onnx  # noqa: E402

from edgec.analysis.shapes import specialize_inputs  # noqa: E402
from edgec.backends.tvm.emulate import (  # noqa: E402
    FEATURES,
    SETUP,
    EmulatedVM,
    EmulationError,
    aarch64_target,
    cross_compiler,
    emulation_unavailable_reason,
    export_aarch64,
    qemu_cpu,
    run_emulated,
)
from edgec.errors import UserError  # noqa: E402
from edgec.frontends.onnx import load_onnx  # noqa: E402
from edgec.ir import to_proto  # noqa: E402
from edgec.passes.core import PassContext  # noqa: E402
from edgec.passes.manager import PassManager  # noqa: E402
from edgec.targets import get_target, target_names  # noqa: E402

EM_AARCH64 = 183  # ELF e_machine of AArch64
UNAVAILABLE = emulation_unavailable_reason()
needs_emulation = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))


def elf_machine(path: Path) -> int:
    """e_machine of a 64-bit little-endian ELF file."""
    header = Path(path).read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and header[4] == 2 and header[5] == 1, "not a 64-bit little-endian ELF file"
    return int.from_bytes(header[18:20], "little")


def test_raspberry_pi_5_target_is_a_cortex_a76():
    target = get_target("raspberry-pi-5")
    llvm = aarch64_target(target)
    assert llvm["mtriple"] == "aarch64-linux-gnu"
    assert llvm["mattr"] == [FEATURES[f] for f in target.cpu_features]
    assert "+i8mm" not in llvm["mattr"]  # the A76 has none: code using it would trap on the board
    assert llvm["mcpu"] == "cortex-a76" and llvm["num-cores"] == 4
    parsed = tvm.target.Target(llvm)  # TVM's LLVM knows the core and every attribute
    assert str(parsed.attrs["mcpu"]) == "cortex-a76"
    assert list(parsed.attrs["mattr"]) == llvm["mattr"]


def test_snapdragon_8_target_has_no_single_core_to_tune_for():
    llvm = aarch64_target(get_target("snapdragon-8"))
    assert "mcpu" not in llvm  # X4 + A720 + A520
    assert llvm["num-cores"] == 8
    assert {"+neon", "+dotprod", "+i8mm", "+bf16", "+sve2"} <= set(llvm["mattr"])


@pytest.mark.parametrize("name", [n for n in target_names() if get_target(n).arch == "aarch64"])
def test_every_aarch64_profile_gives_a_target_llvm_takes(name):
    llvm = aarch64_target(get_target(name))
    parsed = tvm.target.Target(llvm)
    if "mcpu" in llvm:
        assert llvm["mcpu"] in [str(cpu) for cpu in tvm.target.codegen.llvm_get_cpu_archlist(parsed)]
    assert tvm.target.codegen.llvm_cpu_has_features([f.lstrip("+") for f in llvm["mattr"]], parsed)


def test_a_core_llvm_does_not_know_is_not_named():
    pi = get_target("raspberry-pi-5")
    odd = dataclasses.replace(pi, units=(dataclasses.replace(pi.units[0], description="4x Cortex-A999"),))
    llvm = aarch64_target(odd)
    assert "mcpu" not in llvm and llvm["num-cores"] == 4


def test_refuses_other_architectures_and_unknown_features():
    with pytest.raises(UserError, match="x86_64, not aarch64"):
        aarch64_target(get_target("x86-64"))
    odd = dataclasses.replace(get_target("raspberry-pi-5"), cpu_features=("neon", "mve"))
    with pytest.raises(UserError, match="mve"):
        aarch64_target(odd)


def test_unavailable_reason_names_the_setup(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path))
    reason = emulation_unavailable_reason()
    assert reason is not None and SETUP in reason and "\n" not in reason
    if UNAVAILABLE is None:  # the tools are there, only this empty cache lacks the sysroot
        assert "sysroot" in reason and str(tmp_path) in reason


@pytest.fixture(scope="module")
def bert(zoo_model):
    """The zoo's tiny BERT as Relax (shapes fixed and cleaned up as the compile leaves it), its inputs in
    graph order, and what the host llvm build of the same module computes in the Relax VM."""
    import zoo

    path = zoo_model("bert", "dynamo")
    feeds = zoo.zoo_inputs("bert", path)
    model = load_onnx(path)
    specialize_inputs(model, {name: array.shape for name, array in feeds.items()})
    PassManager("cleanup", PassContext()).run(model)
    proto = to_proto(model)
    module = relax.get_pipeline("zero")(from_onnx(proto, keep_params_in_input=False))
    inputs = [feeds[value.name] for value in proto.graph.input]
    vm = relax.VirtualMachine(relax.build(module, target="llvm"), tvm.cpu())
    host = vm["main"](*[tvm.runtime.tensor(a) for a in inputs])
    return module, inputs, [host.numpy()], path, feeds


@pytest.fixture(scope="module")
def aarch64_library(bert, tmp_path_factory):
    """`aarch64_library(target name) -> Path`: the tiny BERT cross-compiled for that target, alone in its
    own folder, built once per module."""
    module = bert[0]
    built = {}

    def build(name: str) -> Path:
        if name not in built:
            library = tmp_path_factory.mktemp(name) / "bert.so"
            export_aarch64(relax.build(module, target=tvm.target.Target(aarch64_target(get_target(name)))), library)
            built[name] = library
        return built[name]

    return build


@needs_emulation
@pytest.mark.parametrize("name", ["raspberry-pi-5", "snapdragon-8"])
def test_bert_runs_under_emulation_as_on_the_host(bert, aarch64_library, name):
    import onnxruntime as ort

    _, inputs, host, path, feeds = bert
    library = aarch64_library(name)
    assert [p.name for p in library.parent.iterdir()] == ["bert.so"]  # no temporary left behind
    assert elf_machine(library) == EM_AARCH64

    # The Pi's own core where qemu models it, so that an instruction the A76 lacks would trap.
    cpu = qemu_cpu(aarch64_target(get_target(name)))
    assert cpu == ("cortex-a76" if name == "raspberry-pi-5" else "max")
    emulated = run_emulated(library, inputs, cpu=cpu)
    assert len(emulated) == len(host)
    for got, want in zip(emulated, host):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # the same code, up to FMA contraction
    reference = ort.InferenceSession(str(path)).run(None, feeds)[0]
    np.testing.assert_allclose(emulated[0], reference, rtol=1e-4, atol=1e-4)


@needs_emulation
def test_one_emulated_vm_serves_many_calls(bert, aarch64_library):
    _, inputs, host, *_ = bert
    flipped = [a[::-1] for a in inputs]  # the batch in reverse: each call must see its own inputs
    with EmulatedVM(aarch64_library("raspberry-pi-5"), cpu="cortex-a76") as vm:
        first, second = vm(inputs), vm(flipped)
    np.testing.assert_allclose(first[0], host[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(second[0], first[0][::-1])


@needs_emulation
def test_emulator_failure_quotes_its_stderr(bert, aarch64_library):
    with pytest.raises(EmulationError, match="no_such_function"):
        run_emulated(aarch64_library("raspberry-pi-5"), bert[1], function="no_such_function")


@needs_emulation
def test_snapdragon_code_traps_on_an_emulated_pi_core(bert, aarch64_library):
    # Built with +sve2, the library holds SVE instructions, which the Pi's Cortex-A76 does not have.
    with pytest.raises(EmulationError, match="SIGILL"):
        run_emulated(aarch64_library("snapdragon-8"), bert[1], cpu="cortex-a76")


@pytest.mark.skipif(cross_compiler() is None, reason=str(UNAVAILABLE))
def test_failed_link_keeps_the_previous_library(bert, tmp_path):
    module, *_ = bert
    library = tmp_path / "bert.so"
    library.write_bytes(b"previous")
    x86 = relax.build(module, target="llvm")  # x86-64 objects: the aarch64 linker rejects them
    with pytest.raises(RuntimeError, match="wrong format"):
        export_aarch64(x86, library)
    assert [p.name for p in tmp_path.iterdir()] == ["bert.so"] and library.read_bytes() == b"previous"


@needs_emulation
def test_compile_for_raspberry_pi_5_verifies_in_emulation(zoo_model, tmp_path, capsys):
    import zoo
    from edgec.cli import main

    src = zoo_model("bert", "dynamo")
    data = tmp_path / "inputs.npz"
    np.savez(data, **zoo.zoo_inputs("bert", src, batch=2, seq_len=16))
    out = tmp_path / "out"
    rc = main(["compile", str(src), "--target", "raspberry-pi-5", "--backend", "tvm", "-o", str(out),
               "--inputs", str(data)])
    assert rc == 0, capsys.readouterr().err
    verification = json.loads((out / "report.json").read_text())["verification"]
    assert verification["verified_in"] == "tvm" and verification["passed"], verification
    assert verification["cosine_min"] >= 0.9999 and verification["samples"] == 2
    assert elf_machine(out / "model.so") == EM_AARCH64
    assert json.loads((out / "model.json").read_text())["llvm_target"] == aarch64_target(get_target("raspberry-pi-5"))
