"""TVM backend: the IR through TVM's Relax ONNX frontend, kernels tuned by MetaSchedule against a
persistent database, built with llvm into a shared library that the Relax VM loads (the host's CPU,
or an aarch64 device through a cross compiler and, for verification, user-mode emulation)."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import onnx_ir as ir

from edgec.backends import Artifact, Backend, RuntimeUnavailable
from edgec.backends.static import TensorSpec, run_static
from edgec.errors import UserError

INSTALL_HINT = "pip install 'edgec[tvm]' (apache-tvm==0.27.0.post1 with apache-tvm-ffi==0.1.14.post1)"
CROSS_INSTALL_HINT = "install the aarch64 C++ cross compiler: apt-get install g++-aarch64-linux-gnu"
# Where tuning records live under the edgec cache when no --tuning-db is given. The number changes
# when older records would mislead: the budget counts records, so records of a space edgec no longer
# searches, or measured on a thread count it no longer runs (before 2: one thread on a 2-core host,
# TVM's generic MatMul space), would stop the search for better ones.
DATABASE_FOLDER = "tvm-tuning-2"
# Latency of the artifact and, when tuning records were applied, of the untuned build (TVM's own loop
# nests: no records, no edgec schedules), measured alternately: rounds after one warm-up each, fewer
# when a round is slow (an untuned transformer runs for seconds).
LATENCY_ROUNDS = 5
LATENCY_SECONDS = 20.0


class TVMBackend(Backend):
    name = "tvm"
    description = "Relax VM shared library (llvm), kernels tuned by MetaSchedule"
    precisions = ("fp32",)
    # The Relax ONNX frontend fails on symbolic dims in the exporters' Reshape/Expand/Resize shape
    # arithmetic (bert, gpt2, llama, mobilevit of the zoo), and tuning needs one shape per kernel.
    dynamic_shapes = False
    # MatMul/Softmax/MatMul is what Relax fuses and MetaSchedule tunes; one LayerNorm and one Gelu
    # op become one kernel each instead of a chain of elementwise ones.
    attention_form = "decomposed"
    fusions = ("fuse-layer-norm", "fuse-gelu")

    def __init__(self) -> None:
        self.trials = 0
        self.database: Path | None = None
        self.progress: Callable[[str], None] = lambda message: None

    def configure(self, options, progress: Callable[[str], None]) -> None:
        """tune_trials: the trial budget of the model's kernels, records already in the database
        counted (0: no new trials; whatever the database holds is still applied). tuning_db: the
        database folder (default: DATABASE_FOLDER under the edgec cache)."""
        trials = options.tune_trials
        if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
            raise UserError(f"--tune-trials {trials!r} is not a trial count", "give a whole number, 0 or more")
        database = Path(options.tuning_db) if options.tuning_db is not None else default_database(options.cache_dir)
        _check_database_folder(database)
        self.trials, self.database, self.progress = trials, database, progress

    def unavailable_reason(self) -> str | None:
        try:
            import tvm_ffi  # noqa: F401
            from tvm import relax  # noqa: F401
            from tvm.support.cc import get_cc
        except ImportError:
            return f"apache-tvm is not installed: {INSTALL_HINT}"
        if get_cc() is None:
            return "no C++ compiler links the Relax VM library: apt-get install g++"
        return None

    def artifact_names(self, stem: str = "model") -> tuple[str, ...]:
        return (f"{stem}.so", f"{stem}.json")

    def emit(self, model: ir.Model, outdir: Path, *, target, precision: str, stem: str = "model") -> Artifact:
        import tvm
        from tvm import relax

        from edgec.backends.tvm.convert import check_convertible, convert
        from edgec.backends.tvm.targets import llvm_target, runs_here, use_host_cores
        from edgec.backends.tvm.tuning import prepare, tune

        use_host_cores()  # tuning measures, and the latency is taken, on every core

        if precision not in self.precisions:
            raise UserError(f"the tvm backend writes {', '.join(self.precisions)}, not {precision}",
                            "choose one of those with --precision")
        inputs, outputs = _signature(model)
        check_convertible(model)
        llvm = llvm_target(target)
        build_target = tvm.target.Target(llvm)
        native = runs_here(target)
        if not native:
            _check_cross_compiler()
            if self.trials:
                raise UserError(f"tuning measures kernels on the CPU they run on, and {target.name} is not this machine",
                                "drop --tune-trials (tuning records already in the database are still applied)")
        self.progress(f"converting to Relax for {json.dumps(llvm)}")
        untuned = prepare(convert(model), build_target)
        database = self.database or default_database()
        tuned, summary = tune(untuned, build_target, database, self.trials if native else 0, self.progress)
        self.progress(f"building ({summary.tasks_tuned}/{summary.tasks} kernels tuned)")
        executable = relax.build(tuned, build_target)
        latency = None
        if native:
            baseline = relax.build(untuned, build_target) if summary.tasks_tuned else None
            latency = _latencies(executable, baseline, inputs, self.progress)

        outdir = Path(outdir)
        outdir.mkdir(parents=True, exist_ok=True)
        library, manifest = outdir / f"{stem}.so", outdir / f"{stem}.json"
        meta = {
            "precision": precision,
            "arch": target.arch,
            "llvm_target": llvm,
            "inputs": {s.name: list(s.shape) for s in inputs},
            "input_dtypes": {s.name: s.dtype for s in inputs},
            "outputs": outputs,
            "function": "main",
            "tuning": summary.as_dict(),
            "latency_ms": latency,
        }
        _write_atomically(library, lambda tmp: _export(executable, tmp, native))
        _write_atomically(manifest, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
        return Artifact(self.name, library, [library, manifest], meta)

    def run(self, artifact: Artifact, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run_tvm(artifact.path, feeds)


def default_database(cache_dir: Path | None = None) -> Path:
    """The tuning database shared by compiles: DATABASE_FOLDER under the edgec cache."""
    from edgec.compiler import default_cache_dir

    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / DATABASE_FOLDER


def run_tvm(library: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Runs an artifact (the .so and the .json beside it) on feeds of any batch: in this process's
    Relax VM when it was built for this machine, under emulation when it was built for aarch64."""
    from edgec.backends.tvm.targets import host_arch, use_host_cores

    use_host_cores()
    library = Path(library)
    meta = json.loads(library.with_suffix(".json").read_text())
    inputs = [TensorSpec(name, tuple(shape), meta["input_dtypes"][name]) for name, shape in meta["inputs"].items()]
    if meta["arch"] == host_arch():
        call = _vm_call(library, meta["function"])
    else:
        from edgec.backends.tvm import emulate

        reason = emulate.emulation_unavailable_reason()
        if reason:
            raise RuntimeUnavailable(reason)
        # One emulated VM for every chunk (starting one costs seconds), on the target's own core.
        with emulate.EmulatedVM(library, emulate.qemu_cpu(meta["llvm_target"])) as vm:
            return run_static(lambda arrays: vm(arrays, meta["function"]), inputs, meta["outputs"], feeds, library.name)
    return run_static(call, inputs, meta["outputs"], feeds, library.name)


def _vm_call(library: Path, function: str) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())

    def call(arrays: list[np.ndarray]) -> list[np.ndarray]:
        return _to_numpy(vm[function](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]))
    return call


def _to_numpy(result) -> list[np.ndarray]:
    """The VM returns one tensor for a single output and an array of them for several."""
    if hasattr(result, "numpy"):
        return [result.numpy()]
    return [item for part in result for item in _to_numpy(part)]


def _signature(model: ir.Model) -> tuple[list[TensorSpec], list[str]]:
    """The graph's inputs (static shapes, as the compile specialised them) and output names."""
    graph = model.graph
    inputs = []
    for value in graph.inputs:
        if value.name in graph.initializers:
            continue
        if value.shape is None or not all(isinstance(d, int) for d in value.shape):
            raise UserError(f"the tvm backend needs static input shapes; {value.name!r} is {value.shape}",
                            "give every input's shape with --shape, e.g. --shape input_ids=1x128")
        inputs.append(TensorSpec(value.name, tuple(value.shape), str(value.dtype.numpy())))
    return inputs, [value.name for value in graph.outputs]


def _latencies(artifact, untuned, inputs: list[TensorSpec], progress: Callable[[str], None]) -> dict:
    """Median milliseconds per call of the artifact and (when there is one) the untuned build,
    alternated round by round so that load on the machine affects both alike."""
    import tvm
    from tvm import relax

    progress("measuring latency" + (" (artifact and untuned)" if untuned is not None else ""))
    arrays = [tvm.runtime.tensor(np.zeros(s.shape, s.dtype)) for s in inputs]  # index 0 is in every table
    builds = {"artifact": artifact, "untuned": untuned} if untuned is not None else {"artifact": artifact}
    machines = {name: relax.VirtualMachine(ex, tvm.cpu())["main"] for name, ex in builds.items()}
    times: dict[str, list[float]] = {name: [] for name in machines}
    for main in machines.values():
        main(*arrays)  # warm-up: first-call allocation and page faults
    deadline = time.perf_counter() + LATENCY_SECONDS
    for _ in range(LATENCY_ROUNDS):
        for name, main in machines.items():
            started = time.perf_counter()
            main(*arrays)
            times[name].append(time.perf_counter() - started)
        if time.perf_counter() > deadline:
            break
    medians = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
    result: dict = {name: float(f"{ms:.4g}") for name, ms in medians.items()}  # a small kernel takes microseconds
    result["rounds"] = len(times["artifact"])
    result["threads"] = int(tvm.get_global_func("runtime.NumThreads")())
    if "untuned" in medians:
        result["speedup"] = float(f"{medians['untuned'] / medians['artifact']:.3g}")
    return result


def _export(executable, path: Path, native: bool) -> None:
    if native:
        executable.export_library(str(path))
    else:
        from edgec.backends.tvm.emulate import export_aarch64

        export_aarch64(executable, path)


def _check_cross_compiler() -> None:
    from edgec.backends.tvm.emulate import cross_compiler

    if cross_compiler() is None:
        raise UserError("building for aarch64 needs a C++ cross compiler, and none is installed", CROSS_INSTALL_HINT)


def _check_database_folder(path: Path) -> None:
    from edgec.compiler import _check_writable_folder

    _check_writable_folder(path, "tuning database (--tuning-db)")


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write` fills a unique temporary name beside `path` (same suffix: tools pick formats by it),
    which then replaces `path`."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
