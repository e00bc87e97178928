"""remove-attention-heads: the rebuilt block's weights and head count, exact equivalence with the heads'
context zeroed, reconstruction that pays off, the blocks and options left alone or refused, the
ledger that makes it idempotent, and every zoo architecture."""

import numpy as np
import onnx_ir as ir
import pytest
import zoo
from prune_helpers import (
    ARCHS, HEAD_DIM, HIDDEN, attention_feeds, attention_layer, attention_reference, attention_weights, calibrated,
    cleaned, errors_with_and_without_refit, head_columns, initializer,
)

from edgec import ir as eir
from edgec.analysis.attention import _values_by_name
from edgec.errors import UserError
from edgec.ir.constants import constant_array
from edgec.passes import blocks as blk
from edgec.passes.core import PassContext
from edgec.passes.prune import RemoveAttentionHeadsPass
from edgec.passes.prune.common import PRUNING_KEY
from edgec.verify import run_model

ATOL = 1e-5


def blocks_of(model):
    return blk.trusted_blocks(model, PassContext())[0]


def reshape_targets(model) -> list[list[int]]:
    return sorted(constant_array(n.inputs[1]).tolist() for n in model.graph if n.op_type == "Reshape"
                  and constant_array(n.inputs[1]) is not None)


# --- golden: the rebuilt block ------------------------------------------------------------------------

def test_golden_heads_1_and_3_removed():
    model = attention_layer()
    result = RemoveAttentionHeadsPass(heads="0.1:0.3", reconstruct=False)(model, PassContext())
    assert result.modified
    assert result.stats == {"heads_removed": 2, "blocks_pruned": 1, "blocks_emptied": 0, "unproven": 0,
                            "skipped_per_head_mask": 0}
    eir.verify(model)
    (block,) = blocks_of(model)
    assert (block.heads, block.kv_heads, block.head_dim) == (2, 2, HEAD_DIM)
    w, values, cols = attention_weights(), _values_by_name(model), head_columns([0, 2])
    assert cols.tolist() == [0, 1, 4, 5]
    for r, p in zip("qkv", (block.q, block.k, block.v)):
        np.testing.assert_array_equal(blk.weight(values, p), w[f"w{r}"][:, cols])  # the kept heads' columns
        np.testing.assert_array_equal(blk.bias(values, p), w[f"b{r}"][cols])
    np.testing.assert_array_equal(blk.weight(values, block.o), w["wo"][cols])  # ... and O's rows
    np.testing.assert_array_equal(blk.bias(values, block.o), w["bo"])
    # Q, K, V split into 2 heads of 2; the heads merge to 4 features.
    assert reshape_targets(model) == [[0, 0, 2, 2]] * 3 + [[0, 0, 4]]
    ops = eir.op_histogram(model)
    assert (ops["Softmax"], ops["MatMul"]) == (1, 6)
    assert block.scale == pytest.approx(1 / np.sqrt(HEAD_DIM))
    assert json_ledger(model) == {"total": 4, "removed": 2, "specs": ["0.1:0.3"]}


def json_ledger(model):
    import json

    return json.loads(model.metadata_props["edgec.prune.heads"])


@pytest.mark.parametrize("heads", [(1, 3), (0,), (2,), (0, 1, 2)])
def test_equals_heads_context_zeroed(heads):
    model = attention_layer()
    spec = ":".join(f"0.{h}" for h in heads)
    RemoveAttentionHeadsPass(heads=spec, reconstruct=False)(model, PassContext())
    feeds = attention_feeds()
    out = run_model(model, feeds, optimize=False)["y"]
    expected = attention_reference(feeds, heads)
    np.testing.assert_allclose(out, expected, atol=ATOL, rtol=ATOL)
    # The check can fail: the model with every head differs from the pruned one by far more.
    assert np.abs(attention_reference(feeds) - expected).max() > 100 * ATOL


def test_all_heads_removed_is_a_pass_through():
    model = attention_layer()
    result = RemoveAttentionHeadsPass(heads="0.0:0.1:0.2:0.3", reconstruct=False)(model, PassContext())
    assert result.stats["blocks_emptied"] == 1 and result.stats["heads_removed"] == 4
    eir.verify(model)
    ops = eir.op_histogram(model)
    assert ops["Softmax"] == 0 and ops["MatMul"] == 0 and not blocks_of(model)
    feeds = attention_feeds(sequence=6)
    out = run_model(model, feeds, optimize=False)["y"]
    x = feeds["x"].astype(np.float64)
    np.testing.assert_allclose(out, x + attention_weights()["bo"], atol=ATOL)  # input + the O bias
    np.testing.assert_allclose(out, attention_reference(feeds, (0, 1, 2, 3)), atol=ATOL)


def test_all_heads_removed_with_reconstruction_keeps_the_mean():
    model = attention_layer(mask_shape=None)
    calibration = attention_feeds(batch=16, sequence=6, seed=3, mask=False)
    ctx = calibrated(calibration)
    RemoveAttentionHeadsPass(ratio=1.0)(model, ctx)
    eir.verify(model)
    assert not blocks_of(model)
    # The refit constant is the mean of the original block's output over the calibration tokens.
    block_out = attention_reference(calibration) - calibration["x"]
    out = run_model(model, calibration, optimize=False)["y"] - calibration["x"]
    np.testing.assert_allclose(out[0, 0], block_out.reshape(-1, HIDDEN).mean(0), atol=1e-4)
    assert ctx.options[PRUNING_KEY]["heads"] == [{"layer": 0, "heads": 4, "removed": 4, "kept": 0,
                                                  "removed_heads": [0, 1, 2, 3], "reconstructed": True}]


# --- left alone ---------------------------------------------------------------------------------------

def test_softmax_that_is_not_attention_is_left_alone():
    from prune_helpers import _model
    from onnx import TensorProto, helper

    nodes = [helper.make_node("MatMul", ["x", "w"], ["s"]), helper.make_node("Softmax", ["s"], ["y"], axis=-1)]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", HIDDEN])],
                   {"w": np.ones((HIDDEN, 4), np.float32)})
    before = eir.structure_key(model)
    result = RemoveAttentionHeadsPass(ratio=0.5)(model, PassContext())  # no blocks: no data needed either
    assert not result.modified and result.stats["heads_removed"] == 0
    assert eir.structure_key(model) == before


def test_ratio_zero_is_a_no_op():
    model = attention_layer()
    before = eir.structure_key(model)
    result = RemoveAttentionHeadsPass(ratio=0.0)(model, PassContext())
    assert not result.modified and eir.structure_key(model) == before


def test_per_head_mask_is_skipped():
    model = attention_layer(mask_shape=("B", 4, "S", "S"))
    before = eir.structure_key(model)
    feeds = attention_feeds(batch=4, mask=False)
    feeds["mask"] = np.zeros((4, 4, 5, 5), np.float32)
    result = RemoveAttentionHeadsPass(ratio=0.5)(model, calibrated(feeds))
    assert not result.modified
    assert result.stats["skipped_per_head_mask"] == 1 and result.stats["heads_removed"] == 0
    assert eir.structure_key(model) == before
    with pytest.raises(UserError, match="names layer 0, whose mask has a head axis"):
        RemoveAttentionHeadsPass(heads="0.1", reconstruct=False)(model, PassContext())


# --- bad options --------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    (dict(ratio=1.5), "ratio=1.5 is not a share between 0 and 1"),
    (dict(ratio=-0.1), "is not a share between 0 and 1"),
    (dict(heads="notalayer"), "'notalayer' is not LAYER.HEAD"),
    (dict(heads="0.x"), "is not LAYER.HEAD"),
    (dict(heads="3.1"), "names layer 3, but the model has 1 attention layers"),
    (dict(heads="0.4"), "names a head past layer 0's 4"),
    (dict(allocation="auto"), "allocation='auto' is not one of global, even"),
])
def test_bad_options(options, message):
    model = attention_layer()
    with pytest.raises(UserError, match=message):
        RemoveAttentionHeadsPass(reconstruct=False, **options)(model, PassContext())


def test_ratio_without_calibration_data_is_an_error():
    with pytest.raises(UserError, match="has none"):
        RemoveAttentionHeadsPass(ratio=0.5)(attention_layer(), PassContext())
    with pytest.raises(UserError, match="has none"):  # a refit needs data even for explicit heads
        RemoveAttentionHeadsPass(heads="0.1", reconstruct=True)(attention_layer(), PassContext())


# --- idempotence and the ledger -----------------------------------------------------------------------

def test_second_run_is_a_no_op_and_a_larger_ratio_removes_the_difference():
    model = attention_layer(mask_shape=None)
    ctx = calibrated(attention_feeds(batch=8, mask=False))
    first = RemoveAttentionHeadsPass(ratio=0.25)(model, ctx)
    assert first.modified and first.stats["heads_removed"] == 1
    snapshot = eir.structure_key(model)
    again = RemoveAttentionHeadsPass(ratio=0.25)(model, ctx)
    assert not again.modified and eir.structure_key(model) == snapshot
    more = RemoveAttentionHeadsPass(ratio=0.5)(model, ctx)
    assert more.modified and more.stats["heads_removed"] == 1  # 2 of the original 4, one already gone
    assert [b.heads for b in blocks_of(model)] == [2]
    assert json_ledger(model) == {"total": 4, "removed": 2, "specs": []}
    assert not RemoveAttentionHeadsPass(ratio=0.5)(model, ctx).modified
    assert [r["removed"] for r in ctx.options[PRUNING_KEY]["heads"]] == [1, 1]


def test_explicit_heads_twice_is_a_no_op():
    model = attention_layer()
    assert RemoveAttentionHeadsPass(heads="0.1:0.3", reconstruct=False)(model, PassContext()).modified
    snapshot = eir.structure_key(model)
    assert not RemoveAttentionHeadsPass(heads="0.1:0.3", reconstruct=False)(model, PassContext()).modified
    assert eir.structure_key(model) == snapshot


# --- the zoo ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_reconstruction_helps_on_bert(zoo_model, exporter):
    errors = errors_with_and_without_refit(lambda **kw: RemoveAttentionHeadsPass(ratio=0.5, **kw), zoo_model("bert", exporter),
                                           "heads_removed", 4)
    assert 0 < errors[True] < 0.5 * errors[False], errors  # about 4x smaller with the refit


@pytest.mark.parametrize("reconstruct", [True, False])
def test_even_allocation_takes_the_same_heads_from_every_layer(zoo_model, reconstruct):
    path = zoo_model("bert", "dynamo")
    model = cleaned(path)
    feeds = zoo.zoo_inputs("bert", path, batch=8, seed=1)
    ctx = calibrated(feeds)
    blocks = sorted(blk.trusted_blocks(model, ctx)[0], key=lambda b: b.layer)
    before = [b.heads for b in blocks]
    assert len(before) > 1 and len(set(before)) == 1
    last = _values_by_name(model)[blocks[-1].o.weight]  # the last layer's heads count 4x more: a global ranking spares them
    last.const_value = ir.tensor(4 * constant_array(last))
    globally = eir.clone(model)
    RemoveAttentionHeadsPass(ratio=0.5, reconstruct=reconstruct)(globally, calibrated(feeds))
    assert [b.heads for b in PassContext().analyses.get("attention", globally)] != [h - h // 2 for h in before]
    result = RemoveAttentionHeadsPass(ratio=0.5, reconstruct=reconstruct, allocation="even")(model, ctx)
    assert result.stats["heads_removed"] == sum(before) // 2
    assert [b.heads for b in PassContext().analyses.get("attention", model)] == [h - h // 2 for h in before]


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_zoo_prunes_half_the_heads(zoo_model, arch, exporter):
    path = zoo_model(arch, exporter)
    model = cleaned(path)
    ctx = calibrated(zoo.zoo_inputs(arch, path, batch=4, seed=1))
    before, unproven = blk.trusted_blocks(model, ctx)  # proven once: the pass reads the same records
    assert before and unproven == 0, f"{arch}: no attention blocks found"
    total = sum(b.heads for b in before)
    feeds = zoo.zoo_inputs(arch, path)
    expected_shape = next(iter(run_model(model, feeds).values())).shape
    result = RemoveAttentionHeadsPass(ratio=0.5)(model, ctx)
    assert result.modified and result.stats["heads_removed"] == total // 2
    eir.verify(model)
    assert next(iter(run_model(model, feeds).values())).shape == expected_shape
    after = list(PassContext().analyses.get("attention", model))  # the rebuilt blocks, analysed afresh
    assert sum(b.heads for b in after) == total - total // 2
    (group,) = {b.heads // b.kv_heads for b in before}
    for block in after:  # whole key/value groups went: the query heads per kv head are as before
        assert block.heads == group * block.kv_heads
    if arch == "llama":  # 4 query heads on 2 kv heads: 2 of the 4 kv groups go, the rest keep 2 heads each
        assert all((b.heads, b.kv_heads) == (4, 2) for b in before)
        assert sum(b.kv_heads for b in after) == 2 and all(b.heads == 2 * b.kv_heads for b in after)


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_llama_removes_whole_kv_groups(zoo_model, exporter):
    """Head 1 shares its key/value head with head 0: both go, and the model computes what the original
    does with those two heads' O rows zeroed."""
    path = zoo_model("llama", exporter)
    model = cleaned(path)
    ctx = PassContext()
    before = blocks_of(model)
    zeroed = eir.clone(model)
    values = _values_by_name(zeroed)
    o, d = before[0].o, before[0].head_dim
    w = constant_array(values[o.weight]).copy()
    if o.weight_transposed:
        w[:, :2 * d] = 0
    else:
        w[:2 * d] = 0
    values[o.weight].const_value = ir.tensor(w, name=o.weight)
    result = RemoveAttentionHeadsPass(heads="0.1", reconstruct=False)(model, ctx)
    assert result.stats["heads_removed"] == 2
    assert ctx.options[PRUNING_KEY]["heads"][0]["removed_heads"] == [0, 1]
    eir.verify(model)
    assert [(b.heads, b.kv_heads) for b in blocks_of(model)] == [(2, 1), (4, 2)]
    feeds = zoo.zoo_inputs("llama", path)
    out, expected = (next(iter(run_model(m, feeds).values())) for m in (model, zeroed))
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)
    assert np.abs(next(iter(run_model(cleaned(path), feeds).values())) - expected).max() > 1e-2  # the check can fail


def test_albert_shared_weights_are_forked(zoo_model):
    path = zoo_model("albert", "torchscript")
    model = cleaned(path)
    before = blocks_of(model)
    assert before[0].q.weight == before[1].q.weight  # one set of weights for both layers
    shared = {p: initializer(model, getattr(before[1], p).weight).copy() for p in "qkvo"}
    RemoveAttentionHeadsPass(heads="0.1:0.2", reconstruct=False)(model, PassContext())
    eir.verify(model)
    after = blocks_of(model)
    assert [b.heads for b in after] == [2, 4]
    values = _values_by_name(model)
    for p in "qkvo":  # layer 1 reads the original weights, unchanged
        np.testing.assert_array_equal(constant_array(values[getattr(after[1], p).weight]), shared[p])
    assert blk.weight(values, after[0].q).shape == (32, 16)  # layer 0: hidden 32 -> 2 heads of 8
    feeds = zoo.zoo_inputs("albert", path)
    assert np.isfinite(next(iter(run_model(model, feeds).values()))).all()
