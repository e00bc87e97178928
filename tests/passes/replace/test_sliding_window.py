"""sliding-window-attention: the chunked form's structure, the blocks it leaves alone, and its numbers:
exact attention when the window covers the sequence, banded attention (numpy) when it does not.

Helpers here are shared with test_linear_attention. In the tiny zoo models attention is about 1% of
the final output, so the checks read each block's own output (exposed as a graph output) and scale
the Q and K weights up: with near-uniform softmax a wrong mask or scale would pass unnoticed.
"""

import dataclasses
import functools

import numpy as np
import onnx_ir as ir
import pytest
import zoo
from onnx import TensorProto, helper

from edgec import ir as eir
from edgec.analysis.attention import _values_by_name, block_inputs, canonical_attention
from edgec.errors import UserError
from edgec.frontends.onnx import load_onnx
from edgec.ir.constants import constant_array
from edgec.passes.blocks import FORM_KEY, trusted_blocks
from edgec.passes.core import PassContext
from edgec.passes.manager import PassManager
from edgec.passes.replace import SlidingWindowAttentionPass
from edgec.verify import run_model

ARCHS = ("bert", "gpt2", "llama", "vit", "distilbert")
LOWEST = np.finfo(np.float32).min
HIDDEN, HEADS, HEAD_DIM = 8, 2, 4


# --- shared helpers -----------------------------------------------------------------------------------

def hand_block(mask_shape=("B", 1, "S", "S"), cross: bool = False) -> ir.Model:
    """One attention block as exporters write it (scale on the scores, mask added), cleaned up.
    `cross`: K and V read a second sequence `y`."""
    rng = np.random.default_rng(0)
    inits = {name: rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) * (3.0 if name in ("wq", "wk") else 1.0)
             for name in ("wq", "wk", "wv", "wo")}
    inits.update(split=np.array([0, 0, HEADS, HEAD_DIM], np.int64), merge=np.array([0, 0, HIDDEN], np.int64),
                 root=np.array(np.sqrt(HEAD_DIM), np.float32))
    nodes = []
    for role in "qkv":
        source = "y" if cross and role != "q" else "x"
        nodes += [helper.make_node("MatMul", [source, f"w{role}"], [f"{role}0"]),
                  helper.make_node("Reshape", [f"{role}0", "split"], [f"{role}1"]),
                  helper.make_node("Transpose", [f"{role}1"], [f"{role}2"], perm=[0, 2, 1, 3])]
    nodes += [helper.make_node("Transpose", ["k2"], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q2", "kt"], ["s0"]),
              helper.make_node("Div", ["s0", "root"], ["s1"]),
              helper.make_node("Add", ["s1", "mask"], ["s2"]),
              helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v2"], ["a0"]),
              helper.make_node("Transpose", ["a0"], ["a1"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["a1", "merge"], ["a2"]),
              helper.make_node("MatMul", ["a2", "wo"], ["out"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", HIDDEN])]
    if cross:
        inputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", HIDDEN]))
    inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, list(mask_shape)))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [helper.make_tensor(k, TensorProto.FLOAT if v.dtype == np.float32 else TensorProto.INT64,
                                                  v.shape, v.reshape(-1).tolist()) for k, v in inits.items()])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10))
    PassManager("cleanup", PassContext()).run(model)
    return model


def hand_feeds(batch: int = 2, sequence: int = 7, padded: int = 2, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    keep = np.ones((batch, 1, 1, sequence), bool)
    keep[0, ..., sequence - padded:] = False
    mask = np.broadcast_to(np.where(keep, 0.0, LOWEST), (batch, 1, sequence, sequence))
    return {"x": rng.standard_normal((batch, sequence, HIDDEN)).astype(np.float32),
            "mask": np.ascontiguousarray(mask, dtype=np.float32)}


def probe(path):
    """A copy of `_probe(path)`: the model is the caller's to change."""
    model, blocks, inputs = _probe(path)
    return eir.clone(model), blocks, inputs


@functools.lru_cache(maxsize=None)
def _probe(path):
    """The cleaned zoo model with Q/K weights x8 and every block's inputs and output exposed as graph
    outputs, its proven blocks, and inputs (batch 2, 16 tokens, the second row's last 4 padded)."""
    model = load_onnx(path)
    ctx = PassContext()
    PassManager("cleanup", ctx).run(model)
    blocks, unproven = trusted_blocks(model, ctx)
    assert blocks and unproven == 0
    values = _values_by_name(model)
    for block in blocks:
        for p in (block.q, block.k):  # one fused QKV weight is scaled column range by column range
            value = values[p.weight]
            array = constant_array(value).copy()
            columns = slice(*p.columns) if p.columns else slice(None)
            if p.weight_transposed:
                array[columns, :] *= 8
            else:
                array[:, columns] *= 8
            value.const_value = ir.tensor(array, name=value.name)
    for name in dict.fromkeys(n for block in blocks for n in block_inputs(block) + [block.output]):
        if not values[name].is_graph_output() and not values[name].is_graph_input():
            model.graph.outputs.append(values[name])
    return model, blocks, zoo.zoo_inputs(path.name.split("-")[0], path)


def block_feeds(block, outputs: dict, inputs: dict) -> dict[str, np.ndarray]:
    """What the block read in a run, from the run's outputs (exposed values) and the model inputs."""
    return {name: outputs[name] if name in outputs else inputs[name] for name in block_inputs(block)}


def additive(block, feeds: dict) -> np.ndarray | float:
    if block.mask_value is None:
        return 0.0
    mask = feeds[block.mask_value]
    return np.where(mask, 0.0, LOWEST) if block.mask_form == "boolean" else mask.astype(np.float64)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected.reshape(actual.shape)).max() / np.abs(expected).max())


# --- numpy reference ----------------------------------------------------------------------------------

def band(sequence: int, window: int, causal: bool, sinks: int = 0) -> np.ndarray:
    i, j = np.arange(sequence)[:, None], np.arange(sequence)[None, :]
    inside = ((i - j >= 0) & (i - j <= window)) if causal else np.abs(i - j) <= window
    inside |= (j < sinks) & ((j <= i) if causal else True)
    return np.where(inside, 0.0, LOWEST)


def banded_attention(block, values, feeds: dict, window: int, sinks: int = 0) -> np.ndarray:
    """canonical_attention with the band folded into the mask (Min: two lowest floats stay finite)."""
    sequence = feeds[block.q.input].shape[1]
    feeds = dict(feeds, band_mask=np.minimum(additive(block, feeds), band(sequence, window, "causal" in block.mask, sinks)))
    return canonical_attention(dataclasses.replace(block, mask_value="band_mask", mask_form="additive"), values, feeds)


# --- structure and the blocks left alone --------------------------------------------------------------

def test_chunked_structure_and_idempotence():
    model = hand_block()
    result = SlidingWindowAttentionPass(window=3)(model, PassContext())
    assert result.modified
    assert result.stats == {"blocks_replaced": 1, "causal_blocks": 0, "unproven": 0,
                            "skipped_unsupported_mask": 0, "skipped_cross_attention": 0}
    eir.verify(model)
    ops = eir.op_histogram(model)
    (softmax,) = [n for n in model.graph if n.op_type == "Softmax"]
    assert softmax.metadata_props == {FORM_KEY: "sliding-window:3"}
    # Q, K, V and the key mask padded at run time; 4 projections, scores and ·V; one band.
    # Chunk neighbourhoods of K, V and the key mask, and the padded queries dropped, by Gather.
    assert (ops["Pad"], ops["MatMul"], ops["Min"], ops["Gather"], ops["Softmax"]) == (4, 6, 1, 4, 1)
    band_values = [v for v in model.graph.initializers.values() if v.const_value is not None and v.const_value.shape == (3, 9)]
    assert len(band_values) == 1
    again = SlidingWindowAttentionPass(window=3)(model, PassContext())
    assert not again.modified and again.stats["blocks_replaced"] == 0

    model = hand_block()  # sinks: scored beside the neighbourhood, one more ·V MatMul
    SlidingWindowAttentionPass(window=3, sinks=1)(model, PassContext())
    ops = eir.op_histogram(model)
    (softmax,) = [n for n in model.graph if n.op_type == "Softmax"]
    assert softmax.metadata_props == {FORM_KEY: "sliding-window:3+sinks:1"}
    assert (ops["MatMul"], ops["Gather"]) == (8, 7)  # sink keys, values and key mask gathered


@pytest.mark.parametrize("sinks", [0, 2])
@pytest.mark.parametrize("sequence", [2, 6, 7, 11])
def test_hand_block_is_banded_attention(sequence, sinks):
    before = hand_block()
    feeds = hand_feeds(sequence=sequence, padded=1 if sequence < 4 else 2)
    after = eir.clone(before)
    SlidingWindowAttentionPass(window=3, sinks=sinks)(after, PassContext())
    (block,) = trusted_blocks(before, PassContext())[0]
    expected = banded_attention(block, _values_by_name(before), feeds, 3, sinks)
    assert relative_error(run_model(after, feeds, optimize=False)["out"], expected) < 1e-5
    exact = run_model(before, feeds, optimize=False)["out"]
    if sequence > 4:  # the window must matter, or this test proves nothing
        assert relative_error(exact, expected) > 0.05


def test_unproven_block_is_left_alone():
    model = hand_block()
    ctx = PassContext()
    for block in trusted_blocks(model, ctx)[0]:  # the records the pass will read
        block.verified = False
    result = SlidingWindowAttentionPass(window=3)(model, ctx)
    assert not result.modified and result.stats["unproven"] == 1


def test_cross_attention_is_left_alone():
    result = SlidingWindowAttentionPass(window=3)(hand_block(mask_shape=("B", 1, "S", "T"), cross=True), PassContext())
    assert not result.modified and result.stats["skipped_cross_attention"] == 1


def test_mask_broadcast_over_keys_is_left_alone():
    result = SlidingWindowAttentionPass(window=3)(hand_block(mask_shape=("B", 1, "S", 1)), PassContext())
    assert not result.modified and result.stats["skipped_unsupported_mask"] == 1


def test_window_must_be_positive():
    with pytest.raises(UserError, match="window=0"):
        SlidingWindowAttentionPass(window=0)(hand_block(), PassContext())
    with pytest.raises(UserError, match="sinks=4"):
        SlidingWindowAttentionPass(window=3, sinks=4)(hand_block(), PassContext())
    assert SlidingWindowAttentionPass(window="5").spec() == "sliding-window-attention{window=5}"


# --- the zoo ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_zoo_blocks(zoo_model, arch, exporter):
    model, blocks, inputs = probe(zoo_model(arch, exporter))
    exact = run_model(model, inputs, optimize=False)
    values = _values_by_name(model)  # the weights: the pass replaces a fused QKV weight by its parts

    wide = eir.clone(model)  # a window wider than the 16 tokens is exact attention
    result = SlidingWindowAttentionPass(window=16)(wide, PassContext())
    assert result.stats["blocks_replaced"] == len(blocks)
    assert result.stats["causal_blocks"] == (len(blocks) if arch in ("gpt2", "llama") else 0)
    outputs = run_model(wide, inputs, optimize=False)
    for block in blocks:
        assert relative_error(outputs[block.output], exact[block.output]) < 1e-5, f"block {block.layer}"

    narrow = eir.clone(model)  # 16 tokens in chunks of 5: one padded at run time; 2 sinks in the first
    sinks = 2 if exporter == "dynamo" else 0
    SlidingWindowAttentionPass(window=5, sinks=sinks)(narrow, PassContext())
    outputs = run_model(narrow, inputs, optimize=False)
    for block in blocks:
        expected = banded_attention(block, values, block_feeds(block, outputs, inputs), 5, sinks)
        assert relative_error(outputs[block.output], expected) < 1e-5, f"block {block.layer}"
        assert relative_error(exact[block.output], expected) > 0.05, f"block {block.layer}: the window changed nothing"
    if (arch, exporter) == ("llama", "dynamo"):  # find_attention meets the rebuilt blocks and leaves them be
        assert not SlidingWindowAttentionPass(window=5, sinks=2)(narrow, PassContext()).modified


def test_shapes_inferred_after_the_pass_are_true(zoo_model):
    # Cleanup after the pass trusts the inferred shapes (and onnxruntime trusts their names): a padded
    # length labelled `sequence` would let it drop a Pad or reuse a buffer of the wrong size.
    path = zoo_model("bert", "dynamo")
    model = load_onnx(path)
    PassManager("cleanup", PassContext()).run(model)
    SlidingWindowAttentionPass(window=5, sinks=1)(model, PassContext())
    cleaned = eir.clone(model)
    PassManager("cleanup", PassContext()).run(cleaned)
    inputs = zoo.zoo_inputs("bert", path, seq_len=13)
    expected, actual = (run_model(m, inputs, optimize=False) for m in (model, cleaned))
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-6)


def test_padded_tokens_are_invisible(zoo_model):
    # Padded keys get the lowest bias: what the padded positions hold cannot reach the real ones.
    path = zoo_model("bert", "torchscript")
    model = load_onnx(path)
    PassManager("cleanup", PassContext()).run(model)
    SlidingWindowAttentionPass(window=3)(model, PassContext())
    inputs = zoo.zoo_inputs("bert", path)
    changed = dict(inputs, input_ids=inputs["input_ids"].copy())
    changed["input_ids"][1, -4:] = (changed["input_ids"][1, -4:] + 7) % 256
    (name,) = [v.name for v in model.graph.outputs]
    a, b = (run_model(model, feeds, optimize=False)[name] for feeds in (inputs, changed))
    np.testing.assert_allclose(a[:, :12], b[:, :12], rtol=1e-5, atol=1e-5)
    assert np.abs(a[1, 12:] - b[1, 12:]).max() > 1e-3
