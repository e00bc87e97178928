import numpy as np

import realistic
from edgec.passes.cleanup.remove_dead_code import RemoveDeadCodePass
from edgec.passes.core import DebugCounter, PassContext
from edgec import ir as eir
from edgec.testing import assert_numerically_equal, check_pass, graph, run_pass

SIG = "g (float[N,2] x) => (float[N,2] y)"


model = graph


# --- golden ----------------------------------------------------------------------------------

def test_dead_chain_and_unused_initializer_go():
    before = model(SIG, "a = Add(x, w)\n b = Exp(a)\n y = Neg(x)", "float[2] w = {1, 2}, float[2] v = {3, 4}")
    expected = model(SIG, "y = Neg(x)")
    result = check_pass(RemoveDeadCodePass(), before, expected)
    assert result.stats == {"nodes_removed": 2, "initializers_removed": 2, "functions_removed": 0, "opsets_removed": 0}
    assert not result.model.graph.initializers


def test_unused_functions_and_opset_imports_go():
    header = '<ir_version: 10, opset_import: ["" : 20, "local" : 1, "com.microsoft" : 1]>\n'
    functions = (
        '<domain: "local", opset_import: ["" : 20]>\nTwice (a) => (b) { b = Add(a, a) }\n'
        '<domain: "local", opset_import: ["" : 20]>\nUnused (a) => (b) { b = Sub(a, a) }\n'
    )
    before = model(SIG, "y = local.Twice(x)", header=header, functions=functions)
    expected = model(SIG, "y = local.Twice(x)", header=header, functions=functions)
    result = check_pass(RemoveDeadCodePass(), before, expected)
    assert [op[1] for op in result.model.functions] == ["Twice"]
    assert dict(result.model.opset_imports) == {"": 20, "local": 1}
    assert result.stats["functions_removed"] == 1 and result.stats["opsets_removed"] == 1


def test_dead_if_frees_the_outer_values_its_branches_read():
    before = model(
        "g (float[N,2] x, bool c) => (float[N,2] y)",
        "t = Relu(x)\n"
        " d = If (c) <then_branch = g1 () => (float[N,2] o) { o = Neg(t) },"
        " else_branch = g2 () => (float[N,2] o) { o = Identity(x) }>\n"
        " y = Abs(x)",
    )
    expected = model("g (float[N,2] x, bool c) => (float[N,2] y)", "y = Abs(x)")
    result = check_pass(RemoveDeadCodePass(), before, expected, feeds={"x": np.ones((2, 2), np.float32), "c": np.array(True)})
    assert result.stats["nodes_removed"] == 2


def test_dead_nodes_inside_a_live_branch_go():
    before = model(
        "g (float[N,2] x, bool c) => (float[N,2] y)",
        "y = If (c) <then_branch = g1 () => (float[N,2] o) { dead = Exp(x)\n o = Neg(x) },"
        " else_branch = g2 () => (float[N,2] o) { o = Identity(x) }>",
    )
    # assert_graph_equal compares subgraph attributes by identity, so the golden check is spelled out.
    result = run_pass(RemoveDeadCodePass(), before)
    eir.verify(result.model)
    assert result.stats["nodes_removed"] == 1
    then_branch = result.model.graph.node(0).attributes["then_branch"].as_graph()
    assert [n.op_type for n in then_branch] == ["Neg"]
    for flag in (True, False):
        assert_numerically_equal(before, result.model, {"x": np.ones((2, 2), np.float32), "c": np.array(flag)})
    assert not RemoveDeadCodePass()(result.model).modified


# --- near-misses -----------------------------------------------------------------------------

def test_graph_inputs_and_their_initializers_stay_even_unused():
    before = model("g (float[N,2] x, float[N,2] unused, float[2] w) => (float[N,2] y)", "y = Relu(x)", "float[2] w = {1, 2}")
    check_pass(RemoveDeadCodePass(), before, None)


def test_node_with_one_used_output_stays_whole():
    before = model(SIG, "a, b = Split <axis = 1, num_outputs = 2> (x)\n y = Concat <axis = 1> (a, a)")
    check_pass(RemoveDeadCodePass(), before, None)


# --- debug counter ---------------------------------------------------------------------------

def test_debug_counter_stops_after_one_rewrite():
    before = model(SIG, "a = Relu(x)\n b = Exp(a)\n c = Neg(b)\n y = Abs(x)")
    expected = model(SIG, "a = Relu(x)\n b = Exp(a)\n y = Abs(x)")
    ctx = PassContext(counter=DebugCounter({"remove-dead-code": 1}))
    result = check_pass(RemoveDeadCodePass(), before, expected, ctx=ctx)
    assert result.stats["nodes_removed"] == 1


def test_debug_counter_at_zero_removes_nothing_at_all():
    # Every kind of removal asks the counter, opset imports included.
    header = '<ir_version: 10, opset_import: ["" : 20, "local" : 1, "com.microsoft" : 1]>\n'
    functions = '<domain: "local", opset_import: ["" : 20]>\nUnused (a) => (b) { b = Sub(a, a) }\n'
    before = model(SIG, "a = Exp(x)\n y = Neg(x)", "float[2] w = {1, 2}", header=header, functions=functions)
    result = run_pass(RemoveDeadCodePass(), before, PassContext(counter=DebugCounter({"remove-dead-code": 0})))
    assert not result.modified
    assert result.stats == {"nodes_removed": 0, "initializers_removed": 0, "functions_removed": 0, "opsets_removed": 0}
    assert dict(result.model.opset_imports) == {"": 20, "local": 1, "com.microsoft": 1}
    assert len(result.model.functions) == 1 and list(result.model.graph.initializers) == ["w"]


# --- a real export ---------------------------------------------------------------------------

def test_bert_export_without_its_pooler_output():
    # A deployment that only needs token embeddings drops pooler_output: the pooler is dead code.
    bert = realistic.bert()
    pooler = bert.graph.outputs.pop(1)
    assert pooler.name == "pooler_output"
    result = realistic.check_realistic(RemoveDeadCodePass(), bert)
    assert {"Tanh", "Gemm"}.isdisjoint(n.op_type for n in result.model.graph)
