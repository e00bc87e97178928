"""`edgec compile`: source -> IR -> target pipeline -> backend artifact -> verification -> report."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import edgec
from edgec import ir as eir
from edgec.backends import BACKENDS, Artifact, Backend, RuntimeUnavailable
from edgec.errors import UserError
from edgec.passes.core import DebugCounter, PassContext
from edgec.passes.instruments import Instrument, PrintAfterChange, Progress, VerifyAfterEachPass
from edgec.passes.manager import PassManager
from edgec.passes.registry import MAX_FIXPOINT_ROUNDS
from edgec.pruning import DEFAULT_PRUNE_BUDGET, PruneRequest, check_budgets, hold_out, parse_prune
from edgec.report import write_json
from edgec.sources import load_source
from edgec.targets import Target, get_target
from edgec.verify import (
    check_tolerance, compare, fit_feeds, generate_inputs, load_inputs, ort_session, parse_tolerance, run_model, run_session, token_mask,
)

PRECISIONS = ("fp32", "fp16", "int8", "mixed")
# What this build can emit. The rest are accepted by the parser and refused with a clear reason.
IMPLEMENTED_PRECISIONS = ("fp32", "fp16", "int8", "mixed")
QUANTIZED = ("int8", "mixed")
# Fewer samples than this give ranges that depend on which sentences happened to be chosen.
MIN_CALIBRATION_SAMPLES = 8
CALIBRATION_METHODS = ("minmax", "percentile", "entropy", "mse")
# Quantized results (insert-qdq's outputs) whose int8 signal-to-noise calibration estimates below this
# stay float. MiniLM's residual branches measure 10-22 dB (with them quantized its cosine falls to 0.78);
# at 30 dB the int8 .tflite's least sentence cosine is 0.9896, at 36 dB 0.9922, as fast.
MIN_OUTPUT_SQNR_DB = 36.0
# Samples of the calibration data that mixed precision runs each candidate on.
MIXED_SAMPLES = 32


@dataclass
class CompileOptions:
    target: str
    outdir: Path = Path("out")
    precision: str = "fp32"
    inputs: Path | None = None
    calib: Path | None = None
    pipeline: str | None = None
    backend: str | None = None
    tolerance: str | None = None
    calib_method: str = "minmax"
    # mixed: the budget on `metric` (cosine: least mean output cosine, default 0.999; top1: most
    # top-1 accuracy drop as a fraction, default 0.01), checked on `eval` (default: the calibration data)
    accuracy_budget: float | None = None
    eval: Path | None = None
    metric: str = "cosine"
    # Static input shapes (name -> dims). Backends without dynamic shapes (TFLite) get the rest from
    # the verification inputs: batch 1, their other dims.
    shapes: dict[str, tuple[int, ...]] | None = None
    smooth: bool = True  # int8/mixed: SmoothQuant with each activation's alpha chosen by measured error
    # Backends that tune their kernels (TVM's MetaSchedule): the trial budget (0: the backend's
    # default) and the tuning database kept between compiles (default: under cache_dir).
    tune_trials: int = 0
    tuning_db: Path | None = None
    # TFLite for a target with a Qualcomm SoC: also AOT-compile for its NPU where Qualcomm's SDK is
    # installed ("auto"; the report says why not where it is not), or never ("off").
    npu_aot: str = "auto"
    cache_dir: Path | None = None  # calibration statistics; default: $EDGEC_CACHE_DIR or ~/.cache/edgec
    # Structured pruning (edgec.pruning): "heads=0.25,ffn=0.25[,reconstruct=off]" or "auto", which
    # chooses by `latency_budget_ms` (the target's estimate) and/or `accuracy_budget` (mean cosine).
    prune: str | None = None
    latency_budget_ms: float | None = None
    exporter: str = "dynamo"
    debug_counter: str | None = None
    verify_each: bool = False
    dump_ir: Path | None = None


@dataclass
class CompileResult:
    artifact: Artifact | None
    report: dict[str, Any]
    report_path: Path
    passed: bool
    failures: list[str] = field(default_factory=list)


def _check_writable_folder(path: Path, what: str) -> None:
    """`path` is, or can be created as, a folder we may write into; creates nothing."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} exists and is not a folder", "pass a folder path")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {what} {path} ({existing} is not a writable folder)", "choose a writable folder")


def check_output_dir(outdir: Path, writes: list[str], sources: list[Path]) -> Path:
    """Fails early, before any work, when the output folder cannot take the files `writes` names:
    not writable, a folder in the way, or an output that would overwrite the model being compiled."""
    outdir = Path(outdir)
    _check_writable_folder(outdir, "output folder")
    resolved_sources = {p.resolve() for p in sources}
    for name in writes:
        dest = outdir / name
        if dest.resolve() in resolved_sources:
            raise UserError(f"compiling into {outdir} would overwrite the input {dest}", "choose another output folder with -o")
        if dest.is_dir():
            raise UserError(f"{dest} is a folder, where edgec writes a file", "remove it or choose another output folder")
    return outdir


def choose_backend(target: Target, requested: str | None, notes: list[str]) -> Backend:
    if requested:
        if requested not in target.backends:
            raise UserError(
                f"target {target.name} does not use backend {requested!r}",
                f"choose one of: {', '.join(target.backends)}",
            )
        if requested not in BACKENDS:
            raise UserError(
                f"backend {requested!r} is not part of this edgec build",
                f"choose one of the available backends: {', '.join(b for b in target.backends if b in BACKENDS)}",
            )
        backend = BACKENDS.get(requested)()
        reason = backend.unavailable_reason()
        if reason:
            raise UserError(f"backend {requested!r} cannot run here: {reason}", "install it or choose another --backend")
        if not backend.supports(target):
            raise UserError(f"backend {requested!r} does not support target {target.name}", f"choose one of: {', '.join(target.backends)}")
        return backend
    for name in target.backends:
        if name not in BACKENDS:
            notes.append(f"backend {name} is not part of this edgec build; skipped")
            continue
        backend = BACKENDS.get(name)()
        reason = backend.unavailable_reason()
        if reason:
            notes.append(f"backend {name} skipped: {reason}")
            continue
        if not backend.supports(target):
            notes.append(f"backend {name} does not support {target.name}; skipped")
            continue
        return backend
    raise UserError(
        f"none of target {target.name}'s backends ({', '.join(target.backends)}) is available here",
        "install one of them (see `edgec targets show " + target.name + "`)",
    )


def check_precision(precision: str, target: Target, backend: Backend, calib: Path | None, approximate: list[str] = ()) -> None:
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}", f"choose one of: {', '.join(PRECISIONS)}")
    if precision not in IMPLEMENTED_PRECISIONS:
        raise UserError(
            f"--precision {precision} is not implemented in this edgec version",
            f"use --precision {' or '.join(IMPLEMENTED_PRECISIONS)}",
        )
    needs = "int8" if precision == "mixed" else precision
    if needs not in target.precisions:
        raise UserError(
            f"target {target.name} supports no {precision} unit", f"choose one of: {', '.join(target.precisions)}"
        )
    if needs not in backend.precisions:
        raise UserError(
            f"backend {backend.name} cannot emit {precision}", f"choose one of: {', '.join(backend.precisions)}"
        )
    if precision in QUANTIZED and calib is None:
        raise UserError(
            f"--precision {precision} needs calibration data",
            "pass --calib DATA.npz: model inputs keyed by name, samples first (tools/prepare_data.py makes one)",
        )
    if calib is not None and precision not in QUANTIZED and not approximate:
        raise UserError(
            "--calib is only used to quantize or to measure approximate passes",
            "drop --calib, or compile with --precision int8 or mixed",
        )


def compile_model(
    source: str | os.PathLike, options: CompileOptions, *, progress: Callable[[str], None] | None = None
) -> CompileResult:
    step = progress or (lambda message: None)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def mark(stage: str, since: float) -> float:
        now = time.perf_counter()
        timings[stage] = round(now - since, 4)
        return now

    # Everything a user can get wrong is checked before the expensive work starts.
    target = get_target(options.target)
    notes: list[str] = []
    backend = choose_backend(target, options.backend, notes)
    backend.configure(options, step)
    counter = DebugCounter.parse(options.debug_counter)
    pipeline_text = options.pipeline if options.pipeline is not None else target.default_pipeline
    lowering = backend.lowering_pipeline(target, options.precision)
    prune = parse_prune(options.prune)
    check_budgets(prune, options.latency_budget_ms, options.accuracy_budget if prune else None, options.precision)
    if prune is not None and options.calib is None:
        raise UserError("--prune ranks heads and neurons and refits the layers on calibration data",
                        "pass --calib DATA.npz: model inputs keyed by name, samples first, like what the model will see")
    # Pruning runs after the target's pipeline, on blocks the analyses recognise, and before the
    # backend's lowering fuses them. --prune auto's ratio is chosen once the model is loaded.
    prune_text = (PruneRequest(0.5, 0.5).pipeline() if prune.auto else prune.pipeline()) if prune else ""
    full_pipeline = ",".join(p for p in (pipeline_text, prune_text, lowering) if p)
    manager = PassManager(full_pipeline or [], PassContext())  # parse now: unknown passes fail early
    manager.check_counter(counter)
    # Approximate passes are measured on calibration data when there is some: that is the data the
    # user says the model will see, and the accuracy budget (--tolerance) is checked on it.
    approximate = _approximate(manager)
    check_precision(options.precision, target, backend, options.calib, approximate)
    tolerance = parse_tolerance(options.tolerance, options.precision)
    if prune is not None:
        tolerance = _prune_tolerance(tolerance, options)
    verify_data = options.calib if approximate and options.calib is not None else options.inputs
    # A pruned model is refit on the calibration data, and measured there it looks far better than it
    # is: it is checked on --inputs, or on calibration samples held out from every refit.
    if prune is not None and options.inputs is not None:
        verify_data = options.inputs
    holding_out = prune is not None and options.inputs is None
    quantizing = options.precision in QUANTIZED
    evaluation_check(options, pruning=prune is not None)
    if options.shapes and backend.dynamic_shapes:
        raise UserError(f"backend {backend.name} keeps the model's dynamic shapes; --shape is for backends that need static ones",
                        "drop --shape, or pick such a backend (e.g. --backend tflite)")
    if quantizing and options.calib_method not in CALIBRATION_METHODS:
        raise UserError(f"unknown calibration method {options.calib_method!r}", f"choose one of: {', '.join(CALIBRATION_METHODS)}")
    if options.dump_ir is not None:
        _check_writable_folder(Path(options.dump_ir), "--dump-ir folder")
    source_path = Path(source)
    sources = eir.model_files(source_path) if source_path.is_file() else []
    writes = [*backend.artifact_names(), "report.json"]
    outdir = check_output_dir(options.outdir, writes, sources)

    t = time.perf_counter()
    step("loading model")
    model, onnx_path, export_tmp = load_source(source, exporter=options.exporter)
    try:
        original_nodes = eir.node_count(model)
        fused = _onnxruntime_ops(model)
        if fused and backend.name != "onnxruntime":
            raise UserError(f"{source} holds onnxruntime's fused ops ({fused}), which the {backend.name} backend cannot "
                            "lower", UNFUSED_FIX)
        # The source's files were listed for the output check; an export's are listed now.
        original_bytes = sum(f.stat().st_size for f in (sources or eir.model_files(onnx_path)))
        calib_feeds = _calibration_feeds(options.calib, model) if quantizing or prune is not None else None
        evaluation = _evaluation(options, model) if options.eval is not None else None
        batch_multiple = _batch_multiple(model) if prune is not None else 1
        if holding_out:
            calib_feeds, held_out = hold_out(calib_feeds, multiple=batch_multiple,
                                             keep=MIN_CALIBRATION_SAMPLES if quantizing else 1)
            feeds = held_out
            if held_out is calib_feeds:
                inputs_source = f"{verify_data} (the samples the refit fit: too few to hold any out)"
                notes.append("the pruned model is checked on the calibration samples it was refit on, which flatters "
                             "it: give more samples, or --inputs to check on")
            else:
                count = min(len(v) for v in held_out.values())
                chose = " and from --prune auto's choice" if prune.auto else ""
                inputs_source = f"{verify_data} ({count} samples held out from the refit{chose})"
                notes.append(f"{count} calibration samples were held out from the refit"
                             f"{' and the int8 ranges' if quantizing else ''} to check the pruned model on")
        elif verify_data is not None:
            feeds = load_inputs(verify_data, model)
            inputs_source = str(verify_data)
        else:
            feeds = generate_inputs(model)
            inputs_source = "generated"
        t = mark("load", t)

        step("running the original model")
        try:
            original = ort_session(onnx_path)
            reference = run_session(original, feeds)
        except Exception as exc:  # onnxruntime rejects the model or these inputs: nothing to compile against
            raise UserError(
                f"the original model does not run in onnxruntime on these inputs ({_first_line(exc)})",
                "check the model and --inputs (token ids inside the vocabulary, shapes the model accepts)",
            ) from None
        # Shape rewrites must hold for every size, not just the one verified: the original runs at a
        # second shape now, so its session is released before the passes run.
        alt = alt_reference = alt_skipped = None
        if backend.dynamic_shapes and _has_dynamic_dims(model):
            # Random tokens are not what an approximate pass was measured on: its second shape is the
            # verification data's, cut shorter.
            alt = (_shorter(feeds) if approximate and verify_data is not None else None) \
                or generate_inputs(model, batch=3, sequence=11, image=160, seed=1)
            try:
                alt_reference = run_session(original, alt)
            except Exception as exc:  # the original itself cannot take this shape: nothing to compare
                alt_skipped = f"the original model does not run at these shapes ({_first_line(exc)})"
        del original
        export_check = None
        if source_path.is_dir():
            # The user's original is the PyTorch model: the export must compute what it computes.
            from edgec.frontends.torch import run_hf_folder

            step("running the PyTorch model")
            (output_name,) = reference.keys() if len(reference) == 1 else (None,)
            if output_name is not None:
                export_check = compare(run_hf_folder(source_path, feeds, output_name), reference, token_mask(feeds))
        t = mark("reference", t)
        static_shapes = None
        if not backend.dynamic_shapes and (options.shapes or _has_dynamic_dims(model)):
            static_shapes = _specialize(model, options.shapes or {}, feeds)
            # Calibration and the accuracy budget run the specialized model: their data takes its shapes.
            if calib_feeds is not None:
                cut = sorted(k for k, v in calib_feeds.items() if k in static_shapes
                             and any(a > d for a, d in zip(v.shape[1:], static_shapes[k][1:])))
                if cut:
                    notes.append(f"calibration inputs {', '.join(cut)} were cut to the static shapes "
                                 "(the artifact sees no more than that)")
                calib_feeds = fit_feeds(calib_feeds, static_shapes)
            if evaluation is not None:
                evaluation = dataclasses.replace(evaluation, feeds=fit_feeds(evaluation.feeds, static_shapes))
            alt = None  # the artifact takes one shape

        instruments: list[Instrument] = [Progress(step)]
        if options.verify_each:
            instruments.append(VerifyAfterEachPass(feeds, reference, tolerance["min_cosine"]))
        if options.dump_ir is not None:
            instruments.append(PrintAfterChange(dump_dir=options.dump_ir))
        ctx = PassContext(
            target=target,
            options={"precision": options.precision, "backend": backend.name},
            counter=counter,
            instruments=instruments,
        )
        manager.ctx = ctx
        pruning = None
        if prune is None:
            result = manager.run(model)
        else:
            result, pruning, manager = _run_with_pruning(model, prune, ctx, options, target, backend, calib_feeds,
                                                         batch_multiple, static_shapes, (pipeline_text, lowering), step)
            approximate = _approximate(manager)  # --prune auto's shares are known only now
        model = result.model
        t = mark("passes", t)
        quantization = None
        if quantizing:
            quantization = _quantize(model, backend, target, ctx, calib_feeds, options, step, result, evaluation)
            t = mark("quantize", t)
        eir.verify(model)

        step(f"emitting {backend.name} artifact")
        try:
            outdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create output folder {outdir} ({exc.strerror})", "choose a writable folder with -o") from None
        staging = Path(tempfile.mkdtemp(prefix=".edgec-staging-", dir=outdir))
        try:
            artifact = backend.emit(model, staging, target=target, precision=options.precision)
            t = mark("emit", t)

            step(f"verifying in {backend.name}")
            runtime_note = None
            try:
                outputs = backend.run(artifact, feeds)
                verified_in = backend.name
            except RuntimeUnavailable as exc:
                # The artifact's runtime is not on this machine: check the final IR instead, and say so.
                runtime_note = str(exc)
                outputs = run_model(model, feeds)
                verified_in = "onnxruntime (final IR; artifact runtime unavailable here)"
            figures = compare(reference, outputs, token_mask(feeds))
            failures = check_tolerance(figures, tolerance)
            second_shape = None
            if runtime_note is None and alt is not None:
                step("verifying at a second input shape")
                second_shape = {"shapes": {k: list(v.shape) for k, v in alt.items()}}
                if alt_skipped:
                    second_shape["skipped"] = alt_skipped
                else:
                    try:
                        second_shape.update(compare(alt_reference, backend.run(artifact, alt), token_mask(alt)))
                        failures += [f"at the second shape: {f}" for f in check_tolerance(second_shape, tolerance)]
                    except Exception as exc:
                        failures.append(f"the artifact fails at shapes the original runs ({_first_line(exc)})")
            if approximate and failures:
                failures = [f"{', '.join(approximate)} breaks the accuracy budget on {inputs_source} ({'; '.join(failures)})"]
            if export_check is not None:
                failures += [f"the ONNX export differs from PyTorch: {f}" for f in check_tolerance(export_check, tolerance)]
            t = mark("verify", t)
            if not failures:
                artifact = _publish(artifact, staging, outdir)
            else:
                # A model left from an earlier compile must not pass for this one's result.
                for name in backend.artifact_names():
                    stale = outdir / name
                    if stale.is_file():
                        stale.unlink()
                        notes.append(f"removed {stale} from an earlier compile")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        if export_tmp is not None:
            export_tmp.cleanup()

    report = {
        "edgec_version": edgec.__version__,
        "status": "ok" if not failures else "failed",
        "source": str(source),
        "target": target.name,
        "backend": backend.name,
        "precision": options.precision,
        "artifact": str(artifact.path) if not failures else None,
        "pipeline": manager.text,
        "passes": result.summary(),
        "quantization": quantization,
        "pruning": pruning,
        "verification": {
            **figures,
            "inputs": inputs_source,
            "approximate_passes": approximate,
            "verified_in": verified_in,
            "runtime_note": runtime_note,
            "tolerance": tolerance,
            "second_shape": second_shape,
            "export_vs_pytorch": export_check,
            "passed": not failures,
            "failures": failures,
        },
        "sizes": {
            "original_bytes": original_bytes,
            "artifact_bytes": artifact.size_bytes if not failures else None,
            "original_nodes": original_nodes,
            "final_nodes": eir.node_count(model),
        },
        "static_shapes": static_shapes,
        "artifact_meta": artifact.meta if not failures else None,
        "notes": notes + [f"{group} was still changing after {MAX_FIXPOINT_ROUNDS} rounds" for group in result.unsettled],
        "timings_s": {**timings, "total": round(time.perf_counter() - started, 4)},
    }
    report_path = write_json(outdir / "report.json", report)
    return CompileResult(artifact if not failures else None, report, report_path, not failures, failures)


DEFAULT_BUDGETS = {"cosine": 0.999, "top1": 0.01}


def evaluation_check(options: CompileOptions, pruning: bool = False) -> None:
    """The budget options of mixed precision and pruning, checked before anything runs."""
    from edgec.quantize.mixed import METRICS

    if options.metric not in METRICS:
        raise UserError(f"unknown metric {options.metric!r}", f"choose one of: {', '.join(METRICS)}")
    if options.precision != "mixed" and (options.eval is not None or options.metric != "cosine"
                                         or (options.accuracy_budget is not None and not pruning)):
        raise UserError("--accuracy-budget, --eval and --metric choose mixed precision (--accuracy-budget also pruning)",
                        "compile with --precision mixed or --prune, or drop them")
    if options.metric == "top1" and options.eval is None:
        raise UserError("--metric top1 needs labelled data", "pass --eval DATA.npz with the model inputs and an array 'labels'")
    budget = options.accuracy_budget
    if budget is None:
        return
    if options.metric == "cosine" and not 0.0 < budget <= 1.0:
        raise UserError(f"--accuracy-budget {budget} is not a cosine", "give the least mean output cosine, e.g. 0.999")
    if options.metric == "top1" and not 0.0 <= budget < 1.0:
        raise UserError(f"--accuracy-budget {budget} is not a top-1 drop",
                        "give the most accuracy the model may lose as a fraction, e.g. 0.01 for one point")


def _evaluation(options: CompileOptions, model):
    """--eval data (inputs, and labels for top1), checked."""
    import numpy as np

    from edgec.quantize.mixed import Evaluation

    feeds = load_inputs(options.eval, model)
    labels = None
    if options.metric == "top1":
        with np.load(options.eval, allow_pickle=False) as data:
            if "labels" not in data.files:
                raise UserError(f"{options.eval} has no array 'labels'", "add the label of each sample: numpy.savez(..., labels=...)")
            labels = data["labels"]
        # Checked on the original (before calibration runs): its first output must be [batch, classes].
        first = next(iter(run_model(model, {k: v[:1] for k, v in feeds.items()}).values()))
        if first.ndim != 2:
            raise UserError(f"--metric top1 needs a model whose first output is [batch, classes] logits, "
                            f"not {list(first.shape)}", "use --metric cosine for this model")
        samples = min(len(v) for v in feeds.values())
        if labels.shape != (samples,) or not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"labels in {options.eval} are {labels.dtype}{list(labels.shape)}, not {samples} integer classes",
                            "give one integer class per sample")
    return Evaluation(feeds, options.metric, labels)


def _prune_tolerance(tolerance: dict, options: CompileOptions) -> dict:
    """A pruned model is checked on its mean output cosine to the original (the accuracy budget, by
    default DEFAULT_PRUNE_BUDGET); the per-sample floors of the precision apply only where --tolerance
    sets them."""
    given = {item.partition("=")[0].strip() for item in (options.tolerance or "").split(",") if item.strip()}
    checked = {key: (value if key in given else (-1.0 if key == "min_cosine" else -1e9)) for key, value in tolerance.items()}
    # With --precision mixed the budget is mixed precision's, measured against the pruned float model.
    own = options.accuracy_budget is not None and options.precision != "mixed"
    checked["min_cosine_mean"] = options.accuracy_budget if own else DEFAULT_PRUNE_BUDGET
    return checked


def _approximate(manager: PassManager) -> list[str]:
    """The approximate passes of the pipeline, as the report and a failed check name them."""
    return list(dict.fromkeys(p.spec() for p in manager.passes() if p.approximate))


def _run_with_pruning(model, prune: PruneRequest, ctx: PassContext, options: CompileOptions, target: Target, backend: Backend,
                      feeds: dict, batch_multiple: int, static_shapes, stages: tuple[str, str], step: Callable[[str], None]):
    """The target's pipeline, then pruning (its heads and FFN shares searched first for --prune auto,
    on calibration samples only: the compile's check samples stay out of the choice), then the backend's
    lowering; returns the combined result, the report's `pruning` entry and the manager whose text
    the report names."""
    from edgec.passes.prune.common import CALIBRATION_FEEDS_KEY, PRUNING_KEY
    from edgec.pruning import estimate_ms, report, search, significant

    pipeline_text, lowering = stages
    result = PassManager(pipeline_text or [], ctx).run(model)
    bindings = _bindings(static_shapes)
    precision = "int8" if options.precision in QUANTIZED else options.precision
    if precision not in target.precisions:
        precision = target.precisions[0]
    chosen = None
    heads, neurons = _check_prunable(model, ctx, prune, options.prune)
    if prune.auto:
        chosen = search(model, feeds, target, precision, latency_budget_ms=options.latency_budget_ms,
                        accuracy_budget=options.accuracy_budget, reconstruct=prune.reconstruct, bindings=bindings, step=step,
                        lowering=lowering, multiple=batch_multiple, has_heads=heads > 0, has_ffn=neurons > 0)
        prune = dataclasses.replace(prune, heads=chosen.heads, ffn=chosen.ffn)
    ctx.options[CALIBRATION_FEEDS_KEY] = feeds
    ctx.options["progress"] = step
    before = estimate_ms(model, target, precision, bindings, lowering)
    for text in (prune.pipeline(), lowering):
        part = PassManager(text or [], ctx).run(model)
        result.records.extend(part.records)
        result.unsettled.extend(part.unsettled)
    after = estimate_ms(model, target, precision, bindings)  # lowered by now
    estimate = {"before": significant(before), "after": significant(after), "precision": precision,
                "note": f"roofline estimate on {target.name} of the model as the {backend.name} backend lowers it, "
                        "at the compile's shapes, not a measurement"}
    manager = PassManager(",".join(p for p in (pipeline_text, prune.pipeline(), lowering) if p), ctx)
    result.model = model
    return result, report(ctx.options.pop(PRUNING_KEY, None), prune, chosen, estimate), manager


def _batch_multiple(model) -> int:
    """The batch size the model fixes, which every share of calibration samples must be a multiple of (else 1)."""
    from edgec.quantize.calibrate import fixed_batch_sizes
    from edgec.verify.inputs import graph_inputs

    fixed = fixed_batch_sizes(graph_inputs(model))
    return max(fixed) if len(fixed) == 1 else 1


UNFUSED_FIX = "give edgec the model as exported, before onnxruntime's optimizer (edgec fuses for the backend itself)"


def _onnxruntime_ops(model) -> str:
    """onnxruntime's contrib ops (com.microsoft) in `model`, as "Attention x6, BiasGelu x6" ('' when none)."""
    from collections import Counter

    from edgec.passes.fuse.lower_attention import MS_DOMAIN

    counts = Counter(node.op_type for node in model.graph.all_nodes() if node.domain == MS_DOMAIN)
    return ", ".join(f"{op} x{n}" for op, n in sorted(counts.items()))


def _check_prunable(model, ctx: PassContext, prune: PruneRequest, spec: str) -> tuple[int, int]:
    """The heads and FFN neurons the passes can cut. A share asked of a kind the model has none of is a
    user error (and, for auto, of both): the compile would pass having removed nothing."""
    from edgec.passes.prune.remove_attention_heads import removable_heads

    heads = removable_heads(model, ctx)
    neurons = sum(block.intermediate for block in ctx.analyses.get("ffn", model))
    missing = [what for what, asked, present in (("attention heads", prune.heads, heads), ("FFN neurons", prune.ffn, neurons))
               if asked > 0 and not present]
    if prune.auto and not heads and not neurons:
        missing = ["attention heads", "FFN neurons"]
    if not missing:
        return heads, neurons
    fused = _onnxruntime_ops(model)
    why = f" (it holds onnxruntime's fused ops: {fused})" if fused else ""
    raise UserError(f"--prune {spec}: the model has no {' or '.join(missing)} edgec can remove{why}",
                    UNFUSED_FIX if fused else "prune what the model has (edgec inspect lists its attention and FFN blocks)")


def _bindings(static_shapes) -> dict[str, int] | None:
    """The cost model's symbolic dims at the compile's shapes: batch and sequence of the first 2-D input."""
    if not static_shapes:
        return None
    for dims in static_shapes.values():
        if len(dims) == 2:
            return {"batch": int(dims[0]), "*": int(dims[1])}
    return None


def _calibration_feeds(path: Path, model) -> dict:
    """The calibration data, checked: names and shapes that fit, enough samples, finite numbers."""
    import numpy as np

    feeds = load_inputs(path, model)
    samples = min(len(v) for v in feeds.values()) if feeds else 0
    if samples < MIN_CALIBRATION_SAMPLES:
        raise UserError(
            f"calibration data {path} has {samples} samples; quantizing needs at least {MIN_CALIBRATION_SAMPLES}",
            "add samples that look like what the model will see (a few hundred is typical)",
        )
    for name, array in feeds.items():
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise UserError(f"calibration input {name!r} in {path} holds NaN or infinite values", "clean the data")
    return feeds


def default_cache_dir() -> Path:
    return Path(os.environ.get("EDGEC_CACHE_DIR") or Path.home() / ".cache" / "edgec")


def _quantize(model, backend: Backend, target: Target, ctx: PassContext, feeds: dict, options: CompileOptions,
              step: Callable[[str], None], result, evaluation=None) -> dict:
    """Calibrates the float model on `feeds`, then inserts QDQ by the backend's scheme for the target."""
    from edgec.passes.quantize.insert_qdq import RANGES_KEY, InsertQdqOptions, InsertQdqPass, quantizable_activations
    from edgec.quantize.calibrate import calibrate

    qdq = InsertQdqOptions(**backend.quantization(target))
    progress_shown = {"cache": "miss"}

    def progress(done: int, total: int, message: str) -> None:
        if "cache" in message:
            progress_shown["cache"] = "hit"
        step(f"{message} {done}/{total}")

    smoothing = _smooth(model, qdq, ctx, feeds, progress, result) if options.smooth else None
    tensors = quantizable_activations(model, qdq)

    cache = Path(options.cache_dir) if options.cache_dir is not None else default_cache_dir()
    try:
        calibration = calibrate(model, tensors, feeds, progress=progress, cache_dir=cache / "calibration")
    except ValueError as exc:  # the data cannot be run as given (a fixed batch size it does not divide, ...)
        raise UserError(f"calibration on {options.calib} failed: {_first_line(exc)}",
                        "give --calib samples the model takes, in a count its batch size divides") from None
    ranges = calibration.ranges(options.calib_method, dtype=qdq.activations)
    ctx.options[RANGES_KEY] = ranges
    outputs = None
    if qdq.outputs:
        qdq, outputs = _float_outputs(model, qdq, calibration, ranges)
    layers = assignment = None
    if options.precision == "mixed":
        from edgec.passes.quantize.insert_qdq import WIDE, WIDE_RANGES_KEY
        from edgec.quantize.mixed import assign, ladder_of

        ladder = ladder_of(set(backend.mixed_ladder) & set(target.precisions))
        wide_ranges = None
        if "int16" in ladder:  # a 16-bit grid needs no clipping
            wide_ranges = ctx.options[WIDE_RANGES_KEY] = calibration.ranges("minmax", dtype=WIDE[qdq.activations])
        subset = {k: v[:MIXED_SAMPLES] for k, v in feeds.items()}
        budget = options.accuracy_budget if options.accuracy_budget is not None else DEFAULT_BUDGETS[options.metric]
        chosen = assign(model, qdq, ranges, subset, budget, evaluation=evaluation, ladder=ladder, wide_ranges=wide_ranges,
                        progress=lambda done, total, message: step(f"{message} {done}/{total}"))
        qdq = chosen.options(qdq)
        layers = [dataclasses.asdict(c) for c in chosen.choices]
        checked_on = evaluation.feeds if evaluation is not None else subset
        counts = chosen.counts()
        assignment = {"metric": chosen.metric, "budget": chosen.budget, "value": chosen.value,
                      "float_value": chosen.float_value, "cosine_mean": chosen.cosine_mean, "cosine_min": chosen.cosine_min,
                      "data": str(options.eval) if evaluation is not None else f"{options.calib} (calibration)",
                      "samples": min(len(v) for v in checked_on.values()),
                      "ladder": list(ladder), "ops": counts, "float_ops": counts["fp32"], "int8_ops": counts["int8"]}
    quantized = PassManager([InsertQdqPass(qdq)], ctx).run(model)
    result.records.extend(quantized.records)
    after = backend.quantized_pipeline(target, options.precision)
    if after:
        result.records.extend(PassManager(after, ctx).run(model).records)
    return {
        "assignment": assignment,
        "layers": layers,
        "smoothing": smoothing,
        "outputs": outputs,
        "scheme": {"weights": f"{qdq.weights} symmetric" + (" per-channel" if qdq.per_channel else ""),
                   "activations": qdq.activations, "attention": qdq.attention, "embeddings": qdq.embeddings},
        "calibration": {"data": str(options.calib), "samples": calibration.samples, "method": options.calib_method,
                        "tensors": len(tensors), "cache": progress_shown["cache"]},
    }


def _float_outputs(model, qdq, calibration, ranges) -> tuple:
    """Keeps float the results whose int8 grid loses too much (the residual branches of transformers
    carry a few outlier channels: one scale for the tensor leaves the rest a handful of levels); their
    ops run with float outputs (TFLite's hybrid kernels). Returns the options and the report's entry."""
    from edgec.passes.quantize.insert_qdq import SCHEMES, activation_params, quantized_outputs

    _, qmin, qmax, _ = SCHEMES[qdq.activations]
    sqnr = {}
    for node, name in quantized_outputs(model, qdq).items():
        scale, zero = activation_params(*ranges[name], qdq.activations)
        sqnr[node] = calibration.stats[name].sqnr_db(float(scale), int(zero), qmin, qmax)
    kept = sorted(node for node, db in sqnr.items() if db < MIN_OUTPUT_SQNR_DB)
    report = {"quantized": len(sqnr) - len(kept), "float": kept, "min_sqnr_db": MIN_OUTPUT_SQNR_DB,
              "sqnr_db": {node: round(db, 1) for node, db in sqnr.items()}}
    return dataclasses.replace(qdq, float_outputs=qdq.float_outputs + tuple(kept)), report


def _smooth(model, qdq, ctx: PassContext, feeds: dict, progress, result) -> dict:
    """Smooths (in place) the activations whose quantized MatMuls measurably gain from it, each with
    its own alpha; returns the report's table."""
    from edgec.passes.quantize.insert_qdq import WEIGHT_QMAX
    from edgec.passes.quantize.smooth_quant import CHANNEL_ABSMAX_KEY, SMOOTH_ALPHAS_KEY, SmoothQuantPass
    from edgec.quantize.smoothing import choose

    found = choose(model, feeds, scheme=qdq.activations, per_channel=qdq.per_channel,
                   weight_qmax=WEIGHT_QMAX[qdq.weights], progress=progress)
    if found.alphas:
        ctx.options[CHANNEL_ABSMAX_KEY] = found.channel_absmax
        ctx.options[SMOOTH_ALPHAS_KEY] = found.alphas
        result.records.extend(PassManager([SmoothQuantPass()], ctx).run(model).records)
    return {
        "samples": found.samples,
        "rows": found.rows,
        "smoothed": len(found.alphas),
        "activations": [dataclasses.asdict(c) for c in found.choices],
    }


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def parse_shapes(items: list[str] | None) -> dict[str, tuple[int, ...]] | None:
    """`--shape input_ids=1x128` (repeated, or comma-separated) -> {"input_ids": (1, 128)}."""
    if not items:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for item in (part.strip() for text in items for part in text.split(",") if part.strip()):
        name, _, dims = item.partition("=")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not name or not shape or any(d < 1 for d in shape):
            raise UserError(f"--shape {item!r} is not NAME=DIMS", "write e.g. --shape input_ids=1x128 (dims at least 1)")
        shapes[name] = shape
    return shapes


def _specialize(model, requested: dict[str, tuple[int, ...]], feeds: dict) -> dict[str, list[int]]:
    """Fixes the model's input shapes: `requested` ones as given, other dynamic ones at batch 1 and
    the verification inputs' other dims. Returns what every input got."""
    from edgec.analysis.shapes import specialize_inputs
    from edgec.verify.inputs import graph_inputs

    shapes = {}
    for value in graph_inputs(model):
        if value.name in requested:
            shapes[value.name] = requested[value.name]
        elif value.shape is not None and any(not isinstance(d, int) for d in value.shape):
            given = feeds[value.name].shape
            shapes[value.name] = tuple(d if isinstance(d, int) else (1 if axis == 0 else given[axis])
                                       for axis, d in enumerate(value.shape))
    try:
        specialize_inputs(model, shapes)
    except ValueError as exc:
        raise UserError(f"--shape does not fit the model: {exc}", "give each input's full shape, e.g. --shape input_ids=1x128") from None
    return {name: list(dims) for name, dims in shapes.items()}


def _shorter(feeds: dict) -> dict | None:
    """Three samples of `feeds` with their token axis (that of the 2-D inputs) cut to half, at most 11,
    or None when there is no such axis to cut."""
    lengths = {v.shape[1] for v in feeds.values() if v.ndim == 2}
    if len(lengths) != 1 or lengths.pop() < 4:
        return None
    cut = min(11, next(v.shape[1] for v in feeds.values() if v.ndim == 2) // 2)
    return {k: (v[:3, :cut] if v.ndim == 2 else v[:3]) for k, v in feeds.items()}


def _has_dynamic_dims(model) -> bool:
    from edgec.verify.inputs import graph_inputs

    return any(v.shape is not None and any(not isinstance(d, int) for d in v.shape) for v in graph_inputs(model))


def _publish(artifact: Artifact, staging: Path, outdir: Path) -> Artifact:
    """Moves every file of a verified artifact from the staging folder into place, weights first."""
    moved = []
    for f in sorted(artifact.files, key=lambda p: p == artifact.path):
        dest = outdir / f.relative_to(staging)
        if dest.is_dir() and f.is_dir():
            shutil.rmtree(dest)
        os.replace(f, dest)
        moved.append(dest)
    return Artifact(artifact.backend, outdir / artifact.path.relative_to(staging), moved, artifact.meta)
