"""Benchmark: onnxruntime latency of the original MiniLM exports vs `edgec compile --target x86-64`.

Both models run in this one process, interleaved run by run, so machine noise hits both alike; the
table reports medians and their ratio. Prepares the exports and data first when they are missing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from edgec.compiler import CompileOptions, compile_model  # noqa: E402
from edgec.frontends.torch import EXPORTERS  # noqa: E402
from edgec.verify import ort_session  # noqa: E402



def ensure_inputs(models: Path, data: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if not all((models / f"minilm-{e}.onnx").exists() for e in EXPORTERS):
        subprocess.run([sys.executable, str(ROOT / "tools/export_minilm.py"), "--out", str(models)], check=True, env=env)
    if not (data / "polarity.npz").exists():
        subprocess.run([sys.executable, str(ROOT / "tools/prepare_data.py"), "--out", str(data)], check=True, env=env)


def interleaved_latency(a, b, feeds, runs: int, warmup: int = 5) -> tuple[list[float], list[float]]:
    names_a = [o.name for o in a.get_outputs()]
    names_b = [o.name for o in b.get_outputs()]
    fa = {i.name: feeds[i.name] for i in a.get_inputs()}
    fb = {i.name: feeds[i.name] for i in b.get_inputs()}
    for _ in range(warmup):
        a.run(names_a, fa)
        b.run(names_b, fb)
    ta, tb = [], []
    for i in range(runs):
        # Alternate which goes first so neither always runs on a warmer cache.
        order = ((a, names_a, fa, ta), (b, names_b, fb, tb)) if i % 2 == 0 else ((b, names_b, fb, tb), (a, names_a, fa, ta))
        for sess, names, f, times in order:
            start = time.perf_counter()
            sess.run(names, f)
            times.append(time.perf_counter() - start)
    return ta, tb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=ROOT / "out/models")
    parser.add_argument("--data", type=Path, default=ROOT / "out/data")
    parser.add_argument("--out", type=Path, default=ROOT / "out/bench")
    parser.add_argument("--target", default="x86-64")
    parser.add_argument("--batches", default="1,8", help="sentences per run, comma-separated (batch 1 is trimmed to its real tokens)")
    parser.add_argument("--runs", type=int, default=60)
    args = parser.parse_args()
    console = Console(width=170)
    ensure_inputs(args.models, args.data)
    with np.load(args.data / "polarity.npz") as d:
        data = {k: d[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    workloads = []
    for batch in (int(b) for b in args.batches.split(",")):
        feeds = {k: v[:batch] for k, v in data.items()}
        if batch == 1:  # one query as an app sends it: no padding
            n = int(feeds["attention_mask"][0].sum())
            feeds = {k: v[:, :n] for k, v in feeds.items()}
        workloads.append(feeds)

    table = Table(title=f"MiniLM on {args.target}: original vs edgec in onnxruntime (CPU), {args.runs} interleaved runs each")
    for col in ("export", "batch x tokens", "nodes", "size MB", "original ms", "edgec ms", "edgec/original", "cosine min"):
        table.add_column(col, justify="left" if col == "export" else "right")
    for exporter in EXPORTERS:
        src = args.models / f"minilm-{exporter}.onnx"
        result = compile_model(src, CompileOptions(target=args.target, outdir=args.out / exporter, inputs=args.data / "polarity.npz"))
        a, b = ort_session(src), ort_session(result.artifact.path)
        s, v = result.report["sizes"], result.report["verification"]
        for feeds in workloads:
            ta, tb = interleaved_latency(a, b, feeds, args.runs)
            ma, mb = statistics.median(ta) * 1e3, statistics.median(tb) * 1e3
            table.add_row(
                exporter,
                "x".join(map(str, feeds["input_ids"].shape)),
                f"{s['original_nodes']} -> {s['final_nodes']}",
                f"{s['original_bytes'] / 1e6:.1f} -> {s['artifact_bytes'] / 1e6:.1f}",
                f"{ma:.2f}",
                f"{mb:.2f}",
                f"{mb / ma:.3f}",
                f"{v['cosine_min']:.7f}",
            )
    console.print(table)
    console.print("ratio < 1 means the edgec artifact is faster; medians of interleaved runs in one process.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
