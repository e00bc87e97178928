import numpy as np
import onnx_ir as ir
import pytest
from attention_blocks import ARCHS, B, MASK, MERGE, SPLIT, W, X, _init, exported_block, feeds, sharpen_and_expose
from onnx import TensorProto, helper

from edgec import ir as eir
from edgec.analysis.attention import find_attention
from edgec.frontends.onnx import load_onnx
from edgec.passes.core import PassContext
from edgec.passes.fuse.pack_qkv import PackQkvPass
from edgec.passes.manager import PassManager
from edgec.testing import assert_numerically_equal, check_pass, run_pass


def test_three_projections_become_one_matmul_and_a_split():
    before = exported_block()
    nodes = [
        helper.make_node("MatMul", ["x", "wqkv"], ["p0"]),
        helper.make_node("Add", ["p0", "bqkv"], ["p1"]),
        helper.make_node("Split", ["p1", "widths"], ["q1", "k1", "v1"], axis=-1),
    ]
    nodes += [  # as cleanup left them: K's two transposes are one
        helper.make_node("Reshape", ["q1", "split"], ["q2"]),
        helper.make_node("Transpose", ["q2"], ["q3"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["k1", "split"], ["k2"]),
        helper.make_node("Reshape", ["v1", "split"], ["v2"]),
        helper.make_node("Transpose", ["v2"], ["v3"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k2"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["q3", "kt"], ["s0"]),
        helper.make_node("Div", ["s0", "root"], ["s1"]),
        helper.make_node("Add", ["s1", "mask"], ["s2"]),
        helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v3"], ["a0"]),
        helper.make_node("Transpose", ["a0"], ["a1"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["a1", "merge"], ["a2"]),
        helper.make_node("MatMul", ["a2", "wo"], ["o0"]),
        helper.make_node("Add", ["o0", "bo"], ["y"]),
    ]
    inits = {
        "wqkv": np.concatenate([W["wq"], W["wk"], W["wv"]], axis=1),
        "bqkv": np.concatenate([B["bq"], B["bk"], B["bv"]]),
        "widths": np.array([8, 8, 8], np.int64), "split": SPLIT, "root": np.array(2.0, np.float32),
        "merge": MERGE, "wo": W["wo"], "bo": B["bo"],
    }
    graph = helper.make_graph(nodes, "g", [X, MASK], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [_init(k, v) for k, v in inits.items()])
    expected = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10))
    result = check_pass(PackQkvPass(), before, expected, feeds=feeds())
    assert result.stats == {"blocks_packed": 1, "unproven": 0}
    # The packed block is still attention, with its projections now columns of one weight.
    (block,) = find_attention(result.model).blocks
    assert [p.columns for p in (block.q, block.k, block.v)] == [(0, 8), (8, 16), (16, 24)]


def test_projections_of_different_inputs_are_left_alone():
    # Cross attention: K and V read a second sequence.
    before = exported_block()
    text = ir.to_proto(before)
    memory = helper.make_tensor_value_info("memory", TensorProto.FLOAT, ["B", "S", 8])
    text.graph.input.append(memory)
    for node in text.graph.node:
        if node.op_type == "MatMul" and node.input[1] in ("wk", "wv"):
            node.input[0] = "memory"
    model = ir.from_proto(text)
    assert len(find_attention(model).blocks) == 1
    inputs = dict(feeds(), memory=np.random.default_rng(2).standard_normal((2, 5, 8)).astype(np.float32))
    check_pass(PackQkvPass(), model, feeds=inputs)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("arch", ARCHS)
def test_zoo_blocks_packed(zoo_model, arch, exporter):
    import zoo

    model = load_onnx(zoo_model(arch, exporter))
    PassManager("cleanup", PassContext()).run(model)
    sharpen_and_expose(model)
    blocks = find_attention(model).blocks
    result = run_pass(PackQkvPass(), model)
    eir.verify(result.model)
    # GPT-2 exports its projections packed already; MobileBERT's V reads another input than Q and K.
    packable = [b for b in blocks if len({b.q.input, b.k.input, b.v.input}) == 1 and b.q.columns is None]
    assert result.stats["blocks_packed"] == len(packable)
    assert (arch in ("gpt2", "mobilebert")) == (len(packable) == 0)
    assert_numerically_equal(model, result.model, zoo.zoo_inputs(arch, zoo_model(arch, exporter)), rtol=1e-4, atol=1e-5)
    assert len(find_attention(result.model).blocks) == len(blocks)
    assert not PackQkvPass()(result.model, PassContext()).modified
