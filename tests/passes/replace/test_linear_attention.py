"""linear-attention: its structure, the blocks it leaves alone, and its numbers against a numpy reference
of the formula (quadratic form, not the associative one the pass builds), on each block's own output."""

import numpy as np
import pytest
import zoo
from window_helpers import additive, block_feeds, hand_block, hand_feeds, probe, relative_error

from edgec import ir as eir
from edgec.analysis.attention import _values_by_name, _weights
from edgec.frontends.onnx import load_onnx
from edgec.passes.blocks import FORM_KEY, trusted_blocks
from edgec.passes.core import PassContext
from edgec.passes.manager import PassManager
from edgec.passes.replace import LinearAttentionPass
from edgec.verify import run_model

ARCHS = ("bert", "gpt2", "llama", "vit", "distilbert")


def linear_attention(block, values, feeds: dict) -> np.ndarray:
    """The block with softmax(q·kᵀ)·v replaced by Σ_j φ(q_i)·φ(k_j) w_j v_j / Σ_j φ(q_i)·φ(k_j) w_j, in float64."""

    def project(p, x):
        w, b = _weights(values, p)
        y = x.astype(np.float64) @ w
        return y + b if b is not None else y

    def split(y, heads):
        return np.moveaxis(y.reshape(*y.shape[:-1], heads, block.head_dim), -2, -3)

    def phi(x):
        return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))

    q = split(project(block.q, feeds[block.q.input]), block.heads)
    k = split(project(block.k, feeds[block.k.input]), block.kv_heads)
    v = split(project(block.v, feeds[block.v.input]), block.kv_heads)
    if block.rotary:
        cos, sin = feeds[block.rotary_cos].astype(np.float64), feeds[block.rotary_sin].astype(np.float64)
        half = block.head_dim // 2
        q, k = (t * cos + np.concatenate([-t[..., half:], t[..., :half]], axis=-1) * sin for t in (q, k))
    groups = block.heads // block.kv_heads
    k, v = np.repeat(k, groups, axis=-3), np.repeat(v, groups, axis=-3)
    similarity = phi(q) @ np.swapaxes(phi(k), -1, -2)  # [B, H, S, T]
    bias = np.broadcast_to(additive(block, feeds), (*similarity.shape[:-2], *similarity.shape[-2:]))
    similarity = similarity * np.exp(bias[..., -1:, :])  # each key weighted by its bias in the last row
    if "causal" in block.mask:
        similarity = np.tril(similarity)
    attended = (similarity @ v) / similarity.sum(axis=-1, keepdims=True)
    merged = np.moveaxis(attended, -3, -2)
    return project(block.o, merged.reshape(*merged.shape[:-2], -1))


def test_structure_and_idempotence():
    model = hand_block()
    result = LinearAttentionPass()(model, PassContext())
    assert result.stats == {"blocks_replaced": 1, "causal_blocks": 0, "unproven": 0,
                            "skipped_unsupported_mask": 0, "skipped_causal": 0}
    eir.verify(model)
    ops = eir.op_histogram(model)
    assert (ops["Softmax"], ops["Elu"], ops["Exp"], ops["CumSum"], ops["MatMul"]) == (0, 2, 1, 0, 6)
    (div,) = [n for n in model.graph if n.op_type == "Div"]
    assert div.metadata_props == {FORM_KEY: "linear"}
    assert not LinearAttentionPass()(model, PassContext()).modified


def test_hand_block_is_linear_attention():
    before = hand_block()
    feeds = hand_feeds()
    (block,) = trusted_blocks(before, PassContext())[0]
    after = eir.clone(before)
    LinearAttentionPass()(after, PassContext())
    expected = linear_attention(block, _values_by_name(before), feeds)
    assert relative_error(run_model(after, feeds, optimize=False)["out"], expected) < 1e-5


def test_unproven_and_unsupported_blocks_are_left_alone():
    model = hand_block()
    ctx = PassContext()
    for block in trusted_blocks(model, ctx)[0]:
        block.verified = False
    assert LinearAttentionPass()(model, ctx).stats["unproven"] == 1
    result = LinearAttentionPass()(hand_block(mask_shape=("B", 1, "S", 1)), PassContext())
    assert not result.modified and result.stats["skipped_unsupported_mask"] == 1


def test_cross_attention_is_rebuilt():
    # Linear attention has no positions: K/V from another sequence is fine.
    before = hand_block(mask_shape=("B", 1, "S", "T"), cross=True)
    rng = np.random.default_rng(2)
    feeds = {"x": rng.standard_normal((2, 5, 8)).astype(np.float32), "y": rng.standard_normal((2, 7, 8)).astype(np.float32),
             "mask": np.zeros((2, 1, 5, 7), np.float32)}
    feeds["mask"][1, ..., 5:] = np.finfo(np.float32).min
    (block,) = trusted_blocks(before, PassContext())[0]
    after = eir.clone(before)
    assert LinearAttentionPass()(after, PassContext()).stats["blocks_replaced"] == 1
    expected = linear_attention(block, _values_by_name(before), feeds)
    assert relative_error(run_model(after, feeds, optimize=False)["out"], expected) < 1e-5


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_zoo_blocks(zoo_model, arch, exporter):
    original, blocks, inputs = probe(zoo_model(arch, exporter))
    values = _values_by_name(original)  # the weights: the pass replaces a fused QKV weight by its parts
    exact = run_model(original, inputs, optimize=False)
    model = eir.clone(original)
    result = LinearAttentionPass()(model, PassContext())
    causal = arch in ("gpt2", "llama")
    assert result.stats["blocks_replaced"] == len(blocks)
    assert result.stats["causal_blocks"] == (len(blocks) if causal else 0)
    assert ("CumSum" in eir.op_histogram(model)) == causal
    outputs = run_model(model, inputs, optimize=False)
    for block in blocks:
        expected = linear_attention(block, values, block_feeds(block, outputs, inputs))
        assert relative_error(outputs[block.output], expected) < 1e-5, f"block {block.layer}"
        assert relative_error(exact[block.output], expected) > 0.05, f"block {block.layer}: softmax and linear agree?"
    if (arch, exporter) == ("llama", "dynamo"):
        assert not LinearAttentionPass()(model, PassContext()).modified


def test_causal_blocks_can_be_left_alone(zoo_model):
    model = load_onnx(zoo_model("gpt2", "torchscript"))
    PassManager("cleanup", PassContext()).run(model)
    result = LinearAttentionPass(causal=False)(model, PassContext())
    assert not result.modified and result.stats["skipped_causal"] == 2
    assert LinearAttentionPass(causal="false").spec() == "linear-attention{causal=false}"
