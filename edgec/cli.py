"""The `edgec` command line: compile | inspect | opt | passes | targets."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from edgec.errors import UserError
from edgec.frontends.torch import EXPORTERS


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line and exit code 2, like every other user error."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}", f"see `{self.prog} --help`")


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped output (CI logs, `| grep`) gets wide tables instead of rich's 80-column default.
    width = None if stream.isatty() else 200
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=width)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edgec", description="Compile transformer models for edge hardware, verified.")
    from edgec import __version__

    parser.add_argument("--version", action="version", version=f"edgec {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    c = sub.add_parser("compile", help="compile a model for a target, verify it, write artifact + report.json")
    c.add_argument("model", help="an .onnx file or a Hugging Face model folder")
    c.add_argument("--target", "-t", required=True, help="target name (edgec targets) or a profile .toml")
    c.add_argument("-o", "--output", default="out", help="output folder (default: out)")
    c.add_argument("--precision", default="fp32", help="fp32 | fp16 | int8 | mixed")
    c.add_argument("--inputs", type=Path, help="verification inputs: .npz keyed by input name, batch first")
    c.add_argument("--calib", type=Path, help="calibration data (.npz) for int8/mixed and approximate passes")
    c.add_argument("--calib-method", default="minmax", help="activation ranges: minmax | percentile | entropy | mse")
    c.add_argument("--smooth", choices=("auto", "off"), default="auto",
                   help="int8/mixed: SmoothQuant, each activation's strength chosen by measured error (default auto)")
    c.add_argument("--accuracy-budget", type=float, default=None,
                   help="mixed: with --metric cosine the least mean output cosine to the float model (default 0.999); "
                        "--prune: the least mean output cosine to the original (default 0.95); "
                        "with top1 the most accuracy drop as a fraction (default 0.01)")
    c.add_argument("--prune", metavar="SPEC",
                   help="remove attention heads / FFN neurons: heads=0.25,ffn=0.25[,reconstruct=off] (shares of all), "
                        "or auto with --latency-budget and/or --accuracy-budget (the least mean output cosine); needs --calib, "
                        "and is checked on --inputs or else on calibration samples held out from the refit")
    c.add_argument("--latency-budget", type=float, default=None, metavar="MS",
                   help="--prune auto: the target's estimated latency (ms) to reach; of the heads/FFN mixes that do, the most accurate")
    c.add_argument("--eval", type=Path, help="mixed: data the budget is checked on (.npz; 'labels' for top1); default: --calib")
    c.add_argument("--metric", default="cosine", help="mixed: cosine | top1 (first output's argmax against --eval labels)")
    c.add_argument("--shape", action="append", metavar="NAME=DIMS",
                   help="static input shape, e.g. input_ids=1x128 (repeat or comma-separate); TFLite needs static "
                        "shapes and otherwise takes batch 1 and the --inputs' other dims")
    c.add_argument("--pipeline", help="pass pipeline text; default: the target's pipeline")
    c.add_argument("--backend", help="backend to emit for; default: the target's first available one")
    c.add_argument("--tune-trials", type=int, default=0, metavar="N",
                   help="backends that tune (tvm): MetaSchedule trial budget; 0 = the backend's default")
    c.add_argument("--tuning-db", type=Path, help="tuning database folder, reused by later compiles (default: in the cache)")
    c.add_argument("--npu-aot", choices=("auto", "off"), default="auto",
                   help="tflite: AOT-compile for the target's Qualcomm NPU where its SDK is installed (default auto)")
    c.add_argument("--tolerance", help="widen/narrow verification, e.g. min_cosine=0.999,min_sqnr_db=30")
    c.add_argument("--exporter", default="dynamo", choices=EXPORTERS, help="torch exporter for model folders")
    c.add_argument("--debug-counter", help="stop passes after N rewrites, e.g. fold-constants=3 (bisecting)")
    c.add_argument("--verify-each", action="store_true", help="check IR and numerics after every changing pass")
    c.add_argument("--dump-ir", type=Path, help="write the IR after each changing pass into this folder")
    c.add_argument("--json", action="store_true", help="print the report as JSON")

    i = sub.add_parser("inspect", help="inputs, outputs, ops, parameters, FLOPs; with --target the ops it cannot run")
    i.add_argument("model")
    i.add_argument("--target", "-t")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.add_argument("--backend", help="with --target: the backend whose unsupported nodes to list (default: the target's)")
    i.add_argument("--exporter", default="dynamo", choices=EXPORTERS, help="torch exporter for model folders")

    o = sub.add_parser("opt", help="run a pass pipeline on a model (like mlir-opt)")
    o.add_argument("model")
    o.add_argument("--pipeline", "-p", required=True, help='e.g. "cleanup" or "fold-constants,remove-dead-code"')
    o.add_argument("-o", "--output", required=True, help="output .onnx path")
    o.add_argument("--target", "-t", help="target the passes may consult")
    o.add_argument("--print-after-change", action="store_true", help="print the IR after every pass that changed it")
    o.add_argument("--stats", action="store_true", help="print what each pass did")
    o.add_argument("--debug-counter", help="stop passes after N rewrites, e.g. cse=2")
    o.add_argument("--verify-each", action="store_true", help="check IR and numerics after every changing pass")
    o.add_argument("--exporter", default="dynamo", choices=EXPORTERS, help="torch exporter for model folders")

    p = sub.add_parser("passes", help="list the passes and named pipelines")
    p.add_argument("--json", action="store_true")

    t = sub.add_parser("targets", help="list targets; `targets show NAME` prints one")
    t.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    t.add_argument("name", nargs="?")
    t.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        from edgec import commands

        return getattr(commands, f"cmd_{args.command}")(args)
    except UserError as exc:
        print(f"edgec: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("edgec: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `edgec opt ... | head` closed the pipe: not an error of ours. Silence the flush at exit too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
