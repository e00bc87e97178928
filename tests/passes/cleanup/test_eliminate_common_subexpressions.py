import numpy as np

import realistic
from edgec.passes.cleanup.eliminate_common_subexpressions import EliminateCommonSubexpressionsPass
from edgec.passes.core import DebugCounter, PassContext
from edgec.testing import check_pass, graph

SIG = "g (float[N,2] x, float[N,2] z) => (float[N,2] y)"


model = graph


# --- golden ----------------------------------------------------------------------------------

def test_identical_nodes_merge():
    before = model(SIG, "a = Relu(x)\n b = Relu(x)\n y = Add(a, b)")
    expected = model(SIG, "a = Relu(x)\n y = Add(a, a)")
    result = check_pass(EliminateCommonSubexpressionsPass(), before, expected)
    assert result.stats == {"constants_merged": 0, "nodes_merged": 1}


def test_identical_chains_merge_in_one_run():
    before = model(SIG, "a1 = Relu(x)\n b1 = Softmax <axis = 1> (a1)\n a2 = Relu(x)\n"
                        " b2 = Softmax <axis = 1> (a2)\n y = Sub(b1, b2)")
    expected = model(SIG, "a1 = Relu(x)\n b1 = Softmax <axis = 1> (a1)\n y = Sub(b1, b1)")
    result = check_pass(EliminateCommonSubexpressionsPass(), before, expected)
    assert result.stats["nodes_merged"] == 2


def test_commutative_operands_in_either_order_merge():
    before = model(SIG, "a = Add(x, z)\n b = Add(z, x)\n y = Div(a, b)")
    expected = model(SIG, "a = Add(x, z)\n y = Div(a, a)")
    check_pass(EliminateCommonSubexpressionsPass(), before, expected)


def test_identical_constants_merge_and_expose_identical_nodes():
    before = model(SIG, "a = Add(x, c1)\n b = Add(x, c2)\n y = Mul(a, b)", "float[2] c1 = {1, 2}, float[2] c2 = {1, 2}")
    expected = model(SIG, "a = Add(x, c1)\n y = Mul(a, a)", "float[2] c1 = {1, 2}")
    result = check_pass(EliminateCommonSubexpressionsPass(), before, expected)
    assert result.stats == {"constants_merged": 1, "nodes_merged": 1}
    assert list(result.model.graph.initializers) == ["c1"]


def test_identical_constant_nodes_merge():
    before = model(SIG, "c1 = Constant <value_ints = [1, 2]> ()\n c2 = Constant <value_ints = [1, 2]> ()\n"
                        " a = Reshape(x, c1)\n b = Reshape(z, c2)\n y = Add(a, b)")
    expected = model(SIG, "c1 = Constant <value_ints = [1, 2]> ()\n a = Reshape(x, c1)\n b = Reshape(z, c1)\n y = Add(a, b)")
    check_pass(EliminateCommonSubexpressionsPass(), before, expected,
               feeds={"x": np.ones((1, 2), np.float32), "z": np.ones((1, 2), np.float32)})


# --- near-misses -----------------------------------------------------------------------------

def test_same_op_and_inputs_with_different_attributes_stay():
    before = model(SIG, "a = Softmax <axis = 0> (x)\n b = Softmax <axis = 1> (x)\n y = Add(a, b)")
    check_pass(EliminateCommonSubexpressionsPass(), before, None)


def test_operand_order_matters_for_non_commutative_ops():
    before = model(SIG, "a = Sub(x, z)\n b = Sub(z, x)\n y = Mul(a, b)")
    check_pass(EliminateCommonSubexpressionsPass(), before, None)


def test_random_ops_and_training_dropout_stay_apart():
    # Two draws are two independent samples; multiplied by zero so the numeric check is stable.
    before = model(
        SIG,
        "r1 = RandomUniformLike <seed = 1.0> (x)\n r2 = RandomUniformLike <seed = 1.0> (x)\n"
        " d1, m1 = Dropout(x, ratio, train)\n d2, m2 = Dropout(x, ratio, train)\n"
        " s = Add(r1, r2)\n t = Add(d1, d2)\n u = Add(s, t)\n y = Mul(u, zero)",
        "float ratio = {0.5}, bool train = {1}, float zero = {0}",
    )
    check_pass(EliminateCommonSubexpressionsPass(), before, None)


def test_constants_that_differ_or_may_be_overridden_stay():
    before = model(
        "g (float[N,2] x, float[2] c1) => (float[N,2] y)",
        "a = Add(x, c1)\n b = Add(x, c2)\n i = Cast <to = 1> (c3)\n d = Add(x, i)\n e = Mul(a, b)\n y = Mul(e, d)",
        "float[2] c1 = {1, 2}, float[2] c2 = {1, 2}, int32[2] c3 = {1065353216, 1073741824}",
    )
    # c1 is a graph input (its initializer only a default); c3 has c2's bytes but another dtype.
    check_pass(EliminateCommonSubexpressionsPass(), before, None,
               feeds={"x": np.ones((3, 2), np.float32), "c1": np.array([5, 6], np.float32)})


def test_constants_over_the_size_limit_stay():
    before = model(SIG, "a = Add(x, c1)\n b = Add(z, c2)\n y = Mul(a, b)", "float[2] c1 = {1, 2}, float[2] c2 = {1, 2}")
    check_pass(EliminateCommonSubexpressionsPass(max_bytes=4), before, None)


def test_duplicates_that_are_graph_outputs_keep_their_names():
    before = model("g (float[N,2] x) => (float[N,2] y1, float[N,2] y2)", "y1 = Relu(x)\n y2 = Relu(x)")
    check_pass(EliminateCommonSubexpressionsPass(), before, None)


# --- debug counter ---------------------------------------------------------------------------

def test_debug_counter_stops_after_one_rewrite():
    before = model(SIG, "a = Relu(x)\n b = Relu(x)\n c = Relu(x)\n s = Add(a, b)\n y = Add(s, c)")
    expected = model(SIG, "a = Relu(x)\n c = Relu(x)\n s = Add(a, a)\n y = Add(s, c)")
    ctx = PassContext(counter=DebugCounter({"cse": 1}))
    result = check_pass(EliminateCommonSubexpressionsPass(), before, expected, ctx=ctx)
    assert result.stats["nodes_merged"] == 1


# --- a real export ---------------------------------------------------------------------------

def test_bert_torchscript_export():
    # TorchScript writes the same axes/index Constant and the same Shape(x)[i] once per use.
    result = realistic.check_realistic(EliminateCommonSubexpressionsPass())
    assert result.stats["nodes_merged"] > 20
