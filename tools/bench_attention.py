"""Benchmark: how the cost of attention grows with sequence length, exact vs sliding-window vs linear.

A random-weight BERT with 2048 positions is exported once (torch, offline) and rebuilt by each pass:
exact (lower-attention{form=decomposed}), sliding-window-attention{window=W,sinks=G} for each W and
G (named window-W, window-W+G), and linear-attention. For each sequence length: onnxruntime CPU latency (medians of interleaved runs),
FLOP estimates (edgec.analysis.cost on the model made static at that length) and the error against
exact. Error on random weights means little, so the error is measured again on the real
all-MiniLM-L6-v2 on real text (gensim's lee_background.cor).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import onnx_ir as ir  # noqa: E402

from bench_fusion import interleaved_medians, log, stage  # noqa: E402
from edgec import ir as eir  # noqa: E402
from edgec.analysis.cost import model_cost  # noqa: E402
from edgec.errors import UserError  # noqa: E402
from edgec.frontends.onnx import load_onnx  # noqa: E402
from edgec.frontends.torch import EXPORTERS, export_hf_folder, export_model_by_config  # noqa: E402
from edgec.passes.core import PassContext  # noqa: E402
from edgec.passes.fuse.lower_attention import LowerAttentionPass  # noqa: E402
from edgec.passes.manager import PassManager  # noqa: E402
from edgec.passes.replace import LinearAttentionPass, SlidingWindowAttentionPass  # noqa: E402
from edgec.verify import compare, ort_session, run_session  # noqa: E402
from export_minilm import minilm_folder  # noqa: E402
from prepare_data import gensim_data_dir, load_tokenizer, read_lines  # noqa: E402

LONG_BERT = dict(vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=1024, max_position_embeddings=2048)
OUTPUT = "last_hidden_state"


def ints(text: str, least: int = 1) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < least:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers >= {least}")
    return values


def counts(text: str) -> list[int]:
    return ints(text, least=0)


# ------------------------------------------------------------------------------------------- models
def variants(model: ir.Model, windows: list[int], sinks: list[int]) -> dict[str, ir.Model]:
    """The cleaned model rebuilt by each pass: exact, window-W (window-W+G with G sinks), linear."""
    passes = {"exact": LowerAttentionPass(form="decomposed")}
    passes.update({f"window-{w}" + (f"+{g}" if g else ""): SlidingWindowAttentionPass(window=w, sinks=g)
                   for w in windows for g in sinks if g <= w})
    passes["linear"] = LinearAttentionPass()
    result = {}
    for name, pass_ in passes.items():
        copy = eir.clone(model)
        stats = pass_(copy, PassContext()).stats
        log(f"  {pass_.spec()}: {stats}")
        result[name] = copy
    return result


def cleaned(path: Path) -> ir.Model:
    model = load_onnx(path)
    PassManager("cleanup", PassContext()).run(model)
    return model


def flops(model: ir.Model, length: int) -> tuple[float, float]:
    """(model, attention) FLOPs at batch 1 and `length` tokens. The model is made static at that length
    and cleaned (the run-time padding arithmetic folds away), so every shape is a number; attention
    is what runs on per-head tensors (rank 4 and more: [B, H, S, ...], chunks [B, H, n, W, ...])."""
    static = eir.clone(model)
    for value in static.graph.inputs:
        value.shape = ir.Shape([1, length])
    for node in static.graph:
        for value in node.outputs:
            value.shape = None
    PassManager("cleanup", PassContext()).run(static)
    cost = model_cost(static)
    ranks = {node.name: len(node.outputs[0].shape or ()) for node in static.graph if node.outputs}
    attention = sum(c.flops for c in cost.nodes if ranks.get(c.node, 0) >= 4)
    return cost.flops, attention


# ------------------------------------------------------------------------------------------- inputs
def random_feeds(model: ir.Model, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    names = [v.name for v in model.graph.inputs]
    feeds = {"input_ids": rng.integers(0, vocab, (1, length), dtype=np.int64),
             "attention_mask": np.ones((1, length), np.int64), "token_type_ids": np.zeros((1, length), np.int64)}
    return {k: v for k, v in feeds.items() if k in names}


def text_feeds(tokenizer, documents: list[str], length: int, batch: int = 2) -> dict[str, np.ndarray]:
    """`batch` rows of exactly `length` tokens of running text (consecutive documents joined), no padding."""
    rows, start = [], 0
    for _ in range(batch):
        end = start + 1
        while len(tokenizer(" ".join(documents[start:end]), verbose=False)["input_ids"]) < length:
            end += 1
            if end > len(documents):
                raise UserError(f"lee_background.cor holds fewer than {length} tokens after document {start}",
                                "ask for shorter --minilm-lengths")
        rows.append(" ".join(documents[start:end]))
        start = end
    encoded = tokenizer(rows, padding="max_length", truncation=True, max_length=length, return_tensors="np")
    return {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in encoded.items()}


# ------------------------------------------------------------------------------------------ measuring
def embeddings(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mean-pooled token states: the sentence embedding MiniLM is used for (no padding in these inputs)."""
    return {"embedding": outputs[OUTPUT].mean(axis=1)}


def errors(reference: dict, outputs: dict) -> dict[str, dict[str, float]]:
    return {name: {"tokens": compare({OUTPUT: reference[OUTPUT]}, {OUTPUT: out[OUTPUT]}),
                   "embedding": compare(embeddings(reference), embeddings(out))}
            for name, out in outputs.items() if name != "exact"}


def cost_curve(models: dict[str, ir.Model], args) -> list[dict]:
    rows = []
    for length in args.lengths:
        with stage(f"long BERT, {length} tokens: FLOPs, errors, {args.runs} interleaved runs"):
            sessions = {name: ort_session(model, threads=args.threads, spinning=False) for name, model in models.items()}
            feeds = random_feeds(models["exact"], length, LONG_BERT["vocab_size"])
            outputs = {name: run_session(session, feeds) for name, session in sessions.items()}
            ms = interleaved_medians(sessions, feeds, args.runs, args.warmup)
            counted = {name: flops(model, length) for name, model in models.items()}
            rows.append({"length": length, "ms": ms, "flops": counted, "errors": errors(outputs["exact"], outputs)})
    return rows


def minilm_errors(models: dict[str, ir.Model], lengths: list[int]) -> list[dict]:
    tokenizer = load_tokenizer()
    documents = read_lines(gensim_data_dir() / "lee_background.cor")
    rows = []
    for length in lengths:
        with stage(f"MiniLM, {length} tokens of lee_background.cor"):
            feeds = text_feeds(tokenizer, documents, length)
            outputs = {name: run_session(ort_session(model), feeds) for name, model in models.items()}
            rows.append({"length": length, "errors": errors(outputs["exact"], outputs)})
    return rows


# ------------------------------------------------------------------------------------------- output
def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def cost_table(rows: list[dict], names: list[str]) -> str:
    header = ["tokens", "variant", "ms", "x exact", "GFLOP", "attn GFLOP", "attn x exact", "cos min", "max|d|"]
    body = []
    for row in rows:
        exact_ms, (_, exact_attention) = row["ms"]["exact"], row["flops"]["exact"]
        for name in names:
            total, attention = row["flops"][name]
            error = row["errors"].get(name)
            body.append([str(row["length"]) if name == names[0] else "", name, f"{row['ms'][name]:.1f}",
                         f"{row['ms'][name] / exact_ms:.2f}", f"{total / 1e9:.2f}", f"{attention / 1e9:.3f}",
                         f"{attention / exact_attention:.3f}",
                         f"{error['tokens']['cosine_min']:.5f}" if error else "", f"{error['tokens']['max_abs_error']:.2e}" if error else ""])
    return _table(header, body)


def error_table(rows: list[dict], names: list[str]) -> str:
    header = ["tokens", "variant", "token cos min", "token cos mean", "SQNR dB", "max|d|", "embedding cos min"]
    body = []
    for row in rows:
        for i, name in enumerate(n for n in names if n != "exact"):
            tokens, embedding = row["errors"][name]["tokens"], row["errors"][name]["embedding"]
            body.append([str(row["length"]) if i == 0 else "", name, f"{tokens['cosine_min']:.5f}",
                         f"{tokens['cosine_mean']:.5f}", f"{tokens['sqnr_db']:.1f}", f"{tokens['max_abs_error']:.3f}",
                         f"{embedding['cosine_min']:.5f}"])
    return _table(header, body)


def run(args, workdir: Path) -> None:
    from transformers import BertConfig

    with stage(f"exporting a random-weight BERT with {LONG_BERT['max_position_embeddings']} positions ({args.exporter})"):
        path = export_model_by_config(BertConfig(**LONG_BERT), workdir / "long-bert.onnx", exporter=args.exporter)
    with stage("cleanup and the attention passes on the long BERT"):
        models = variants(cleaned(path), args.windows, args.sinks)
    names = list(models)
    rows = cost_curve(models, args)
    print(f"\nRandom-weight BERT (hidden {LONG_BERT['hidden_size']}, {LONG_BERT['num_attention_heads']} heads, "
          f"{LONG_BERT['num_hidden_layers']} layers), batch 1, onnxruntime CPU (threads: {args.threads or 'default'}), "
          f"medians of {args.runs} interleaved runs; errors vs exact on random token ids")
    print(cost_table(rows, names))
    if args.minilm_lengths:
        with stage(f"exporting all-MiniLM-L6-v2 ({args.exporter})"):
            path = export_hf_folder(minilm_folder(), workdir / "minilm.onnx", exporter=args.exporter)
        with stage("cleanup and the attention passes on MiniLM"):
            minilm = variants(cleaned(path), args.windows, args.sinks)
        minilm_rows = minilm_errors(minilm, args.minilm_lengths)
        print("\nall-MiniLM-L6-v2 on lee_background.cor (2 rows of running text, no padding): error vs exact "
              "(token states: last_hidden_state per row; embedding: its mean over tokens)")
        print(error_table(minilm_rows, names))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=ints, default=[128, 256, 512, 1024, 2048], help="sequence lengths (default 128,...,2048)")
    parser.add_argument("--windows", type=ints, default=[64, 128], help="sliding windows W (default 64,128)")
    parser.add_argument("--sinks", type=counts, default=[0, 1], help="sink keys of the windows, each (default 0,1)")
    parser.add_argument("--minilm-lengths", type=ints, default=[128, 256, 512], help="MiniLM text lengths, at most 512 (default 128,256,512)")
    parser.add_argument("--no-minilm", action="store_true", help="skip the error on MiniLM")
    parser.add_argument("--runs", type=int, default=10, help="timed runs of each model per length (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each model first (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: onnxruntime's)")
    parser.add_argument("--exporter", choices=EXPORTERS, default="torchscript", help="torch exporter (default torchscript: faster)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the exported models in this folder")
    parser.add_argument("--quick", action="store_true", help="lengths 128,512,1024, W=64, 3 runs, MiniLM at 128 and 512 (under 2 minutes)")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.windows, args.runs, args.warmup, args.minilm_lengths = [128, 512, 1024], [64], 3, 1, [128, 512]
    if args.no_minilm:
        args.minilm_lengths = []
    if args.runs < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--runs and --threads must be at least 1, --warmup at least 0")
    if max(args.lengths) > LONG_BERT["max_position_embeddings"] or max(args.minilm_lengths, default=0) > 512:
        parser.error(f"--lengths go up to {LONG_BERT['max_position_embeddings']}, --minilm-lengths up to 512")
    try:
        with contextlib.ExitStack() as stack:
            if args.keep is not None:
                args.keep.mkdir(parents=True, exist_ok=True)
                workdir = args.keep
            else:
                workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgec-bench-attention-")))
            run(args, workdir)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
