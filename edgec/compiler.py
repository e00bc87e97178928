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
from edgec.report import write_json
from edgec.sources import load_source
from edgec.targets import Target, get_target
from edgec.verify import (
    check_tolerance, compare, generate_inputs, load_inputs, ort_session, parse_tolerance, run_model, run_session, token_mask,
)

PRECISIONS = ("fp32", "fp16", "int8", "mixed")
# What this build can emit. The rest are accepted by the parser and refused with a clear reason.
IMPLEMENTED_PRECISIONS = ("fp32", "int8", "mixed")
QUANTIZED = ("int8", "mixed")
# Fewer samples than this give ranges that depend on which sentences happened to be chosen.
MIN_CALIBRATION_SAMPLES = 8
CALIBRATION_METHODS = ("minmax", "percentile", "entropy", "mse")
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
    accuracy_budget: float = 0.999  # mixed: the least mean output cosine to the float model
    cache_dir: Path | None = None  # calibration statistics; default: $EDGEC_CACHE_DIR or ~/.cache/edgec
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
    counter = DebugCounter.parse(options.debug_counter)
    pipeline_text = options.pipeline if options.pipeline is not None else target.default_pipeline
    lowering = backend.lowering_pipeline(target, options.precision)
    full_pipeline = ",".join(p for p in (pipeline_text, lowering) if p)
    manager = PassManager(full_pipeline or [], PassContext())  # parse now: unknown passes fail early
    manager.check_counter(counter)
    # Approximate passes are measured on calibration data when there is some: that is the data the
    # user says the model will see, and the accuracy budget (--tolerance) is checked on it.
    approximate = list(dict.fromkeys(p.spec() for p in manager.passes() if p.approximate))
    check_precision(options.precision, target, backend, options.calib, approximate)
    tolerance = parse_tolerance(options.tolerance, options.precision)
    verify_data = options.calib if approximate and options.calib is not None else options.inputs
    quantizing = options.precision in QUANTIZED
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
        # The source's files were listed for the output check; an export's are listed now.
        original_bytes = sum(f.stat().st_size for f in (sources or eir.model_files(onnx_path)))
        calib_feeds = _calibration_feeds(options.calib, model) if quantizing else None
        if verify_data is not None:
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
            alt = generate_inputs(model, batch=3, sequence=11, image=160, seed=1)
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
        result = manager.run(model)
        model = result.model
        t = mark("passes", t)
        quantization = None
        if quantizing:
            quantization = _quantize(model, backend, target, ctx, calib_feeds, options, step, result)
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
        "notes": notes + [f"{group} was still changing after {MAX_FIXPOINT_ROUNDS} rounds" for group in result.unsettled],
        "timings_s": {**timings, "total": round(time.perf_counter() - started, 4)},
    }
    report_path = write_json(outdir / "report.json", report)
    return CompileResult(artifact if not failures else None, report, report_path, not failures, failures)


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
              step: Callable[[str], None], result) -> dict:
    """Calibrates the float model on `feeds`, then inserts QDQ by the backend's scheme for the target."""
    from edgec.passes.quantize.insert_qdq import RANGES_KEY, InsertQdqOptions, InsertQdqPass, quantizable_activations
    from edgec.quantize.calibrate import calibrate

    qdq = InsertQdqOptions(**backend.quantization(target))
    tensors = quantizable_activations(model, qdq)
    progress_shown = {"cache": "miss"}

    def progress(done: int, total: int, message: str) -> None:
        if "cache" in message:
            progress_shown["cache"] = "hit"
        step(f"{message} {done}/{total}")

    cache = Path(options.cache_dir) if options.cache_dir is not None else default_cache_dir()
    try:
        calibration = calibrate(model, tensors, feeds, progress=progress, cache_dir=cache / "calibration")
    except ValueError as exc:  # the data cannot be run as given (a fixed batch size it does not divide, ...)
        raise UserError(f"calibration on {options.calib} failed: {_first_line(exc)}",
                        "give --calib samples the model takes, in a count its batch size divides") from None
    ranges = calibration.ranges(options.calib_method, dtype=qdq.activations)
    ctx.options[RANGES_KEY] = ranges
    layers = assignment = None
    if options.precision == "mixed":
        from edgec.quantize.mixed import assign

        subset = {k: v[:MIXED_SAMPLES] for k, v in feeds.items()}
        chosen = assign(model, qdq, ranges, subset, options.accuracy_budget,
                        progress=lambda done, total, message: step(f"{message} {done}/{total}"))
        qdq = dataclasses.replace(qdq, exclude=qdq.exclude + chosen.exclude)
        layers = [dataclasses.asdict(c) for c in chosen.choices]
        assignment = {"budget_cosine_mean": chosen.budget, "cosine_mean": chosen.cosine_mean,
                      "cosine_min": chosen.cosine_min, "samples": min(len(v) for v in subset.values()),
                      "float_ops": len(chosen.exclude), "int8_ops": len(chosen.choices) - len(chosen.exclude)}
    quantized = PassManager([InsertQdqPass(qdq)], ctx).run(model)
    result.records.extend(quantized.records)
    return {
        "assignment": assignment,
        "layers": layers,
        "scheme": {"weights": f"{qdq.weights} symmetric" + (" per-channel" if qdq.per_channel else ""),
                   "activations": qdq.activations, "attention": qdq.attention, "embeddings": qdq.embeddings},
        "calibration": {"data": str(options.calib), "samples": calibration.samples, "method": options.calib_method,
                        "tensors": len(tensors), "cache": progress_shown["cache"]},
    }


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


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
