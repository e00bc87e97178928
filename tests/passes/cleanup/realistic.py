"""A real TorchScript export of a tiny random-weight BERT, for testing cleanup passes on what an
exporter really emits.

`bert()` gives a fresh IR model: BertModel(hidden 32, 2 layers, 2 heads, intermediate 64, vocabulary
100) exported with dynamo=False at opset 17 with dynamic batch and sequence axes, outputs
last_hidden_state and pooler_output, then converted to opset 20. The export runs once per test process.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import warnings

import numpy as np
import onnx
import onnx_ir as ir

from edgec import ir as eir
from edgec.frontends.onnx import normalize_opset
from edgec.testing import assert_numerically_equal
from edgec.verify import generate_inputs

SEQUENCE_LENGTHS = (5, 11)
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUTS = ("last_hidden_state", "pooler_output")


@functools.lru_cache(maxsize=None)
def _bert_bytes() -> bytes:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=100, max_position_embeddings=64)
    bert = BertModel(config).eval()

    class Outputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state, out.pooler_output

    ids = torch.randint(1, 100, (2, 8))
    example = (ids, torch.ones(2, 8, dtype=torch.int64), torch.zeros(2, 8, dtype=torch.int64))
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS + OUTPUTS[:1]}
    axes[OUTPUTS[1]] = {0: "batch"}
    buffer = io.BytesIO()
    # The exporter warns and logs at length about tracing; none of it matters here.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(Outputs().eval(), example, buffer, input_names=list(INPUTS), output_names=list(OUTPUTS),
                          dynamic_axes=axes, dynamo=False, opset_version=17)
    model = ir.from_proto(onnx.load_from_string(buffer.getvalue()))
    normalize_opset(model, 20)  # onnxscript's version converter, falling back to onnx's where it lacks an adapter
    return eir.to_proto(model).SerializeToString()


def bert() -> ir.Model:
    """A new copy of the opset-20 TorchScript BERT export (callers may mutate it)."""
    return ir.from_proto(onnx.load_from_string(_bert_bytes()))


def feeds(model: ir.Model, sequence: int) -> dict[str, np.ndarray]:
    return generate_inputs(model, batch=2, sequence=sequence)


def assert_same_outputs(before: ir.Model, after: ir.Model) -> None:
    """Both models compute the same outputs at several sequence lengths: the dynamic axes survived."""
    for sequence in SEQUENCE_LENGTHS:
        assert_numerically_equal(before, after, feeds(before, sequence), rtol=1e-4, atol=1e-5)


def check_realistic(pass_, model: ir.Model | None = None, ctx=None):
    """Runs `pass_` on the BERT export (or `model`) and checks what every cleanup pass owes a real
    model: it changes it, the node count drops, the IR stays valid, the outputs stay the same with
    the batch and sequence axes still dynamic, and a second run changes nothing."""
    from edgec.passes.core import PassContext

    before = model if model is not None else bert()
    result = pass_(eir.clone(before), ctx or PassContext())
    assert result.modified, f"{pass_.name} left the BERT export as it was"
    nodes_before, nodes_after = eir.node_count(before), eir.node_count(result.model)
    print(f"{pass_.name}: {nodes_before} -> {nodes_after} nodes, {result.stats}")
    assert nodes_after < nodes_before
    eir.verify(result.model)
    dims = [d if isinstance(d, int) else d.value for d in result.model.graph.inputs[0].shape]
    assert dims == ["batch", "sequence"]
    assert_same_outputs(before, result.model)
    assert not pass_(result.model, PassContext()).modified, f"{pass_.name} changed the export again"
    return result
