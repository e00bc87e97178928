"""Real exports of tiny random-weight transformers, for testing cleanup passes on what exporters emit.

`exported(arch, exporter)` gives a fresh IR model (opset 20, dynamic batch and sequence) of a
DistilBERT or BERT with hidden size 32, 2 layers, 2 heads and a vocabulary of 100, exported with the
dynamo exporter (as torch ships it, or with optimize=False: the raw graph) or the TorchScript one
(opset 17, then converted). Each export runs once per test process; every call returns a new copy.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import warnings

import onnx
import onnx_ir as ir

from edgec import ir as eir
from edgec.frontends.onnx import normalize_opset
from edgec.passes.core import PassContext
from edgec.testing import assert_numerically_equal
from edgec.verify import generate_inputs

ARCHS = ("distilbert", "bert")
# "dynamo-raw" is the dynamo export before onnxscript's optimizer: Identity, Dropout and friends left in.
EXPORTERS = ("dynamo", "dynamo-raw", "torchscript")
SEQUENCE_LENGTHS = (5, 11)
BATCH, SEQ, VOCAB = 2, 8, 100


def _config(arch: str):
    from transformers import BertConfig, DistilBertConfig

    if arch == "distilbert":
        return DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                max_position_embeddings=64)
    if arch == "bert":
        return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=64, type_vocab_size=1)
    raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")


def _module(arch: str):
    import torch
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_config(_config(arch)).eval()

    class LastHiddenState(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state

    return LastHiddenState().eval()


@contextlib.contextmanager
def _quiet():
    loggers = [logging.getLogger(n) for n in ("torch", "torch.onnx", "torch.export", "onnxscript", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@functools.lru_cache(maxsize=None)
def _export(arch: str, exporter: str) -> bytes:
    import torch

    module = _module(arch)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(BATCH, SEQ, dtype=torch.int64)
    mask[1, -2:] = 0  # padding in the example keeps "mask is all ones" shortcuts out of a traced graph
    names = ["input_ids", "attention_mask"]
    with _quiet():
        if exporter in ("dynamo", "dynamo-raw"):
            batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("sequence", min=2, max=64)
            program = torch.onnx.export(
                module, (ids, mask), dynamo=True, dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
                input_names=names, output_names=["last_hidden_state"], optimize=exporter == "dynamo", verbose=False)
            model = program.model
        elif exporter == "torchscript":
            buffer = io.BytesIO()
            axes = {n: {0: "batch", 1: "sequence"} for n in names + ["last_hidden_state"]}
            with torch.no_grad():
                torch.onnx.export(module, (ids, mask), buffer, dynamo=False, opset_version=17, input_names=names,
                                  output_names=["last_hidden_state"], dynamic_axes=axes)
            model = ir.from_proto(onnx.load_from_string(buffer.getvalue()))
        else:
            raise ValueError(f"unknown exporter {exporter!r}; choose from {EXPORTERS}")
        normalize_opset(model, 20)
    return ir.to_proto(model).SerializeToString()


def exported(arch: str, exporter: str) -> ir.Model:
    """A fresh copy of the export (passes mutate models in place)."""
    return ir.from_proto(onnx.load_from_string(_export(arch, exporter)))


def ops(model: ir.Model, op_type: str) -> int:
    return sum(1 for n in model.graph.all_nodes() if n.op_type == op_type)


def assert_same_outputs(before: ir.Model, after: ir.Model) -> None:
    """Both models agree in onnxruntime at every length in SEQUENCE_LENGTHS (dynamic dims stay dynamic)."""
    assert [v.name for v in after.graph.outputs] == [v.name for v in before.graph.outputs]
    for seq in SEQUENCE_LENGTHS:
        feeds = generate_inputs(before, batch=BATCH, sequence=seq)
        assert_numerically_equal(before, after, feeds, rtol=1e-5, atol=1e-5)


def check_export(pass_, arch: str, exporter: str):
    """Runs `pass_` on a fresh copy of the export and checks what it owes any real model: valid IR,
    the same outputs with the dynamic axes intact, and nothing left for a second run. Returns
    (before, after, result) for the checks of the pass's own work."""
    before, after = exported(arch, exporter), exported(arch, exporter)
    result = pass_(after, PassContext())
    eir.verify(after)
    assert_same_outputs(before, after)
    assert not pass_(after, PassContext()).modified, f"{pass_.name} changed the {arch} {exporter} export again"
    return before, after, result
