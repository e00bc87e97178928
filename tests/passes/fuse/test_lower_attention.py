import numpy as np
import onnx_ir as ir
import pytest
from attention_blocks import (
    ARCHS, B, HEADS, MASK, MERGE, SPLIT, W, X, _init, exported_block, feeds, head_projections, load_onnx_model,
    sharpen_and_expose,
)
from onnx import TensorProto, helper

from edgec import ir as eir
from edgec.analysis.attention import find_attention
from edgec.frontends.onnx import load_onnx
from edgec.passes.core import DebugCounter, PassContext
from edgec.passes.fuse.lower_attention import LowerAttentionPass
from edgec.passes.manager import PassManager
from edgec.testing import assert_numerically_equal, check_pass, run_pass


# --- golden ----------------------------------------------------------------------------------

def test_onnxruntime_form_is_one_packed_attention():
    before = exported_block()
    wqkv = np.concatenate([W["wq"], W["wk"], W["wv"]], axis=1)
    bqkv = np.concatenate([B["bq"], B["bk"], B["bv"]])
    graph = helper.make_graph(
        [helper.make_node("Attention", ["x", "wqkv", "bqkv", "", "", "mask"], ["a"], domain="com.microsoft",
                          num_heads=HEADS, scale=0.5),
         helper.make_node("MatMul", ["a", "wo"], ["o0"]),
         helper.make_node("Add", ["o0", "bo"], ["y"])],
        "g", [X, MASK], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_init("wqkv", wqkv), _init("bqkv", bqkv), _init("wo", W["wo"]), _init("bo", B["bo"])])
    expected = ir.from_proto(helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)], ir_version=10))
    result = check_pass(LowerAttentionPass(form="onnxruntime"), before, expected, feeds=feeds())
    assert result.stats == {"blocks_lowered": 1, "packed_attention": 1, "unproven": 0, "unfit": 0}
    assert result.model.opset_imports["com.microsoft"] == 1


def test_decomposed_form_is_canonical():
    before = exported_block()
    nodes = head_projections()
    nodes += [
        helper.make_node("Transpose", ["k3"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q3", "kt"], ["s0"]),
        helper.make_node("Add", ["s0", "mask"], ["s1"]),
        helper.make_node("Softmax", ["s1"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v3"], ["a0"]),
        helper.make_node("Transpose", ["a0"], ["a1"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["a1", "merge"], ["a2"]),
        helper.make_node("MatMul", ["a2", "wo"], ["o0"]),
        helper.make_node("Add", ["o0", "bo"], ["y"]),
    ]
    # The 1/sqrt(d) scale (0.5) is in Q's weights and bias: the scores need no Mul.
    inits = dict(W, **B, split=SPLIT, merge=MERGE)
    inits["wq"], inits["bq"] = W["wq"] * np.float32(0.5), B["bq"] * np.float32(0.5)
    graph = helper.make_graph(nodes, "g", [X, MASK], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [_init(k, v) for k, v in inits.items()])
    expected = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10))
    # The three split shapes are one constant in the expected graph and three equal ones after the
    # pass; structure_key compares constants by content, so both read the same.
    result = check_pass(LowerAttentionPass(form="decomposed"), before, expected, feeds=feeds())
    (softmax,) = [n for n in result.model.graph if n.op_type == "Softmax"]
    assert softmax.metadata_props == {"edgec.attention_form": "decomposed"}


def test_sdpa_form_is_one_call_of_a_model_function():
    before = exported_block()
    result = run_pass(LowerAttentionPass(form="sdpa"), before)
    eir.verify(result.model)
    (call,) = [n for n in result.model.graph if n.domain == "ai.edgec"]
    assert call.op_type == "ScaledDotProductAttention" and len(call.inputs) == 4
    assert result.model.opset_imports["ai.edgec"] == 1
    body = result.model.functions[("ai.edgec", "ScaledDotProductAttention", "")]
    assert [n.op_type for n in body] == ["Transpose", "MatMul", "Add", "Softmax", "MatMul"]
    assert not any(n.op_type == "Softmax" for n in result.model.graph)
    assert_numerically_equal(before, result.model, feeds(), rtol=1e-5, atol=1e-5)
    assert not LowerAttentionPass(form="sdpa")(result.model, PassContext()).modified


@pytest.mark.parametrize("form", ["onnxruntime", "decomposed", "sdpa"])
def test_boolean_mask_becomes_additive(form):
    before = exported_block("boolean")
    result = run_pass(LowerAttentionPass(form=form), before)
    assert result.stats["blocks_lowered"] == 1
    assert [n.op_type for n in result.model.graph if n.op_type == "Where"] == ["Where"]  # keep ? 0 : lowest
    assert_numerically_equal(before, result.model, feeds("boolean"), rtol=1e-5, atol=1e-5)


# --- near-misses ------------------------------------------------------------------------------

def test_where_that_does_not_mask_is_left_alone():
    # Where(keep, scores, 0) sets hidden scores to 0, which still weighs them: not a mask.
    before = exported_block("boolean", fill=0.0)
    assert find_attention(before).blocks == []
    check_pass(LowerAttentionPass(form="onnxruntime"), before, feeds=feeds("boolean"))


def test_softmax_that_is_not_attention_is_left_alone():
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["l"]), helper.make_node("Softmax", ["l"], ["y"], axis=-1)],
        "g", [X], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [_init("w", W["wq"])])
    before = load_onnx_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10))
    check_pass(LowerAttentionPass(form="onnxruntime"), before, feeds={"x": feeds()["x"]})


def test_debug_counter_stops_after_n_blocks(zoo_model):
    model = load_onnx(zoo_model("bert", "dynamo"))
    PassManager("cleanup", PassContext()).run(model)
    result = LowerAttentionPass(form="onnxruntime")(model, PassContext(counter=DebugCounter({"lower-attention": 1})))
    assert result.stats["blocks_lowered"] == 1
    assert len(find_attention(model).blocks) == 1


# --- every architecture, both exporters --------------------------------------------------------

@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("form", ["onnxruntime", "decomposed", "sdpa"])
def test_zoo_blocks_lowered_exactly(zoo_model, arch, exporter, form):
    import zoo

    model = load_onnx(zoo_model(arch, exporter))
    PassManager("cleanup", PassContext()).run(model)
    sharpen_and_expose(model)
    blocks = find_attention(model).blocks
    before = eir.clone(model)
    result = run_pass(LowerAttentionPass(form=form), before)
    eir.verify(result.model)
    assert result.stats["blocks_lowered"] == len(blocks) > 0
    assert result.stats["unproven"] == 0
    if form == "onnxruntime":
        # Packed Attention for every block but grouped-query/rotary (llama) and MobileBERT's
        # bottleneck, whose V reads the layer input while Q and K read the bottleneck.
        packed = 0 if arch in ("llama", "mobilebert") else len(blocks)
        assert result.stats["packed_attention"] == packed
        assert not any(n.op_type == "Softmax" for n in result.model.graph)
    inputs = zoo.zoo_inputs(arch, zoo_model(arch, exporter))
    assert_numerically_equal(before, result.model, inputs, rtol=1e-4, atol=1e-5)
    again = LowerAttentionPass(form=form)(result.model, PassContext())
    assert not again.modified
