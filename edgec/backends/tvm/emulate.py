"""aarch64 for the TVM backend: the llvm target a device's CPU features ask for, a cross-linked shared
library, and a Relax VM that runs it under user-mode emulation (qemu-aarch64) so that it can be verified.

This file is also the program that runs inside the emulator: the sysroot's aarch64 Python executes it
with only numpy, tvm_ffi and libtvm_runtime.so (see tools/setup_aarch64.sh), so at module level it
imports nothing else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np

CROSS_CXX = "aarch64-linux-gnu-g++"
EMULATOR = "qemu-aarch64"
SETUP = "make setup-aarch64"
TRIPLE = "aarch64-linux-gnu"

# edgec's cpu_features names -> LLVM's AArch64 subtarget features.
FEATURES = {
    "neon": "+neon",
    "fp16": "+fullfp16",
    "dotprod": "+dotprod",
    "i8mm": "+i8mm",
    "bf16": "+bf16",
    "sve": "+sve",
    "sve2": "+sve2",
}

# A CPU unit's description names its Arm cores: "4x Arm Cortex-A76 @2.4GHz", "1x Cortex-X4, 2x A720",
# "6x Arm Cortex-A78AE".
_CORES = re.compile(r"(?:(\d+)\s*x\s*(?:Arm\s+)?(?:Cortex-)?|Cortex-)([AX]\d{1,3}[A-Z]{0,2})\b", re.IGNORECASE)

_KDL_CPU = 1  # DLPack's device type for the host CPU
_POOLED_ALLOCATOR = 2  # the Relax VM's allocator kinds: 1 naive, 2 pooled (what relax.VirtualMachine uses)
_STDERR_TAIL = 2000  # characters of the emulator's stderr that an EmulationError quotes


class EmulationError(RuntimeError):
    """The aarch64 library failed to load or run under the emulator; carries the emulator's stderr tail."""


def aarch64_target(target) -> dict:
    """TVM's dict-form llvm target for an aarch64 edgec Target: its cpu_features as LLVM attributes,
    plus mcpu (when LLVM knows the core) and num-cores where the CPU units' descriptions name their cores.

    mcpu is set only for a single kind of core: for big.LITTLE chips (Snapdragon) scheduling for one
    core would mistune the others, and the mattr already states what every core can execute.
    """
    from edgec.errors import UserError

    if target.arch != "aarch64":
        raise UserError(f"target {target.name!r} is {target.arch}, not aarch64", "cross-compile only aarch64 targets")
    unknown = [f for f in target.cpu_features if f not in FEATURES]
    if unknown:
        raise UserError(
            f"target {target.name!r}: cpu_features {', '.join(unknown)} have no aarch64 code generation here",
            f"use the known ones: {', '.join(FEATURES)}",
        )
    llvm = {"kind": "llvm", "mtriple": TRIPLE, "mattr": [FEATURES[f] for f in target.cpu_features]}
    cores = _cpu_cores(target)
    if len(cores) == 1 and _llvm_knows(next(iter(cores))):
        llvm["mcpu"] = next(iter(cores))
    if cores:
        llvm["num-cores"] = sum(cores.values())
    return llvm


def _cpu_cores(target) -> dict[str, int]:
    """LLVM's name of each core model the target's CPU units describe -> how many of it there are."""
    cores: dict[str, int] = {}
    for unit in target.units:
        if unit.kind == "cpu":
            for count, core in _CORES.findall(unit.description):
                name = f"cortex-{core.lower()}"
                cores[name] = cores.get(name, 0) + int(count or 1)
    return cores


def _llvm_knows(cpu: str) -> bool:
    """Whether TVM's LLVM can tune for this aarch64 core (an unknown mcpu is only a logged error there)."""
    from tvm.target import codegen

    return bool(codegen.llvm_is_valid_cpu(cpu, TRIPLE))


def cross_compiler() -> str | None:
    """The aarch64 C++ cross compiler on PATH, which links TVM's object files into a shared library."""
    return shutil.which(CROSS_CXX)


def sysroot() -> Path:
    """Where tools/setup_aarch64.sh puts the aarch64 Python: under edgec's cache folder."""
    from edgec.compiler import default_cache_dir

    return default_cache_dir() / "aarch64-sysroot"


def _manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / "edgec-sysroot.json").read_text())
    except (OSError, ValueError):
        return None


def _missing() -> tuple[str, str] | None:
    """(what is missing, the fix) when aarch64 libraries cannot be built and run here."""
    from importlib.metadata import PackageNotFoundError, version

    fix = f"run `{SETUP}` (or `bash tools/setup_aarch64.sh`)"
    if cross_compiler() is None:
        return f"no aarch64 cross compiler ({CROSS_CXX} is not on PATH)", fix
    if shutil.which(EMULATOR) is None:
        return f"no aarch64 emulator ({EMULATOR} is not on PATH)", fix
    root = sysroot()
    manifest = _manifest(root)
    if manifest is None:
        return f"no aarch64 sysroot at {root}", fix
    for dist in ("apache-tvm", "apache-tvm-ffi"):
        try:
            host = version(dist)
        except PackageNotFoundError:
            return f"{dist} is not installed", "install edgec's TVM extra: pip install 'edgec[tvm]'"
        if manifest.get(dist) != host:
            return f"the aarch64 sysroot has {dist} {manifest.get(dist)}, this Python {host}", fix
    return None


def emulation_unavailable_reason() -> str | None:
    """None when aarch64 libraries can be built and run here, else one line: what is missing and the fix."""
    missing = _missing()
    return None if missing is None else ": ".join(missing)


def export_aarch64(executable, path: Path) -> None:
    """Links a Relax VM executable built for an aarch64 llvm target into the aarch64 shared library
    `path`, atomically: a failed link leaves no file, and a reader never sees half of one."""
    from tvm.support import cc

    from edgec.errors import UserError

    compiler = cross_compiler()
    if compiler is None:
        raise UserError(f"no aarch64 cross compiler ({CROSS_CXX} is not on PATH)", f"run `{SETUP}`")
    path = Path(path)
    # A fresh name for the linker to create (a mkstemp file would keep its 0600 mode), beside `path`.
    temp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.so")
    try:
        executable.export_library(str(temp), fcompile=cc.cross_compiler(compiler))
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def qemu_cpu(llvm_target: dict) -> str:
    """The emulated CPU for a library built for `llvm_target`: its mcpu where qemu models that core,
    so that an instruction the core lacks traps, else qemu's "max" (every feature it implements)."""
    mcpu = llvm_target.get("mcpu")
    if mcpu and shutil.which(EMULATOR):
        # `-cpu help` lists the models on stdout and exits 1.
        listing = subprocess.run([EMULATOR, "-cpu", "help"], capture_output=True, text=True).stdout
        if mcpu in listing.split():
            return mcpu
    return "max"


class EmulatedVM:
    """An aarch64 Relax VM library loaded once in the sysroot's Python under qemu-aarch64, then called
    any number of times: starting the emulated Python and loading the library take seconds, so a run
    over many batches pays them once.

    Arrays cross in .npz files in a temporary folder; stdin/stdout carry one line per call (the function
    to call, then "done"). The emulated side exits on any error, and its stderr tail becomes the
    EmulationError raised here.
    """

    def __init__(self, library: Path, cpu: str = "max"):
        from edgec.errors import UserError

        missing = _missing()
        if missing is not None:
            raise UserError(*missing)
        self.library = Path(library).resolve()
        self.cpu = cpu
        root = sysroot()
        manifest = _manifest(root)
        self._work = tempfile.TemporaryDirectory(prefix="edgec-aarch64-")
        work = Path(self._work.name)
        self._stderr = open(work / "stderr.txt", "w+")
        # -I: the host's PYTHONPATH (x86 modules) and this file's folder stay off the aarch64 Python's path.
        command = [EMULATOR, "-L", str(root), "-cpu", cpu, str(root / manifest["python"]), "-I",
                   str(Path(__file__).resolve()), str(self.library), str(work), str(root / manifest["tvm_runtime"])]
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._stderr, text=True)

    def __call__(self, inputs: list[np.ndarray], function: str = "main") -> list[np.ndarray]:
        work = Path(self._work.name)
        np.savez(work / "inputs.npz", **{f"input_{i}": np.asarray(a) for i, a in enumerate(inputs)})
        try:
            self._process.stdin.write(function + "\n")
            self._process.stdin.flush()
        except BrokenPipeError:
            pass  # it has died: the missing reply below reports why
        if self._process.stdout.readline().strip() != "done":
            raise self._failure()
        with np.load(work / "outputs.npz") as outputs:
            return [outputs[f"output_{i}"] for i in range(len(outputs.files))]

    def _failure(self) -> EmulationError:
        code = self._process.wait()
        # A negative code is the signal that ended it: SIGILL for an instruction the emulated core lacks.
        ended = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        self._stderr.seek(0)
        tail = self._stderr.read()[-_STDERR_TAIL:].strip()
        return EmulationError(f"{self.library.name} failed under {EMULATOR} -cpu {self.cpu} ({ended}):\n{tail}")

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.close()  # end of requests: the emulated side returns
            self._process.wait()
        self._process.stdout.close()
        self._stderr.close()
        self._work.cleanup()

    def __enter__(self) -> EmulatedVM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_emulated(library: Path, inputs: list[np.ndarray], function: str = "main", cpu: str = "max") -> list[np.ndarray]:
    """Calls `function` of an aarch64 Relax VM library once under qemu-aarch64 and returns its outputs
    (about 5 s of start-up under emulation: for several calls, keep one EmulatedVM)."""
    with EmulatedVM(library, cpu) as vm:
        return vm(inputs, function)


# ---- the emulated side: runs in the sysroot's aarch64 Python -------------------------------------------


def _to_numpy(value) -> list[np.ndarray]:
    """A VM result as arrays: a tensor, or a (nested) tuple of them, in order."""
    import tvm_ffi

    if isinstance(value, tvm_ffi.Tensor):
        return [np.from_dlpack(value).copy()]
    if isinstance(value, (tvm_ffi.Array, list, tuple)):
        return [array for item in value for array in _to_numpy(item)]
    raise TypeError(f"the function returned a {type(value).__name__}, not tensors")


def _serve(library: str, work: str, runtime: str) -> None:
    """Loads `library` in the Relax VM, then for each function name on stdin calls it on
    work/inputs.npz, writes work/outputs.npz and answers "done".

    Only libtvm_runtime.so is loaded, through tvm_ffi: the full tvm package would also import its
    compiler library, which takes about 12 s more under emulation and is not needed to run a module.
    """
    import ctypes

    import tvm_ffi

    ctypes.CDLL(runtime, ctypes.RTLD_GLOBAL)  # registers the Relax VM's functions with tvm_ffi
    vm = tvm_ffi.load_module(library)["vm_load_executable"]()
    vm["vm_initialization"](_KDL_CPU, 0, _POOLED_ALLOCATOR)
    for line in sys.stdin:
        with np.load(Path(work) / "inputs.npz") as data:
            inputs = [np.ascontiguousarray(data[f"input_{i}"]) for i in range(len(data.files))]
        result = vm[line.strip()](*[tvm_ffi.from_dlpack(a) for a in inputs])
        np.savez(Path(work) / "outputs.npz", **{f"output_{i}": a for i, a in enumerate(_to_numpy(result))})
        print("done", flush=True)


if __name__ == "__main__":
    _serve(*sys.argv[1:])
