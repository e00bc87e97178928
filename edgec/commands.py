"""What each `edgec` subcommand does, printed with rich (tables on stdout, progress on stderr)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from rich.table import Table

from edgec import ir as eir
from edgec.cli import _console
from edgec.errors import UserError
from edgec.report import dumps


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _status(message: str):
    """A spinner on stderr when it is a terminal; silent otherwise (CI logs stay readable)."""
    console = _console(stderr=True)
    if console.is_terminal:
        return console.status(message)
    import contextlib

    return contextlib.nullcontext(type("S", (), {"update": lambda self, *a, **k: None})())


# ---------------------------------------------------------------------------------------------- compile
def cmd_compile(args) -> int:
    from edgec.compiler import CompileOptions, compile_model, parse_shapes

    options = CompileOptions(
        target=args.target,
        outdir=Path(args.output),
        precision=args.precision,
        inputs=args.inputs,
        calib=args.calib,
        calib_method=args.calib_method,
        accuracy_budget=args.accuracy_budget,
        prune=args.prune,
        latency_budget_ms=args.latency_budget,
        eval=args.eval,
        metric=args.metric,
        shapes=parse_shapes(args.shape),
        smooth=args.smooth != "off",
        tune_trials=args.tune_trials,
        tuning_db=args.tuning_db,
        npu_aot=args.npu_aot,
        pipeline=args.pipeline,
        backend=args.backend,
        tolerance=args.tolerance,
        exporter=args.exporter,
        debug_counter=args.debug_counter,
        verify_each=args.verify_each,
        dump_ir=args.dump_ir,
    )
    err = _console(stderr=True)
    with _status("compiling") as status:
        result = compile_model(args.model, options, progress=lambda m: status.update(m))
    report = result.report
    if args.json:
        print(dumps(report))
    else:
        _print_compile(report, _console())
    if not result.passed:
        err.print(
            f"edgec: verification failed: {'; '.join(result.failures)}. The artifact was not written; "
            f"report in {result.report_path}. {_failure_fix(report)}",
            markup=False,
        )
        return 1
    return 0


def _failure_fix(report: dict) -> str:
    """What to do about a failed check: a pruned model's is its accuracy budget, not --tolerance."""
    pruning = report.get("pruning")
    if not pruning:
        return "Widen with --tolerance, or find the pass with --verify-each."
    accept = "or accept the loss with a lower --accuracy-budget (the least mean cosine the pruned model may keep)."
    if pruning.get("search"):
        return ("--prune auto chose on calibration samples, which the check's data is not like enough: "
                f"calibrate on data like the check's, {accept}")
    return f"Prune less (smaller --prune shares), calibrate on data like the check's, {accept}"


def _pass_table(rows: list[dict], title: str) -> Table:
    """What each pass did: the rows of PipelineResult.summary()."""
    table = Table(title=title, show_edge=False)
    for col in ("pass", "runs", "changed", "nodes removed", "stats", "time"):
        table.add_column(col, justify="right" if col in ("runs", "nodes removed", "time") else "left")
    for row in rows:
        stats = ", ".join(f"{k}={v}" for k, v in row["stats"].items() if v)
        table.add_row(row["pass"], str(row["runs"]), "yes" if row["modified"] else "no", str(row["nodes_removed"]), stats, f"{row['seconds']:.2f}s")
    return table


def _precision_table(quantization: dict) -> Table:
    """Mixed precision: each quantizable op, its sensitivity at each rung it was measured at and the
    precision it got, most sensitive (at int8) first."""
    a = quantization["assignment"]
    if a["metric"] == "top1":
        met = f"top-1 {a['value']:.4f} (float {a['float_value']:.4f}, budget: lose at most {a['budget']})"
    else:
        digits = max(5, len(f"{a['budget']}".partition(".")[2]) + 1)  # enough to tell it from the budget
        met = f"mean cosine {a['value']:.{digits}f} (budget {a['budget']})"
    ladder = a["ladder"]
    placed = ", ".join(f"{a['ops'][rung]} {rung}" for rung in ladder)
    title = f"precision per op ({placed}); {met} on {a['samples']} samples of {a['data']}"
    table = Table(title=title, show_edge=False)
    table.add_column("op")
    table.add_column("kind")
    measured = ladder[:-1]
    for rung in measured:
        table.add_column(f"1 - cosine alone, {rung}", justify="right")
    table.add_column("precision")
    for row in sorted(quantization["layers"], key=lambda r: -r["sensitivity"]):
        alone = row["sensitivities"]
        cells = [f"{alone[rung]:.2e}" if rung in alone else "-" for rung in measured]
        table.add_row(row["node"], row["kind"], *cells, row["precision"])
    return table


def _pruning_table(pruning: dict) -> Table:
    """Heads and FFN neurons removed per layer, with the estimate before and after."""
    e = pruning["estimated_latency_ms"]
    search = pruning.get("search")
    chosen = f"; heads {search['heads']:g}, ffn {search['ffn']:g} chosen as {search['reason']}" if search else ""
    title = (f"pruning: {pruning['heads_removed']} heads, {pruning['neurons_removed']} FFN neurons removed"
             f"{' and layers refit' if pruning['reconstruct'] else ''}{chosen}; estimated {e['before']:.3g} -> "
             f"{e['after']:.3g} ms ({e['precision']}, roofline)")
    table = Table(title=title, show_edge=False)
    for col in ("layer", "heads kept", "heads removed", "FFN neurons kept", "FFN neurons removed"):
        table.add_column(col, justify="right" if col != "heads removed" else "left")
    heads = {r["layer"]: r for r in pruning["heads"]}
    ffn = {r["layer"]: r for r in pruning["ffn"]}
    for layer in sorted(set(heads) | set(ffn)):
        h, f = heads.get(layer), ffn.get(layer)
        table.add_row(str(layer), f"{h['kept']}/{h['heads']}" if h else "all",
                      ",".join(map(str, h["removed_heads"])) if h else "",
                      f"{f['kept']}/{f['neurons']}" if f else "all", str(f["removed"]) if f else "0")
    return table


def _print_compile(report: dict, console) -> None:
    v, s = report["verification"], report["sizes"]
    console.print(f"[bold]{report['source']}[/] -> {report['target']} via {report['backend']} ({report['precision']})")
    console.print(_pass_table(report["passes"], "passes"))
    quantization = report.get("quantization")
    if quantization and quantization.get("layers"):
        console.print(_precision_table(quantization))
    if report.get("pruning"):
        console.print(_pruning_table(report["pruning"]))
    summary = Table(show_header=False, show_edge=False)
    summary.add_column()
    summary.add_column()
    summary.add_row("nodes", f"{s['original_nodes']} -> {s['final_nodes']}")
    summary.add_row("size", f"{_fmt_bytes(s['original_bytes'])} -> {_fmt_bytes(s['artifact_bytes'])}")
    if report.get("static_shapes"):
        summary.add_row("static shapes", ", ".join(f"{k} {'x'.join(map(str, d))}" for k, d in report["static_shapes"].items()))
    smoothing = (quantization or {}).get("smoothing")
    if smoothing and smoothing["activations"]:
        rows = smoothing["activations"]
        alphas = sorted(r["alpha"] for r in rows if r["alpha"] is not None)
        span = f", alpha {alphas[0]}-{alphas[-1]}" if alphas else ""
        summary.add_row("smoothing", f"{smoothing['smoothed']} of {len(rows)} activations{span}; int8 error of their MatMuls "
                        f"{np.mean([r['error_before'] for r in rows]):.2e} -> {np.mean([r['error_after'] for r in rows]):.2e} (mean)")
    outputs = (quantization or {}).get("outputs")
    if outputs:
        summary.add_row("int8 results", f"{outputs['quantized']} quantized, {len(outputs['float'])} kept float "
                        f"(estimated int8 SQNR under {outputs['min_sqnr_db']:g} dB)")
    summary.add_row(
        "verification",
        f"cosine mean {v['cosine_mean']:.7f} min {v['cosine_min']:.7f}, SQNR {v['sqnr_db']:.1f} dB, "
        f"max abs err {v['max_abs_error']:.3g} on {v['samples']} samples ({v['inputs']}) in {v['verified_in']}",
    )
    export = v.get("export_vs_pytorch")
    if export:
        summary.add_row("export vs PyTorch", f"cosine min {export['cosine_min']:.7f}, max abs err {export['max_abs_error']:.3g}")
    second = v.get("second_shape")
    if second:
        shapes = ", ".join(f"{k} {'x'.join(map(str, d))}" for k, d in second["shapes"].items())
        if "skipped" in second:
            summary.add_row("second shape", f"skipped: {second['skipped']}")
        elif "cosine_min" in second:
            summary.add_row("second shape", f"cosine min {second['cosine_min']:.7f}, max abs err {second['max_abs_error']:.3g} at {shapes}")
    summary.add_row("status", "[green]passed[/]" if v["passed"] else f"[red]failed: {'; '.join(v['failures'])}[/]")
    if report["artifact"]:
        summary.add_row("artifact", report["artifact"])
    aot = (report.get("artifact_meta") or {}).get("npu_aot")
    if aot:
        done = f"{aot['file']}" if aot["status"] == "compiled" else f"skipped: {aot['reason']}"
        summary.add_row(f"{aot['soc']} NPU AOT", done)
    for note in report["notes"]:
        summary.add_row("note", note)
    console.print(summary)


# ---------------------------------------------------------------------------------------------- inspect
def inspect_model(model_path: str, target_name: str | None = None, exporter: str = "dynamo",
                  backend_name: str | None = None) -> dict:
    from edgec.analysis.cost import model_cost
    from edgec.frontends.onnx import ORIGINAL_OPSET_KEY
    from edgec.sources import load_source
    from edgec.targets import get_target
    from edgec.verify.inputs import graph_inputs

    target = get_target(target_name) if target_name else None
    if backend_name is not None and target is None:
        raise UserError("--backend names the backend whose nodes inspect checks for a target", "add --target")
    model, onnx_path, tmp = load_source(model_path, exporter=exporter)
    try:
        cost = model_cost(model)
        hist = eir.op_histogram(model)

        def describe(v):
            dims = [d if isinstance(d, int) else (getattr(d, "value", None) or "?") for d in (v.shape or [])]
            return {"name": v.name, "dtype": str(v.dtype.name).lower() if v.dtype else None, "shape": dims if v.shape is not None else None}

        info = {
            "model": str(model_path),
            "opset": {"original": model.meta.get(ORIGINAL_OPSET_KEY), "normalized": model.opset_imports.get("")},
            "producer": f"{model.producer_name or ''} {model.producer_version or ''}".strip(),
            "inputs": [describe(v) for v in graph_inputs(model)],
            "outputs": [describe(v) for v in model.graph.outputs],
            "nodes": sum(hist.values()),
            "ops": dict(hist.most_common()),
            "parameters": cost.parameters,
            "parameter_bytes": cost.parameter_bytes,
            "file_bytes": eir.file_bytes(onnx_path),
            "flops": cost.flops,
            "flops_bindings": cost.bindings,
        }
        info.update(_structure_info(model))
        if target is not None:
            from edgec.targets.cost import estimate_model_seconds

            unsupported = target.unsupported_ops(hist.keys())
            precision = "fp32" if "fp32" in target.precisions else target.precisions[0]
            backend = _backend_check(model, target, backend_name)
            # The model as its backend runs it (lowered), else as it came.
            lowered_cost = backend.pop("cost", None)
            estimate = estimate_model_seconds(lowered_cost or cost, target, precision)
            form = f"as the {backend['name']} backend lowers it" if lowered_cost else "as exported"
            info["target"] = {
                "name": target.name,
                "unsupported_ops": {op: list(why) for op, why in unsupported.items()},
                "backend": backend,
                "estimated_latency_s": estimate,
                "estimate_precision": precision,
                "estimate_note": f"roofline estimate of the model {form}, from the profile's peak throughput and bandwidth, "
                                 "not a measurement",
            }
        return info
    finally:
        if tmp is not None:
            tmp.cleanup()


def _backend_check(model, target, requested: str | None) -> dict:
    """What the target's backend (or `requested`) makes of the model: the nodes its emitter cannot
    take, on a copy lowered as the compile lowers it (static shapes where the backend needs them:
    batch 1 and the generated inputs' other dims), and that copy's `cost` where its shapes stayed dynamic."""
    from edgec.analysis.cost import model_cost
    from edgec.compiler import _has_dynamic_dims, _specialize, choose_backend
    from edgec.passes.core import PassContext
    from edgec.passes.manager import PassManager
    from edgec.verify import generate_inputs

    notes: list[str] = []
    try:
        backend = choose_backend(target, requested, notes)
    except UserError as exc:
        if requested is not None:  # the user named it: a user error, like compile's --backend
            raise
        return {"name": None, "error": str(exc), "notes": notes}
    lowered = eir.clone(model)
    specialized = not backend.dynamic_shapes and _has_dynamic_dims(lowered)
    if specialized:
        _specialize(lowered, {}, generate_inputs(lowered))
    pipeline = ",".join(p for p in (target.default_pipeline, backend.lowering_pipeline(target, "fp32")) if p)
    ctx = PassContext(target=target, options={"precision": "fp32", "backend": backend.name})
    PassManager(pipeline or [], ctx).run(lowered)
    op_types = {node.name: node.op_type for node in lowered.graph}
    problems = backend.unsupported_ops(lowered)
    # A copy specialized to the generated inputs' shapes is not costed: the estimate keeps the
    # model's own bindings (batch 1, other dims 128).
    return {"name": backend.name, "notes": notes, "cost": None if specialized else model_cost(lowered),
            "unsupported": {name: {"op": op_types.get(name, "?"), "why": why} for name, why in problems.items()}}


def _structure_info(model) -> dict:
    """The attention blocks, norms and feed-forward blocks edgec recognises (on one cleaned-up copy, as
    the compiler sees the model), each attention proven by execution, and every Softmax it could not
    recognise with the reason."""
    from edgec.analysis.attention import find_attention, verify_blocks
    from edgec.analysis.structure import find_feed_forward, find_norms
    from edgec.passes.manager import run_pipeline

    cleaned = eir.clone(model)
    run_pipeline(cleaned, "cleanup")
    found = find_attention(cleaned)
    verify_blocks(cleaned, found.blocks)
    return {
        "attention": [
            {"layer": b.layer, "heads": b.heads, "kv_heads": b.kv_heads, "head_dim": b.head_dim, "mask": b.mask,
             "scale": b.scale, "rotary": b.rotary, "verified": b.verified, "nodes": b.nodes}
            for b in found.blocks
        ],
        "unrecognised_softmax": [{"node": node, "reason": reason} for node, reason in found.unrecognised],
        "norms": [{"kind": n.kind, "form": n.form, "epsilon": n.epsilon, "nodes": n.nodes} for n in find_norms(cleaned)],
        "ffn": [{"intermediate": f.intermediate, "activation": f.activation, "gated": f.gated, "nodes": f.nodes}
                for f in find_feed_forward(cleaned)],
    }


def _print_structure(info: dict, console) -> None:
    from collections import Counter

    if info["norms"]:
        kinds = Counter(f"{n['kind']} ({n['form']}, eps {n['epsilon']:.3g})" for n in info["norms"])
        console.print(f"norms: {len(info['norms'])} = " + ", ".join(f"{count} {kind}" for kind, count in kinds.items()))
    if info["ffn"]:
        kinds = Counter(f"{'gated ' if f['gated'] else ''}{f['activation']}, intermediate {f['intermediate']}" for f in info["ffn"])
        console.print(f"feed-forward blocks: {len(info['ffn'])} = " + ", ".join(f"{count} {kind}" for kind, count in kinds.items()))


def _print_attention(info: dict, console) -> None:
    if info["attention"]:
        table = Table(title=f"attention ({len(info['attention'])} blocks)", show_edge=False)
        for col in ("layer", "heads", "kv heads", "head dim", "mask", "scale", "rotary", "verified", "nodes"):
            table.add_column(col, justify="left" if col in ("mask", "rotary", "verified") else "right")
        for b in info["attention"]:
            table.add_row(str(b["layer"]), str(b["heads"]), str(b["kv_heads"]), str(b["head_dim"]), b["mask"], f"{b['scale']:.4g}",
                          "yes" if b["rotary"] else "no", "yes" if b["verified"] else "no", str(len(b["nodes"])))
        console.print(table)
    if info["unrecognised_softmax"]:
        table = Table(title="softmax not recognised as attention", show_edge=False)
        table.add_column("node")
        table.add_column("why")
        for miss in info["unrecognised_softmax"]:
            table.add_row(miss["node"], miss["reason"])
        console.print(table)


def cmd_inspect(args) -> int:
    with _status("inspecting"):
        info = inspect_model(args.model, args.target, args.exporter, args.backend)
    if args.json:
        print(dumps(info))
        return 0
    console = _console()
    console.print(f"[bold]{info['model']}[/]  opset {info['opset']['original']} (normalized to {info['opset']['normalized']}), {info['producer']}")
    io_table = Table(title="inputs and outputs", show_edge=False)
    for col in ("", "name", "dtype", "shape"):
        io_table.add_column(col)
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            io_table.add_row(kind[:-1], v["name"], v["dtype"] or "?", "x".join(map(str, v["shape"])) if v["shape"] is not None else "?")
    console.print(io_table)
    ops = Table(title=f"ops ({info['nodes']} nodes)", show_edge=False)
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, n in info["ops"].items():
        ops.add_row(op, str(n))
    console.print(ops)
    b = info["flops_bindings"]
    console.print(
        f"parameters {info['parameters']:,} ({_fmt_bytes(info['parameter_bytes'])}), file {_fmt_bytes(info['file_bytes'])}, "
        f"~{info['flops'] / 1e9:.2f} GFLOPs per run (estimate at batch={b['batch']}, other dynamic dims={b['*']})"
    )
    _print_attention(info, console)
    _print_structure(info, console)
    if "target" in info:
        t = info["target"]
        if t["unsupported_ops"]:
            # Ops outside the standard set the target's units list (com.microsoft ones, say) that the
            # backend takes all the same run in its runtime: not ops the target cannot run.
            taken = "error" not in t["backend"] and not t["backend"]["unsupported"]
            title = (f"ops outside {t['name']}'s op set, which the {t['backend']['name']} backend's runtime runs" if taken
                     else f"ops {t['name']} cannot run")
            table = Table(title=title, show_edge=False)
            table.add_column("op")
            table.add_column("why")
            for op, why in t["unsupported_ops"].items():
                table.add_row(op, "; ".join(why))
            console.print(table)
        else:
            console.print(f"every op runs on {t['name']}")
        _print_backend_check(t["backend"], console)
        console.print(f"estimated latency on {t['name']} ({t['estimate_precision']}): {t['estimated_latency_s'] * 1e3:.2f} ms ({t['estimate_note']})")
    return 0


def _print_backend_check(check: dict, console) -> None:
    if "error" in check:
        console.print(f"no backend: {check['error']}")
        return
    if not check["unsupported"]:
        console.print(f"the {check['name']} backend takes every node")
        return
    table = Table(title=f"nodes the {check['name']} backend cannot take ({len(check['unsupported'])})", show_edge=False)
    for col in ("node", "op", "why"):
        table.add_column(col)
    for name, problem in check["unsupported"].items():
        table.add_row(name, problem["op"], problem["why"])
    console.print(table)


# ---------------------------------------------------------------------------------------------- opt
def cmd_opt(args) -> int:
    from edgec.passes.core import DebugCounter, PassContext
    from edgec.passes.instruments import PrintAfterChange, Progress, VerifyAfterEachPass
    from edgec.passes.manager import PassManager
    from edgec.sources import load_source
    from edgec.targets import get_target

    src = Path(args.model)
    out = Path(args.output)
    if src.exists() and out.exists() and src.resolve() == out.resolve():
        raise UserError(f"output {out} is the input model", "write to another path (edgec never modifies its input)")
    if (out.exists() and out.is_dir()) or str(args.output).endswith(("/", os.sep)):
        raise UserError(f"output {args.output} is a folder", "pass a file path ending in .onnx")
    target = get_target(args.target) if args.target else None
    manager = PassManager(args.pipeline)
    counter = DebugCounter.parse(args.debug_counter)
    manager.check_counter(counter)
    model, onnx_path, tmp = load_source(args.model, exporter=args.exporter)
    try:
        instruments = []
        if args.print_after_change:
            instruments.append(PrintAfterChange(stream=sys.stdout))
        if args.verify_each:
            from edgec.verify import generate_inputs, run_model

            feeds = generate_inputs(model)
            instruments.append(VerifyAfterEachPass(feeds, run_model(onnx_path, feeds)))
        manager.ctx = PassContext(target=target, counter=counter, instruments=instruments)
        before = eir.node_count(model)
        with _status("optimizing") as status:
            instruments.insert(0, Progress(status.update))
            result = manager.run(model)
        eir.verify(result.model)
        eir.save(result.model, out)
    finally:
        if tmp is not None:
            tmp.cleanup()
    err = _console(stderr=True)
    if args.stats:
        err.print(_pass_table(result.summary(), "pass statistics"))
    err.print(f"wrote {out}: {before} -> {eir.node_count(result.model)} nodes", markup=False)
    return 0


# ---------------------------------------------------------------------------------------------- passes / targets
def cmd_passes(args) -> int:
    from edgec.passes.registry import NAMED_PIPELINES, PASSES

    rows = []
    for name in PASSES.names():
        cls = PASSES.get(name)
        import dataclasses

        opts = [f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.Options)] if dataclasses.is_dataclass(cls.Options) else []
        rows.append({"name": name, "summary": cls.summary(), "options": opts, "origin": PASSES.origin(name)})
    if args.json:
        print(dumps({"passes": rows, "pipelines": NAMED_PIPELINES}))
        return 0
    console = _console()
    table = Table(title="passes", show_edge=False)
    for col in ("name", "what it does", "options", "from"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["summary"], ", ".join(r["options"]), r["origin"])
    console.print(table)
    pipes = Table(title="named pipelines", show_edge=False)
    pipes.add_column("name")
    pipes.add_column("expands to")
    for name, text in NAMED_PIPELINES.items():
        pipes.add_row(name, text)
    console.print(pipes)
    return 0


def cmd_targets(args) -> int:
    from edgec.targets import get_target, target_names

    if args.action == "show":
        if not args.name:
            raise UserError("edgec targets show needs a target name", f"e.g. edgec targets show {target_names()[0]}")
        target = get_target(args.name)
        data = target.to_dict()
        if args.json:
            print(dumps(data))
            return 0
        _print_target(data, _console())
        return 0
    if args.name:
        raise UserError(f"unexpected argument {args.name!r}", "use `edgec targets show NAME`")
    targets = [get_target(n) for n in target_names()]
    if args.json:
        print(dumps([t.to_dict() for t in targets]))
        return 0
    table = Table(title="targets", show_edge=False)
    for col in ("name", "device", "units", "precisions", "backends"):
        table.add_column(col)
    for t in targets:
        table.add_row(t.name, t.description, ", ".join(u.name for u in t.units), ", ".join(t.precisions), ", ".join(t.backends))
    _console().print(table)
    return 0


def _print_target(data: dict, console) -> None:
    console.print(f"[bold]{data['name']}[/]: {data['description']}")
    for key in ("arch", "memory_bandwidth", "memory_size", "backends", "default_pipeline", "precisions", "cpu_features"):
        if key in data:
            value = data[key]
            if key == "memory_bandwidth":
                value = f"{value / 1e9:.1f} GB/s"
            elif key == "memory_size":
                value = _fmt_bytes(value)
            elif isinstance(value, (list, tuple)):
                value = ", ".join(map(str, value))
            console.print(f"  {key}: {value}", markup=False)
    table = Table(title="compute units", show_edge=False)
    for col in ("unit", "kind", "description", "peak", "ops"):
        table.add_column(col)
    for u in data.get("units", []):
        peak = ", ".join(f"{p} {v / 1e12:.2f} T/s" for p, v in u.get("peak_ops", {}).items())
        ops = "any" if u.get("ops") is None else f"{len(u['ops'])} ops"
        table.add_row(u["name"], u["kind"], u["description"], peak, ops)
    console.print(table)
