"""sliding-window-attention: the chunked form's structure, the blocks it leaves alone, and its numbers:
exact attention when the window covers the sequence, banded attention (numpy) when it does not.

The helpers shared with test_linear_attention live in window_helpers. In the tiny zoo models attention
is about 1% of the final output, so the checks read each block's own output (exposed as a graph output)
and scale the Q and K weights up: with near-uniform softmax a wrong mask or scale would pass unnoticed.
"""

import dataclasses

import numpy as np
import pytest
import zoo
from window_helpers import LOWEST, additive, block_feeds, hand_block, hand_feeds, probe, relative_error

from edgec import ir as eir
from edgec.analysis.attention import _values_by_name, canonical_attention
from edgec.errors import UserError
from edgec.frontends.onnx import load_onnx
from edgec.passes.blocks import FORM_KEY, trusted_blocks
from edgec.passes.core import PassContext
from edgec.passes.manager import PassManager
from edgec.passes.replace import SlidingWindowAttentionPass
from edgec.verify import run_model

ARCHS = ("bert", "gpt2", "llama", "vit", "distilbert")


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
