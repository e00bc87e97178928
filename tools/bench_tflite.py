"""Benchmark: MiniLM for snapdragon-8 as .tflite - FP32, FP16 and INT8 in LiteRT's interpreter.

Both exports are compiled by edgec at 1x128 (`--shape`), INT8 calibrated on news text (calib.npz). Each
artifact runs the 200 polarity sentences in ai-edge-litert (XNNPACK) against the original in onnxruntime:
output cosine at the real tokens, sentence-embedding cosine, file size; then the interpreters are timed
round-robin in this one process (ratios to the FP32 .tflite are what count on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench_fusion import interleaved_medians, stage  # noqa: E402
from bench_int8 import ensure_data, load_npz, scratch_cwd, sentence_embeddings  # noqa: E402
from edgec.backends.tflite import run_tflite  # noqa: E402
from edgec.compiler import CompileOptions, compile_model  # noqa: E402
from edgec.errors import UserError  # noqa: E402
from edgec.frontends.torch import EXPORTERS  # noqa: E402
from edgec.verify import compare, run_model, token_mask  # noqa: E402

PRECISIONS = ("fp32", "fp16", "int8")
TOKENS = 128
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")
# The done-when goals.
GOAL_COSINE = {"fp32": 0.9999, "fp16": 0.9999, "int8": 0.99}
GOAL_INT8_MB = 25.0
NO_TOLERANCE = "min_cosine=0,min_sqnr_db=-1000"


class Interpreter:
    """A LiteRT interpreter behind onnxruntime's session calls (get_inputs/get_outputs/run), so the
    onnxruntime benchmarks' round-robin timer runs it."""

    def __init__(self, path: Path, threads: int | None):
        from ai_edge_litert.interpreter import Interpreter as Litert

        self.interpreter = Litert(model_path=str(path), num_threads=threads or os.cpu_count())
        self.interpreter.allocate_tensors()
        self.inputs = {d["name"]: d for d in self.interpreter.get_input_details()}
        self.outputs = self.interpreter.get_output_details()

    def get_inputs(self):
        return [argparse.Namespace(name=name) for name in self.inputs]

    def get_outputs(self):
        return [argparse.Namespace(name=d["name"]) for d in self.outputs]

    def run(self, names, feeds):
        for name, d in self.inputs.items():
            self.interpreter.set_tensor(d["index"], feeds[name].astype(d["dtype"], copy=False))
        self.interpreter.invoke()
        return [self.interpreter.get_tensor(d["index"]) for d in self.outputs]


def exports(folder: Path, given: Path | None) -> dict[str, Path]:
    """Both MiniLM exports: from --models when given, else written by tools/export_minilm.py."""
    source = (given or folder / "models").resolve()
    paths = {e: source / f"minilm-{e}.onnx" for e in EXPORTERS}
    if not all(p.exists() for p in paths.values()):
        if given is not None:
            raise UserError(f"{given} does not hold minilm-dynamo.onnx and minilm-torchscript.onnx",
                            "point --models at tools/export_minilm.py's output folder, or leave it out")
        from export_minilm import main as export

        with stage("exporting MiniLM with both exporters"):
            export(["--out", str(source)])
    return paths


def compile_all(source: Path, exporter: str, data: Path, workdir: Path) -> dict[str, dict]:
    rows = {}
    for precision in PRECISIONS:
        out = workdir / f"{exporter}-{precision}"
        options = CompileOptions(target="snapdragon-8", outdir=out, precision=precision, inputs=data / "polarity.npz",
                                 calib=data / "calib.npz" if precision == "int8" else None,
                                 shapes={k: (1, TOKENS) for k in TOKEN_KEYS}, tolerance=NO_TOLERANCE)
        with stage(f"{exporter}: compiling {precision}"), scratch_cwd("bench-tflite-"):
            result = compile_model(source, options)
        rows[precision] = {"path": result.artifact.path, "bytes": result.artifact.size_bytes,
                           "report": result.report.get("quantization")}
    return rows


def evaluate(source: Path, exporter: str, rows: dict[str, dict], polarity: dict, args) -> None:
    feeds = {k: polarity[k] for k in TOKEN_KEYS}
    mask = token_mask(feeds)
    with stage(f"{exporter}: the original in onnxruntime on {len(mask)} sentences"):
        reference = run_model(source, feeds)
    name = next(iter(reference))
    reference_emb = sentence_embeddings(reference[name], feeds["attention_mask"])
    for precision, row in rows.items():
        with stage(f"{exporter}: {precision} .tflite on {len(mask)} sentences"):
            got = run_tflite(row["path"], feeds, num_threads=args.threads)
        figures = compare(reference, got, mask)
        emb = sentence_embeddings(got[name], feeds["attention_mask"])
        cos = (emb * reference_emb).sum(axis=1)
        row.update(cosine_mean=figures["cosine_mean"], cosine_min=figures["cosine_min"], sqnr_db=figures["sqnr_db"],
                   embedding_min=float(cos.min()))
    one = {k: np.zeros((1, TOKENS), polarity[k].dtype) for k in TOKEN_KEYS}
    for k in TOKEN_KEYS:
        n = min(TOKENS, polarity[k].shape[1])
        one[k][:, :n] = polarity[k][:1, :n]
    interpreters = {p: Interpreter(row["path"], args.threads) for p, row in rows.items()}
    with stage(f"{exporter}: timing 1x{TOKENS}, {args.runs} round-robin runs"):
        ms = interleaved_medians(interpreters, one, args.runs, args.warmup)
    for precision, row in rows.items():
        row["ms"], row["ratio"] = ms[precision], ms[precision] / ms["fp32"]


def table(results: dict[str, dict[str, dict]], args) -> Table:
    t = Table(title=f"all-MiniLM-L6-v2 for snapdragon-8 as .tflite at 1x{TOKENS}, in ai-edge-litert on this host "
                    f"(threads: {args.threads or os.cpu_count()}; latency: medians of {args.runs} round-robin runs)")
    for col in ("export", "precision", "MB", "ms", "x fp32", "cos mean", "cos min", "SQNR dB", "emb cos min", "goal"):
        t.add_column(col, justify="left" if col in ("export", "precision", "goal") else "right")
    for exporter, rows in results.items():
        for precision, r in rows.items():
            met = r["cosine_min"] >= GOAL_COSINE[precision]
            if precision == "int8":
                met = met and r["bytes"] / 1e6 <= GOAL_INT8_MB and r["ms"] <= rows["fp32"]["ms"]
            t.add_row(exporter, precision, f"{r['bytes'] / 1e6:.1f}", f"{r['ms']:.2f}", f"{r['ratio']:.3f}",
                      f"{r['cosine_mean']:.7f}", f"{r['cosine_min']:.7f}", f"{r['sqnr_db']:.1f}",
                      f"{r['embedding_min']:.5f}", "met" if met else "NOT met")
    return t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, help="folder with minilm-{dynamo,torchscript}.onnx (default: export)")
    parser.add_argument("--data", type=Path, default=ROOT / "out" / "data", help="tools/prepare_data.py's folder")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="interpreter threads (default: all cores)")
    args = parser.parse_args(argv)
    try:
        args.data = args.data.resolve()
        ensure_data(args.data)
        polarity = load_npz(args.data / "polarity.npz")
        with tempfile.TemporaryDirectory(prefix="bench-tflite-") as tmp:
            workdir = Path(tmp)
            results = {}
            for exporter, source in exports(workdir, args.models).items():
                rows = compile_all(source, exporter, args.data, workdir)
                evaluate(source, exporter, rows, polarity, args)
                results[exporter] = rows
            Console(width=160).print(table(results, args))
    except UserError as exc:
        print(f"bench_tflite: error: {exc}", file=sys.stderr)
        return 2
    print("goals: cosine min >= 0.9999 (fp32, fp16) and >= 0.99 (int8) against the original in onnxruntime; "
          f"int8 file <= {GOAL_INT8_MB:g} MB and no slower than the fp32 .tflite in the same run.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
