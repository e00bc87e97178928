"""MiniLM (both exporters) at 1x128 on this machine's CPU: untuned TVM, MetaSchedule-tuned TVM and
onnxruntime FP32, timed alternately in one process, with each TVM build's cosine against onnxruntime.

The tuning database persists (default: tvm-tuning-2 under the edgec cache), so a second run, and the
second exporter, reuse the records of the kernels they share; --trials is the budget per model,
records already there counted.

    python tools/bench_tvm.py --trials 256   # the budget of the numbers reported with this tool

One run here (2-core host, both runtimes on both cores): with 256 trials (260 s of tuning for the
first export; the second reuses the records of the kernels they share) TVM took 27.5 ms against
onnxruntime's 30.1 ms for the dynamo export and 34.8 against 32.8 ms for the TorchScript one; with
no trials at all (every MatMul at the default point of edgec.backends.tvm.gemm) about 1.1x
onnxruntime; untuned, over 80x.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgec.analysis.shapes import specialize_inputs  # noqa: E402
from edgec.backends.tvm import TVMBackend, default_database  # noqa: E402
from edgec.backends.tvm.convert import convert  # noqa: E402
from edgec.backends.tvm.targets import host_target, use_host_cores  # noqa: E402
from edgec.backends.tvm.tuning import prepare, tune  # noqa: E402
from edgec.frontends.onnx import load_onnx  # noqa: E402
from edgec.passes.core import PassContext  # noqa: E402
from edgec.passes.manager import PassManager  # noqa: E402
from edgec.targets import get_target  # noqa: E402
from edgec.verify import compare, ort_session, run_session  # noqa: E402

EXPORTS = ROOT / ".cache" / "zoo" / "minilm"
SEQUENCE = 128
VOCABULARY = 30522  # bert-base-uncased, MiniLM's tokenizer


def feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, VOCABULARY, (1, SEQUENCE), dtype=np.int64)
    ids[0, 0], ids[0, -1] = 101, 102  # [CLS] ... [SEP]
    return {"input_ids": ids, "attention_mask": np.ones((1, SEQUENCE), np.int64),
            "token_type_ids": np.zeros((1, SEQUENCE), np.int64)}


def lowered(path: Path, inputs: dict[str, np.ndarray]):
    """What `edgec compile --target x86-64 --backend tvm` runs before emitting."""
    model = load_onnx(path)
    specialize_inputs(model, {name: array.shape for name, array in inputs.items()})
    backend = TVMBackend()
    PassManager("cleanup," + backend.lowering_pipeline(get_target("x86-64"), "fp32"), PassContext()).run(model)
    return model


def vm_runner(executable, model, inputs):
    import tvm
    from tvm import relax

    main = relax.VirtualMachine(executable, tvm.cpu())["main"]
    names = [v.name for v in model.graph.inputs if v.name not in model.graph.initializers]
    args = [tvm.runtime.tensor(inputs[name]) for name in names]
    output = model.graph.outputs[0].name

    def run():
        result = main(*args)
        return {output: (result if hasattr(result, "numpy") else result[0]).numpy()}
    return run


def timed(runners: dict, seconds: float, max_rounds: int, calls: int = 3) -> dict[str, float]:
    """Median ms per call, the runners alternating in rounds of one unmeasured call and then `calls`
    measured ones each (one for a runner that takes over a second).

    The unmeasured call is what makes the alternation fair: after a call, onnxruntime's and TVM's
    worker threads keep spinning for their next job, and a TVM call right after an onnxruntime call
    waited for those cores. Timed call by call in strict alternation, the same tuned MiniLM took
    79-86 ms against 27 ms alone; after one unmeasured call, 27.4 ms."""
    times = {name: [] for name in runners}
    deadline = time.perf_counter() + seconds
    for _ in range(max_rounds):
        for name, run in runners.items():
            started = time.perf_counter()
            run()
            first = time.perf_counter() - started
            for _ in range(calls if first < 1.0 else 1):
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
        if time.perf_counter() > deadline:
            break
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def bench(exporter: str, trials: int, database: Path, seconds: float) -> dict:
    import tvm
    from tvm import relax

    path = EXPORTS / f"minilm-{exporter}.onnx"
    inputs = feeds()
    model = lowered(path, inputs)
    target = tvm.target.Target(host_target())
    untuned_mod = prepare(convert(model), target)
    started = time.perf_counter()
    tuned_mod, summary = tune(untuned_mod, target, database, trials,
                              lambda message: print(f"  [{exporter}] {message}", flush=True))
    tuning_s = time.perf_counter() - started
    session = ort_session(path)
    runners = {
        "onnxruntime": lambda: run_session(session, inputs),
        "tvm-tuned": vm_runner(relax.build(tuned_mod, target), model, inputs),
        "tvm-untuned": vm_runner(relax.build(untuned_mod, target), model, inputs),
    }
    reference = runners["onnxruntime"]()
    cosine = {name: compare(reference, runners[name]())["cosine_min"] for name in ("tvm-tuned", "tvm-untuned")}
    latency = timed(runners, seconds, max_rounds=30)
    return {"exporter": exporter, "latency": latency, "cosine": cosine, "summary": summary, "tuning_s": tuning_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=256, help="MetaSchedule budget per model, records counted")
    parser.add_argument("--database", type=Path, default=default_database())
    parser.add_argument("--exporters", default="dynamo,torchscript")
    parser.add_argument("--seconds", type=float, default=30.0, help="time spent measuring each model")
    args = parser.parse_args()
    missing = [e for e in args.exporters.split(",") if not (EXPORTS / f"minilm-{e}.onnx").exists()]
    if missing:
        print(f"no MiniLM export for {', '.join(missing)} in {EXPORTS}: run tools/export_minilm.py --out {EXPORTS}")
        return 2
    use_host_cores()
    print(f"target {host_target()}, threads {os.environ['TVM_NUM_THREADS']}, budget {args.trials} trials per model, database {args.database}")
    rows = [bench(exporter, args.trials, args.database, args.seconds) for exporter in args.exporters.split(",")]
    print(f"\nMiniLM 1x{SEQUENCE}, fp32, median ms per call (alternating runs)")
    print(f"{'exporter':<12} {'onnxruntime':>11} {'tvm tuned':>10} {'tvm untuned':>12} {'tuned/ort':>10} "
          f"{'untuned/ort':>12} {'cos tuned':>10} {'kernels tuned':>14} {'trials run':>11} {'reused':>7} {'tuning s':>9}")
    for r in rows:
        lat, s = r["latency"], r["summary"]
        print(f"{r['exporter']:<12} {lat['onnxruntime']:>11.2f} {lat['tvm-tuned']:>10.2f} {lat['tvm-untuned']:>12.1f} "
              f"{lat['tvm-tuned'] / lat['onnxruntime']:>9.2f}x {lat['tvm-untuned'] / lat['onnxruntime']:>11.1f}x "
              f"{r['cosine']['tvm-tuned']:>10.6f} {f'{s.tasks_tuned}/{s.tasks}':>14} {s.trials_run:>11} "
              f"{s.records_reused:>7} {r['tuning_s']:>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
