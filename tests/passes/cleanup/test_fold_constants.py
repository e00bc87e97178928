import numpy as np
import onnx_ir as ir

import realistic
from edgec.passes.cleanup.fold_constants import FoldConstantsPass
from edgec.passes.core import DebugCounter, PassContext
from edgec.testing import check_pass, graph, run_pass



model = graph


# --- golden ----------------------------------------------------------------------------------

def test_constant_nodes_become_initializers():
    before = model("g (float[N,2] x) => (float[N,2] y)", "c = Constant <value = float[2] {1, 2}> ()\n y = Add(x, c)")
    expected = model("g (float[N,2] x) => (float[N,2] y)", "y = Add(x, c)", "float[2] c = {1, 2}")
    result = check_pass(FoldConstantsPass(), before, expected)
    assert result.stats == {"nodes_folded": 0, "constants_lifted": 1, "initializers_removed": 0}
    # The initializer takes over the Constant's name.
    assert "c" in result.model.graph.initializers


def test_chain_of_constant_ops_folds_to_one_initializer():
    before = model(
        "g (float[N,3] x) => (float[N,3] y)",
        "s = Constant <value_ints = [3]> ()\n"
        " f = ConstantOfShape <value = float[1] {2}> (s)\n"
        " e = Exp(f)\n"
        " w = Mul(e, b)\n"
        " y = Add(x, w)",
        "float[3] b = {1, 2, 3}",
    )
    expected = model("g (float[N,3] x) => (float[N,3] y)", "y = Add(x, w)",
                     f"float[3] w = {{{', '.join(str(v) for v in (np.exp(np.float32(2)) * np.float32([1, 2, 3])))}}}")
    result = check_pass(FoldConstantsPass(), before, expected)
    assert result.stats["nodes_folded"] == 3 and result.stats["constants_lifted"] == 1
    # b only fed the folded Mul: it goes with it.
    assert set(result.model.graph.initializers) == {"w"}


def test_multi_output_node_folds_every_used_output():
    before = model(
        "g (float[N,2] x) => (float[N,2] y)",
        "a, b = Split <axis = 0> (c, sizes)\n t = Add(x, a)\n y = Mul(t, b)",
        "float[4] c = {1, 2, 3, 4}, int64[2] sizes = {2, 2}",
    )
    expected = model("g (float[N,2] x) => (float[N,2] y)", "t = Add(x, a)\n y = Mul(t, b)",
                     "float[2] a = {1, 2}, float[2] b = {3, 4}")
    check_pass(FoldConstantsPass(), before, expected)


def test_transpose_of_weight_read_only_there_folds_whatever_its_size():
    weight = np.arange(600 * 500, dtype=np.float32).reshape(600, 500) / 1e5  # 1.2 MB, over the 1 MiB limit
    before = model("g (float[N,600] x) => (float[N,500] y)", "wt = Transpose <perm = [1, 0]> (w)\n y = MatMul(x, wt)",
                   "float[1] w = {0}")
    _set(before, "w", weight.T.copy())
    expected = model("g (float[N,600] x) => (float[N,500] y)", "y = MatMul(x, wt)", "float[1] wt = {0}")
    _set(expected, "wt", weight)
    result = check_pass(FoldConstantsPass(), before, expected)
    assert list(result.model.graph.initializers) == ["wt"]  # no second copy left behind


def _set(m: ir.Model, name: str, array: np.ndarray) -> None:
    """Gives an initializer declared in text a value too big to write there."""
    value = m.graph.initializers[name]
    value.const_value = ir.tensor(array, name=name)
    value.shape = ir.Shape(array.shape)


# --- near-misses -----------------------------------------------------------------------------

def test_transpose_of_tied_embedding_is_left_alone():
    # GPT-2 style: one table is both the token embedding (Gather) and, transposed, the LM head.
    before = model(
        "g (int64[N] ids) => (float[N,16] logits)",
        "h = Gather(emb, ids)\n wt = Transpose <perm = [1, 0]> (emb)\n logits = MatMul(h, wt)",
        "float[16,32] emb = {" + ", ".join(str(i / 100) for i in range(16 * 32)) + "}",
    )
    check_pass(FoldConstantsPass(), before, None, feeds={"ids": np.array([0, 3, 15], dtype=np.int64)})


def test_large_result_of_small_input_is_left_alone():
    before = model(
        "g (float[N,1,1] x) => (float[N,512,1024] y)",
        "big = Expand(one, shape)\n y = Mul(x, big)",
        "float[1] one = {1}, int64[3] shape = {1, 512, 1024}",
    )
    check_pass(FoldConstantsPass(), before, None)
    # Raising the limit is the user's call.
    result = run_pass(FoldConstantsPass(max_output_bytes=4 << 20), before)
    assert result.stats["nodes_folded"] == 1


def test_random_ops_are_not_folded():
    before = model(
        "g (float[N,2] x) => (float[N,2] y)",
        "r = RandomUniformLike <seed = 1.0> (c)\n b = Bernoulli <seed = 2.0> (c)\n"
        " z = Mul(r, zero)\n bz = Cast <to = 1> (b)\n z2 = Mul(bz, zero)\n s = Add(z, z2)\n y = Add(x, s)",
        "float[2] c = {0.5, 0.5}, float zero = {0}",
    )
    check_pass(FoldConstantsPass(), before, None)


def test_initializer_that_is_also_a_graph_input_is_not_a_constant():
    # A caller may feed `scale`; the initializer is only its default.
    before = model("g (float[N,2] x, float[2] scale) => (float[N,2] y)", "s2 = Mul(scale, two)\n y = Mul(x, s2)",
                   "float[2] scale = {1, 2}, float two = {2}")
    check_pass(FoldConstantsPass(), before, None, feeds={"x": np.ones((3, 2), np.float32),
                                                         "scale": np.array([5, 7], np.float32)})


def test_quantization_ops_on_weights_stay():
    before = model(
        "g (float[N,2] x) => (float[N,2] y)",
        "w = DequantizeLinear(q, scale, zp)\n y = Mul(x, w)",
        "int8[2] q = {10, -20}, float scale = {0.5}, int8 zp = {0}",
    )
    check_pass(FoldConstantsPass(), before, None)


# --- debug counter ---------------------------------------------------------------------------

def test_debug_counter_stops_after_one_rewrite():
    before = model(
        "g (float[N,2] x) => (float[N,2] y)",
        "a = Constant <value = float[2] {1, 2}> ()\n b = Constant <value = float[2] {3, 4}> ()\n"
        " c = Add(a, b)\n y = Add(x, c)",
    )
    expected = model(
        "g (float[N,2] x) => (float[N,2] y)",
        "b = Constant <value = float[2] {3, 4}> ()\n c = Add(a, b)\n y = Add(x, c)",
        "float[2] a = {1, 2}",
    )
    ctx = PassContext(counter=DebugCounter({"fold-constants": 1}))
    result = check_pass(FoldConstantsPass(), before, expected, ctx=ctx)
    assert result.stats["constants_lifted"] == 1 and result.stats["nodes_folded"] == 0


# --- a real export ---------------------------------------------------------------------------

def test_bert_torchscript_export():
    result = realistic.check_realistic(FoldConstantsPass())
    assert result.stats["constants_lifted"] > 50
    assert not any(n.op_type == "Constant" for n in result.model.graph)
