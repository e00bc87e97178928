"""MetaSchedule's builder and runner, in the compiling process.

TVM's LocalBuilder starts a fresh pool of worker processes for every round of candidates, and each
worker imports TVM, torch (through tvm_ffi) and TVM's tensor-intrinsic library: over a minute of CPU
per worker, many minutes on a loaded machine, which turns a few trials into a quarter of an hour.
Here the compiling process, which has paid those imports once, builds and times the candidates
itself with TVM's own build, export, argument and evaluator functions. What is given up is
isolation: a candidate that crashed would take the compile with it, which llvm CPU kernels that
passed MetaSchedule's postprocessors do not do in practice.
"""

from __future__ import annotations


def in_process_builder():
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            results = []
            for item in build_inputs:
                try:
                    results.append(BuilderResult(default_export(default_build(item.mod, item.target, None)), None))
                except Exception as exc:  # a candidate that does not compile is a failed trial, not an error
                    results.append(BuilderResult(None, f"{type(exc).__name__}: {exc}"))
            return results

    return InProcessBuilder()


def in_process_runner():
    import tvm
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, PyRunner
    from tvm.s_tir.meta_schedule.runner.local_runner import (
        LocalRunnerFuture, default_alloc_argument, default_run_evaluator,
    )

    config = EvaluatorConfig._normalized(None)  # MetaSchedule's defaults: 3 runs of at least 100 ms

    @derived_object
    class InProcessRunner(PyRunner):
        def run(self, runner_inputs):
            futures = []
            for item in runner_inputs:
                try:
                    device = tvm.runtime.device(str(item.device_type), 0)
                    arguments = default_alloc_argument(device, tuple(a.as_json() for a in item.args_info), 1)
                    module = tvm.runtime.load_module(str(item.artifact_path))
                    futures.append(LocalRunnerFuture(res=default_run_evaluator(module, device, config, arguments)))
                except Exception as exc:  # a candidate that fails to run is a failed trial
                    futures.append(LocalRunnerFuture(error_message=f"{type(exc).__name__}: {exc}"))
            return futures

    return InProcessRunner()
