"""Benchmark: MiniLM compiled by edgec (x86-64) vs the same export run through onnxruntime's transformer optimizer.

For each torch exporter the original export, the onnxruntime-optimized model and the edgec artifact are
counted (nodes, fused ops), checked against the original and timed interleaved in one process (CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from edgec import ir as eir  # noqa: E402
from edgec.compiler import CompileOptions, compile_model  # noqa: E402
from edgec.errors import UserError  # noqa: E402
from edgec.frontends.torch import EXPORTERS, export_hf_folder  # noqa: E402
from edgec.report import write_json  # noqa: E402
from edgec.verify import compare, run_session  # noqa: E402
from export_minilm import minilm_folder  # noqa: E402
from prepare_data import gensim_data_dir, load_tokenizer, polarity, read_lines  # noqa: E402

MODELS = ("original", "ort-optimizer", "edgec")
# Fused-op groups of the table: (column, op types, domains counted; None = any domain). Attention is
# only the contrib op: ai.onnx has an Attention of its own (opset 23) that is no fusion of ORT's.
FUSED = (
    ("attention", ("Attention", "MultiHeadAttention"), ("com.microsoft",)),
    ("skip LN", ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization"), None),
    ("LN", ("LayerNormalization",), None),
    ("gelu", ("BiasGelu", "FastGelu", "Gelu"), None),
)
MINILM_HEADS, MINILM_HIDDEN = 12, 384
# onnxruntime.transformers.optimizer's --opt_level help: "The recommended value is 1"; higher levels
# bake in execution-provider-specific nodes and are meant for --only_onnxruntime.
ORT_OPT_LEVEL = 1


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def stage(what: str):
    log(f"{what} ...")
    start = time.perf_counter()
    yield
    log(f"{what}: {time.perf_counter() - start:.1f} s")


# ------------------------------------------------------------------------------------------- inputs
def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        batch, _, tokens = item.strip().lower().partition("x")
        if not (batch.isdigit() and tokens.isdigit()) or int(batch) < 1 or int(tokens) < 2:
            raise UserError(f"--shapes item {item!r} is not BATCHxTOKENS", "write e.g. --shapes 1x11,8x65,1x128")
        shapes.append((int(batch), int(tokens)))
    return shapes


def corpus() -> list[str]:
    """The polarity sentences, then the long Lee background documents (for shapes longer than a sentence)."""
    folder = gensim_data_dir()
    sentences, _ = polarity(folder)
    return sentences + read_lines(folder / "lee_background.cor")


def pick_texts(lengths: list[int], batch: int, tokens: int) -> list[int]:
    """Indices of the texts for one workload. One text is a query as an app sends it: a text of exactly
    `tokens` tokens when there is one, else the first longer one, truncated. A batch is consecutive
    texts that fit, padded to `tokens`."""
    if batch == 1:
        exact = [i for i, n in enumerate(lengths) if n == tokens]
        longer = [i for i, n in enumerate(lengths) if n > tokens]
        if not exact and not longer:
            raise UserError(f"no text in the corpus has {tokens} tokens or more", "choose a shorter --shapes length")
        return (exact or longer)[:1]
    fitting = [i for i, n in enumerate(lengths) if n <= tokens]
    if len(fitting) < batch:
        raise UserError(f"only {len(fitting)} texts fit in {tokens} tokens, {batch} asked", "choose a smaller batch or more tokens")
    return fitting[:batch]


def workloads(shapes: list[tuple[int, int]]) -> list[dict[str, np.ndarray]]:
    tokenizer = load_tokenizer()
    texts = corpus()
    # Counted up to the model's limit: longer documents are only ever used truncated.
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True)["input_ids"]]
    result = []
    for batch, tokens in shapes:
        chosen = [texts[i] for i in pick_texts(lengths, batch, tokens)]
        encoded = tokenizer(chosen, padding="max_length", truncation=True, max_length=tokens, return_tensors="np")
        result.append({k: np.ascontiguousarray(v, dtype=np.int64) for k, v in encoded.items()})
    return result


def shape_text(feeds: dict[str, np.ndarray]) -> str:
    return "x".join(map(str, feeds["input_ids"].shape))


# ------------------------------------------------------------------------------------------- models
def export(exporter: str, folder: Path) -> Path:
    with stage(f"{exporter}: exporting MiniLM"):
        return export_hf_folder(minilm_folder(), folder / "original.onnx", exporter=exporter)


def ort_optimize(exporter: str, source: Path, dest: Path) -> dict[str, int]:
    """onnxruntime's BERT fusions for CPU, saved in one file; returns the fusions it reported."""
    from onnxruntime.transformers.optimizer import optimize_model

    with stage(f"{exporter}: onnxruntime transformer optimizer (opt_level {ORT_OPT_LEVEL})"):
        optimized = optimize_model(str(source), model_type="bert", num_heads=MINILM_HEADS, hidden_size=MINILM_HIDDEN,
                                   opt_level=ORT_OPT_LEVEL, use_gpu=False)
        optimized.save_model_to_file(str(dest), use_external_data_format=False)
        return optimized.get_fused_operator_statistics()


def edgec_compile(exporter: str, source: Path, outdir: Path, inputs: Path) -> dict:
    """The x86-64 compile of the export: the artifact path (None when verification failed) and the report."""
    with stage(f"{exporter}: edgec compile --target x86-64"):
        result = compile_model(source, CompileOptions(target="x86-64", outdir=outdir, inputs=inputs))
    if not result.passed:
        log(f"{exporter}: edgec verification failed: {'; '.join(result.failures)}")
    return {"path": result.artifact.path if result.passed else None, "report": result.report}


def op_counts(path: Path) -> dict:
    hist = eir.op_histogram(eir.load(path))
    counts = {"nodes": sum(hist.values())}
    for column, ops, domains in FUSED:
        counts[column] = sum(n for key, n in hist.items() if _op_of(key, domains) in ops)
    return {**counts, "ops": dict(hist.most_common())}


def session_options(threads: int | None):
    """The one SessionOptions every timed session is created with: onnxruntime's defaults (ORT_ENABLE_ALL)
    but for spinning. After a call, a session's worker threads spin waiting for more work and take a
    core from whichever session runs next: timed round-robin, MiniLM int8 came out at 39 ms and half
    its FFN neurons gone at 41 ms, against 25 ms and 19.5 ms without spinning, and 24-25 ms and
    19-30 ms for each alone in its own process with spinning (fp32 moved less: 68 and 47 ms against
    63 and 43). See interleaved_medians."""
    import onnxruntime as ort

    from edgec.verify import NO_SPINNING

    opts = ort.SessionOptions()
    # Silent: the only warning expected is that a saved session graph is hardware-specific, which is known.
    opts.log_severity_level = 4
    opts.add_session_config_entry(*NO_SPINNING)
    if threads:
        opts.intra_op_num_threads = threads
    return opts


def session_counts(path: Path) -> dict:
    """The counts of the graph onnxruntime actually runs: the model after its own session optimizations
    (ORT_ENABLE_ALL, as in the timed sessions), which fuse much by themselves."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edgec-bench-session-") as tmp:
        opts = session_options(None)
        opts.optimized_model_filepath = str(Path(tmp) / "session.onnx")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return op_counts(Path(opts.optimized_model_filepath))


def _op_of(key: str, domains: tuple[str, ...] | None) -> str | None:
    domain, _, op = key.rpartition("::")
    if domains is not None and domain not in domains:
        return None
    return op


# ------------------------------------------------------------------------------------------ running
def interleaved_medians(sessions: dict[str, object], feeds: dict[str, np.ndarray], runs: int, warmup: int) -> dict[str, float]:
    """Median ms of each session, run round-robin so machine noise hits all alike, each measured call
    right after an unmeasured one of the same session. Without it the alternation is unfair: after a
    call, onnxruntime's worker threads keep spinning, and the next session waits for its cores. Six
    MiniLM variants timed strictly in turn put the unpruned fp32 model at 196 ms and pruned ones at
    2.9-3.6x; with the unmeasured call, 97 ms and 1.8-2.4x (the same models alone in pairs: 115-123 ms).
    The unmeasured call is not enough for fast (int8) models: time sessions made with session_options,
    which turns spinning off."""
    calls = []
    for name, sess in sessions.items():
        wanted = {i.name for i in sess.get_inputs()}
        calls.append((name, sess, [o.name for o in sess.get_outputs()], {k: v for k, v in feeds.items() if k in wanted}))
    for _ in range(warmup):
        for _, sess, outs, f in calls:
            sess.run(outs, f)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for i in range(runs):
        # Rotate who goes first so no model always runs on the cache another one warmed.
        for name, sess, outs, f in calls[i % len(calls):] + calls[: i % len(calls)]:
            sess.run(outs, f)
            start = time.perf_counter()
            sess.run(outs, f)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def measure(paths: dict[str, Path | None], feeds_list: list[dict[str, np.ndarray]], args) -> list[dict]:
    import onnxruntime as ort

    opts = session_options(args.threads)
    sessions = {name: ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
                for name, path in paths.items() if path is not None}
    rows = []
    for feeds in feeds_list:
        reference = run_session(sessions["original"], feeds)
        accuracy = {name: compare(reference, run_session(sess, feeds)) for name, sess in sessions.items() if name != "original"}
        log(f"  timing {shape_text(feeds)}: {args.runs} interleaved runs")
        rows.append({"shape": shape_text(feeds), "ms": interleaved_medians(sessions, feeds, args.runs, args.warmup),
                     "accuracy": accuracy})
    return rows


def bench_exporter(exporter: str, folder: Path, feeds_list: list[dict[str, np.ndarray]], args) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    source = export(exporter, folder)
    inputs = folder / "inputs.npz"
    # edgec verifies on the biggest workload: real text, padded, so the mask matters.
    np.savez(inputs, **max(feeds_list, key=lambda f: f["input_ids"].size))
    fusions = ort_optimize(exporter, source, folder / "ort-optimized.onnx")
    compiled = edgec_compile(exporter, source, folder / "edgec", inputs)
    paths = {"original": source, "ort-optimizer": folder / "ort-optimized.onnx", "edgec": compiled["path"]}
    with stage(f"{exporter}: checking and timing"):
        rows = measure(paths, feeds_list, args)
    edgec_report = compiled["report"]
    return {
        "models": {name: {"path": p, **op_counts(p)} if p is not None else None for name, p in paths.items()},
        "session": {name: session_counts(p) if p is not None else None for name, p in paths.items()},
        "ort_fusions": fusions,
        "edgec": {"status": edgec_report["status"], "failures": edgec_report["verification"]["failures"],
                  "pipeline": edgec_report["pipeline"], "notes": edgec_report["notes"]},
        "rows": rows,
    }


# ------------------------------------------------------------------------------------------- output
def _triple(models: dict, key: str) -> str:
    return "/".join("-" if models[m] is None else str(models[m][key]) for m in MODELS)


def _ms(row: dict, name: str) -> str:
    return f"{row['ms'][name]:.2f}" if name in row["ms"] else "-"


def _ratio(row: dict, a: str, b: str) -> str:
    return f"{row['ms'][a] / row['ms'][b]:.3f}" if a in row["ms"] and b in row["ms"] else "-"


def _acc(row: dict, name: str) -> list[str]:
    figures = row["accuracy"].get(name)
    return [f"{figures['max_abs_error']:.2e}", f"{figures['cosine_min']:.7f}"] if figures else ["-", "-"]


def results_table(results: dict[str, dict], args) -> Table:
    threads = args.threads or "ort default"
    table = Table(title=f"all-MiniLM-L6-v2 in onnxruntime {ort_version()} (CPU, threads: {threads}): original / "
                        f"ort-optimizer / edgec x86-64, medians of {args.runs} interleaved runs")
    counted = ["nodes", *(column for column, _, _ in FUSED)]
    columns = ["export", "shape", *counted, "run nodes", "orig ms", "ort ms", "edgec ms", "edgec/ort", "edgec/orig",
               "ort max|d|", "ort cos", "edgec max|d|", "edgec cos"]
    for col in columns:
        table.add_column(col, justify="left" if col == "export" else "right")
    for exporter, result in results.items():
        for i, row in enumerate(result["rows"]):
            # The counts belong to the exporter, not the shape: shown once per group.
            counts = [_triple(result["models"], key) if i == 0 else "" for key in counted]
            counts.append(_triple(result["session"], "nodes") if i == 0 else "")
            table.add_row(exporter if i == 0 else "", row["shape"], *counts,
                          _ms(row, "original"), _ms(row, "ort-optimizer"), _ms(row, "edgec"),
                          _ratio(row, "edgec", "ort-optimizer"), _ratio(row, "edgec", "original"),
                          *_acc(row, "ort-optimizer"), *_acc(row, "edgec"))
        table.add_section()
    return table


def print_notes(console: Console, results: dict[str, dict]) -> None:
    console.print("counts are original/ort-optimizer/edgec in the saved files; run nodes: in the graph onnxruntime runs after "
                  "its own session optimizations; max|d| and cos (minimum per sample) compare last_hidden_state with the "
                  "original's; ratio < 1 means edgec is faster.")
    ratios = [r["ms"]["edgec"] / r["ms"]["ort-optimizer"] for res in results.values() for r in res["rows"] if "edgec" in r["ms"]]
    if ratios:
        console.print(f"edgec at least as fast as the ort optimizer on {sum(x <= 1 for x in ratios)} of {len(ratios)} rows "
                      f"(edgec/ort from {min(ratios):.3f} to {max(ratios):.3f}).")
    for exporter, result in results.items():
        fused = ", ".join(f"{op} {n}" for op, n in result["ort_fusions"].items() if n) or "nothing"
        console.print(f"ort optimizer fused ({exporter}): {fused}", markup=False)
    for exporter, result in results.items():
        console.print(f"onnxruntime runs ({exporter}): {session_summary(result['session'])}", markup=False)
    for exporter, result in results.items():
        edgec = result["edgec"]
        if edgec["status"] != "ok":
            console.print(f"edgec ({exporter}) failed verification, not timed: {'; '.join(edgec['failures'])}", markup=False)


def session_summary(session: dict) -> str:
    parts = []
    for name in MODELS:
        if session[name] is None:
            continue
        contrib = ", ".join(f"{key.rpartition('::')[2]} {n}" for key, n in session[name]["ops"].items() if key.startswith("com.microsoft::"))
        parts.append(f"{name} {session[name]['nodes']} nodes ({contrib or 'no contrib ops'})")
    return "; ".join(parts)


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def write_results(path: Path, results: dict[str, dict], args) -> None:
    settings = {"runs": args.runs, "warmup": args.warmup, "threads": args.threads, "shapes": args.shapes,
                "ort_opt_level": ORT_OPT_LEVEL, "onnxruntime": ort_version(), "machine": platform.processor() or platform.machine(),
                "cpus": os.cpu_count()}
    if args.keep is None:  # the models went with the temporary folder
        for result in results.values():
            for model in result["models"].values():
                if model is not None:
                    model.pop("path")
    write_json(path, {"settings": settings, "exporters": results})
    log(f"wrote {path}")


def run(args, workdir: Path) -> dict[str, dict]:
    shapes = parse_shapes(args.shapes)
    with stage("tokenising the gensim sentences"):
        feeds_list = workloads(shapes)
    return {exporter: bench_exporter(exporter, workdir / exporter, feeds_list, args) for exporter in args.exporters}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="timed runs of each model per shape (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs of each model first (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: onnxruntime's)")
    parser.add_argument("--exporters", nargs="+", choices=EXPORTERS, default=list(EXPORTERS))
    parser.add_argument("--shapes", default="1x11,8x65,1x128", help="BATCHxTOKENS, comma-separated (default 1x11,8x65,1x128)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the models in this folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--runs and --threads must be at least 1, --warmup at least 0")
    console = Console(width=200)
    try:
        with contextlib.ExitStack() as stack:
            workdir = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgec-bench-fusion-")))
            results = run(args, workdir)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    console.print(results_table(results, args))
    print_notes(console, results)
    if args.json:
        write_results(args.json, results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
