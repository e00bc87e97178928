"""The attention analysis: every zoo export's blocks found with the config's heads, proven by execution,
and near-misses reported with the check that failed."""

import math

import numpy as np
import pytest
import zoo

from edgec.analysis import AnalysisCache
from edgec.analysis.attention import check_block, find_attention
from edgec.frontends.onnx import load_onnx
from edgec.passes.manager import run_pipeline
from edgec.testing import parse


def _expected(arch: str) -> tuple[int, int, int, list[int]]:
    """(blocks, heads, kv_heads, head_dim per block) from the transformers config."""
    config = zoo.zoo_config(arch)
    heads = config.num_attention_heads
    if arch == "mobilevit":
        # Three MobileViT stages of 2, 4 and 3 transformer layers, each as wide as its hidden size.
        dims = [size // heads for size, depth in zip(config.hidden_sizes, (2, 4, 3)) for _ in range(depth)]
        return len(dims), heads, heads, dims
    # MobileBERT attends in its bottleneck (true_hidden_size), not at hidden_size.
    hidden = getattr(config, "true_hidden_size", None) or getattr(config, "hidden_size", None) or getattr(config, "dim", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return config.num_hidden_layers, heads, kv_heads, [head_dim] * config.num_hidden_layers


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
@pytest.mark.parametrize("arch", zoo.ARCHS)
def test_zoo_attention_is_recognised_and_proven(zoo_model, arch, exporter):
    model = load_onnx(zoo_model(arch, exporter))
    run_pipeline(model, "cleanup")
    found = AnalysisCache().get("attention", model)
    assert found.unrecognised == []
    count, heads, kv_heads, head_dims = _expected(arch)
    assert len(found.blocks) == count
    assert [b.layer for b in found.blocks] == list(range(count))
    assert [(b.heads, b.kv_heads) for b in found.blocks] == [(heads, kv_heads)] * count
    assert [b.head_dim for b in found.blocks] == head_dims
    for block in found.blocks:
        assert math.isclose(block.scale, 1 / math.sqrt(block.head_dim), rel_tol=1e-5)
        assert block.rotary == (arch == "llama")
        assert block.mask in (("causal+padding",) if arch in ("gpt2", "llama") else ("padding", "none", "constant"))
        assert block.softmax in block.nodes and block.q.node in block.nodes and block.o.node in block.nodes
    rng = np.random.default_rng(0)
    # The first block of each distinct shape proves the record; mobilevit's stages differ in width.
    for block in {b.head_dim: b for b in reversed(found.blocks)}.values():
        assert check_block(model, block, rng) < 1e-4


NEAR_MISS = """
<ir_version: 10, opset_import: ["" : 20]>
g (float[2,4,8,8] scores, float[2,4,8,8] q, float[2,4,8,8] k, float[2,4,8,8] v) => (float[2,4,8,8] a, float[2,4,8,8] b) {
    s1 = MatMul(q, k)
    p1 = Softmax<axis = 2>(s1)
    a = MatMul(p1, v)
    two = Constant<value = float {2.0}>()
    s2 = Mul(scores, two)
    p2 = Softmax<axis = -1>(s2)
    b = MatMul(p2, v)
}
"""


def test_near_misses_say_why():
    found = find_attention(parse(NEAR_MISS))
    assert found.blocks == []
    assert [reason for _, reason in found.unrecognised] == ["softmax axis is not the last", "no MatMul feeds the softmax"]


PROJECTION_MISS = """
<ir_version: 10, opset_import: ["" : 20]>
g (float[2,8,16] x, float[16,16] wq) => (float[2,8,16] y) {
    shape = Constant<value = int64[4] {0, 0, 4, 4}>()
    merge = Constant<value = int64[3] {0, 0, 16}>()
    wk = Constant<value = float[16,16] {""" + ", ".join(["0.1"] * 256) + """}>()
    wv = Constant<value = float[16,16] {""" + ", ".join(["0.2"] * 256) + """}>()
    wo = Constant<value = float[16,16] {""" + ", ".join(["0.3"] * 256) + """}>()
    q0 = MatMul(x, wq)
    k0 = MatMul(x, wk)
    v0 = MatMul(x, wv)
    q1 = Reshape(q0, shape)
    k1 = Reshape(k0, shape)
    v1 = Reshape(v0, shape)
    q = Transpose<perm = [0, 2, 1, 3]>(q1)
    kt = Transpose<perm = [0, 2, 3, 1]>(k1)
    v = Transpose<perm = [0, 2, 1, 3]>(v1)
    s = MatMul(q, kt)
    p = Softmax<axis = -1>(s)
    o = MatMul(p, v)
    o1 = Transpose<perm = [0, 2, 1, 3]>(o)
    o2 = Reshape(o1, merge)
    y = MatMul(o2, wo)
}
"""


def test_projection_without_constant_weight_is_a_near_miss():
    found = find_attention(parse(PROJECTION_MISS))
    assert found.blocks == []
    ((_, reason),) = found.unrecognised
    assert reason.startswith("Q projection") and reason.endswith("has no constant weight")


def test_hand_built_block_is_recognised_and_proven():
    # The same graph with a constant Q weight is an attention block edgec can prove.
    text = PROJECTION_MISS.replace("float[16,16] wq) =>", ") =>").replace(
        "    wk =", "    wq = Constant<value = float[16,16] {" + ", ".join(f"{(i % 7) / 10}" for i in range(256)) + "}>()\n    wk =")
    text = text.replace("(float[2,8,16] x, )", "(float[2,8,16] x)")
    model = parse(text)
    (block,) = find_attention(model).blocks
    assert (block.heads, block.kv_heads, block.head_dim, block.scale, block.mask) == (4, 4, 4, 1.0, "none")
    assert check_block(model, block, np.random.default_rng(0)) < 1e-4


def test_inspect_json_lists_attention(zoo_model):
    from edgec.commands import inspect_model

    info = inspect_model(str(zoo_model("llama", "dynamo")))
    assert info["unrecognised_softmax"] == []
    assert [(a["layer"], a["heads"], a["kv_heads"], a["head_dim"], a["rotary"], a["verified"]) for a in info["attention"]] == [
        (0, 4, 2, 16, True, True), (1, 4, 2, 16, True, True)]
    assert all(a["mask"] == "causal+padding" and a["nodes"] for a in info["attention"])
