"""MetaSchedule tuning of a Relax module's kernels against a persistent database.

Records are keyed by workload (the kernel's TIR, structurally hashed) and target, not by model: a
second compile of the same model, or of another model with the same layer shapes, finds them. The
trial budget counts the records already there, so repeating a compile with the same budget runs no
new trials; more budget continues the search from the best schedules found so far.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from edgec.report import exclusive

# Candidates measured per search round: MetaSchedule's default, lowered so that a budget reaches
# every kernel (the task scheduler visits each kernel once before it picks by expected gain).
TRIALS_PER_ROUND = 64
# Kernels below this share of the model's FLOPs (reshapes, transposes, casts, small elementwise ops)
# are not searched: the budget goes where the time is, the MatMuls. Records of them are still applied.
MIN_FLOP_SHARE = 0.01
# Enough records per workload to count "already tuned" without reading a database whole.
_RECORDS_COUNTED = 10_000


@dataclass
class TuningSummary:
    database: str
    tasks: int               # distinct kernels (workloads) of the model
    budget: int              # trials asked for, records already there included
    trials_run: int          # candidates measured by this compile
    records_reused: int      # records of these workloads that were in the database before
    tasks_tuned: int         # kernels that got a tuned schedule in the build
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def prepare(mod, target):
    """Legalizes Relax ops into fused TIR kernels: the form whose kernels tuning sees.

    GELU and softmax are legalized to TOPI's fast forms (a polynomial erf, an exponent-bit exp): TVM's
    llvm codegen lowers T.erf and T.exp to scalar libm calls (erff, expf), one per element, which undo
    the vectorization of the FFN MatMul's GELU epilogue and of softmax. On MiniLM 1x128 that took the
    FFN-up kernel to 1.55x the time of FFN-down, its FLOP twin; the fast forms are within 3e-6 of
    onnxruntime, as the libm ones are."""
    import tvm
    from tvm import relax

    with tvm.target.Target(target):
        return tvm.transform.Sequential([
            relax.transform.DecomposeOpsForInference(),
            relax.transform.CanonicalizeBindings(),
            relax.transform.LegalizeOps(customize_legalize_map=_fast_math()),
            relax.get_pipeline("zero"),
        ])(mod)


def _fast_math() -> dict:
    """Legalizations of relax.nn.gelu, relax.erf and relax.nn.softmax to vectorizable TIR."""
    from tvm import tirx, topi

    def gelu(bb, call):
        def compute(x):
            half = tirx.const(0.5, x.dtype)
            return x * (half + topi.fast_erf(x * tirx.const(0.5 ** 0.5, x.dtype)) * half)
        return bb.call_te(compute, call.args[0], primfunc_name_hint="gelu")

    def erf(bb, call):  # an exporter's own GELU (x * 0.5 * (1 + erf(x / sqrt 2))) that fuse-gelu did not take
        return bb.call_te(topi.fast_erf, call.args[0], primfunc_name_hint="erf")

    def softmax(bb, call):
        return bb.call_te(topi.nn.fast_softmax, call.args[0], call.attrs.axis, primfunc_name_hint="softmax")

    return {"relax.nn.gelu": gelu, "relax.erf": erf, "relax.nn.softmax": softmax}


def tune(mod, target, database_dir: Path, budget: int, progress: Callable[[str], None]):
    """Tunes the kernels of `mod` (prepared) up to `budget` trials, records included, and applies
    the best schedule of every kernel the database knows. Returns (module, TuningSummary)."""
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight as dl
    from tvm.s_tir import meta_schedule as ms

    from edgec.backends.tvm import gemm

    started = time.perf_counter()
    target = tvm.target.Target(target)
    database_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(database_dir / ".lock"):  # its JSON lines are not written atomically
        database = ms.database.JSONDatabase(work_dir=str(database_dir))
        tasks = ms.relax_integration.extract_tasks(mod, target)
        reused = sum(_record_count(database, task.dispatched[0]) for task in tasks)
        searched = _worth_searching(tasks)
        to_run = max(0, budget - reused) if searched else 0
        measured = 0
        if to_run:
            progress(f"tuning {len(searched)} of {len(tasks)} kernels: {to_run} trials ({reused} records reused)")
            measured = _search(searched, target, database, to_run, progress)
        with target, database:
            tuned = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
            # Kernels without a record (below MIN_FLOP_SHARE, not reached by the budget, a target
            # that cannot be measured here): MatMuls get the default point of edgec's micro-kernel
            # space, and dlight's CPU reduction rule gives LayerNorm and softmax a parallel, vectorized
            # schedule instead of a single-threaded loop nest, for no trials. (Its GEMV rule asserts
            # on MobileViT.)
            tuned = dl.ApplyDefaultSchedule(gemm.DefaultMatMul(), dl.cpu.Reduction())(tuned)
        applied = sum(1 for task in tasks if database.query_tuning_record(task.dispatched[0], target, "main"))
    summary = TuningSummary(str(database_dir), len(tasks), budget, measured, reused, applied,
                            round(time.perf_counter() - started, 2))
    return tuned, summary


def _worth_searching(tasks) -> list:
    """The kernels that carry at least MIN_FLOP_SHARE of the model's FLOPs (each use counted)."""
    from tvm.s_tir.analysis import estimate_tir_flops

    flops = [estimate_tir_flops(task.dispatched[0]) * task.weight for task in tasks]
    total = sum(flops) or 1.0
    return [task for task, f in zip(tasks, flops) if f / total >= MIN_FLOP_SHARE]


def _search(tasks, target, database, trials: int, progress: Callable[[str], None]) -> int:
    """Runs the search; returns how many candidates were measured."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    from edgec.backends.tvm.measure import in_process_builder, in_process_runner

    @derived_object
    class Report(ms.measure_callback.PyMeasureCallback):
        """Reports each measured round through the compile's progress callback."""

        def __init__(self):
            self.done = 0

        def apply(self, task_scheduler, task_id, candidates, builder_results, runner_results):
            self.done += len(runner_results)
            times = [sum(r.run_secs) / len(r.run_secs) for r in runner_results if r.run_secs]
            best = f", best of round {min(float(t) for t in times) * 1e3:.3f} ms" if times else ""
            progress(f"tuning: {min(self.done, trials)}/{trials} trials (kernel {task_id + 1}/{len(tasks)}{best})")

    # The search's own logs are per-run diagnostics: they go to a folder that is removed afterwards,
    # and its console output (task tables at INFO) gives way to the compile's progress line.
    report = Report()
    with tempfile.TemporaryDirectory(prefix="edgec-tune-") as logs, _console_level(logging.ERROR):
        contexts = _contexts(tasks, target, logs)
        ms.tune_tasks(
            tasks=contexts, task_weights=[task.weight for task in tasks], work_dir=logs, max_trials_global=trials,
            num_trials_per_iter=max(1, min(TRIALS_PER_ROUND, trials // len(tasks))), database=database,
            builder=in_process_builder(), runner=in_process_runner(),
            measure_callbacks=[*ms.MeasureCallback.create("default"), report],
        )
    return report.done


def _contexts(tasks, target, logs: str) -> list:
    """One tune context per kernel: MatMul kernels search the micro-kernel space of
    edgec.backends.tvm.gemm (its decisions are categorical: the evolutionary search's initial
    population samples them and its cost model ranks them), the others MetaSchedule's generic space."""
    from tvm.s_tir.meta_schedule import TuneContext
    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir
    from tvm.s_tir.meta_schedule.space_generator import ScheduleFn
    from tvm.s_tir.meta_schedule.utils import fork_seed

    from edgec.backends.tvm import gemm

    loggers = get_loggers_from_work_dir(logs, [task.task_name for task in tasks])
    contexts = []
    for task, logger, seed in zip(tasks, loggers, fork_seed(None, n=len(tasks))):
        kernel = task.dispatched[0]
        space = (ScheduleFn(gemm.design_spaces, sch_rules=[], mutator_probs={}) if gemm.applies(kernel)
                 else "post-order-apply")
        contexts.append(TuneContext(mod=kernel, target=target, space_generator=space, search_strategy="evolutionary",
                                    task_name=task.task_name, logger=logger, rand_state=seed).clone())
    return contexts


def _record_count(database, kernel) -> int:
    if not database.has_workload(kernel):
        return 0
    return len(database.get_top_k(database.commit_workload(kernel), _RECORDS_COUNTED))


@contextlib.contextmanager
def _console_level(level: int):
    """MetaSchedule's console handler takes the level of its package logger when tuning starts."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)

