import numpy as np
import pytest

import realistic_dynamo as realistic
from edgec import ir as eir
from edgec.passes.cleanup.remove_identity import RemoveIdentityPass
from edgec.passes.core import DebugCounter, PassContext
from edgec.testing import assert_numerically_equal, check_pass, graph, output_names, run_pass



model = graph



# --- golden ----------------------------------------------------------------------------------

def test_identity_chain_removed_and_output_keeps_its_name():
    before = model("g (float[N,4] x) => (float[N,4] y)", "a = Identity(x)\n b = Relu(a)\n y = Identity(b)")
    expected = model("g (float[N,4] x) => (float[N,4] y)", "y = Relu(x)")
    result = check_pass(RemoveIdentityPass(), before, expected)
    assert output_names(result.model) == ["y"]
    assert result.stats == {"identities_removed": 2, "dropouts_removed": 0, "noops_removed": 0}


@pytest.mark.parametrize("call, inits", [
    ("a = Dropout(x)", ""),
    ("a = Dropout(x, r)", "float r = {0.5}"),
    ("a = Dropout(x, r, f)", "float r = {0.5}, bool f = {0}"),
    ("a, mask = Dropout(x, r, f)", "float r = {0.5}, bool f = {0}"),
])
def test_inference_dropout_removed(call, inits):
    before = model("g (float[N,4] x) => (float[N,4] y)", f"{call}\n y = Relu(a)", inits)
    expected = model("g (float[N,4] x) => (float[N,4] y)", "y = Relu(x)")
    result = check_pass(RemoveIdentityPass(), before, expected)
    assert result.stats["dropouts_removed"] == 1


def test_dropout_with_constant_node_flag_removed():
    before = model("g (float[N,4] x) => (float[N,4] y)",
                   "f = Constant <value = bool {0}> ()\n a = Dropout(x, , f)\n y = Relu(a)")
    expected = model("g (float[N,4] x) => (float[N,4] y)", "f = Constant <value = bool {0}> ()\n y = Relu(x)")
    check_pass(RemoveIdentityPass(), before, expected)


@pytest.mark.parametrize("op, inits", [
    ("Add(x, c)", "float[4] c = {0.0, 0.0, 0.0, 0.0}"),
    ("Add(c, x)", "float[1,4] c = {0.0, 0.0, 0.0, 0.0}"),
    ("Add(x, c)", "float c = {-0.0}"),
    ("Sub(x, c)", "float[1] c = {0.0}"),
    ("Mul(x, c)", "float c = {1.0}"),
    ("Mul(c, x)", "float[1,1] c = {1.0}"),
    ("Div(x, c)", "float[4] c = {1.0, 1.0, 1.0, 1.0}"),
    ("Tile(x, c)", "int64[2] c = {1, 1}"),
    ("Pad(x, c)", "int64[4] c = {0, 0, 0, 0}"),
    ("Slice(x, s, e, ax)", "int64[1] s = {0}, int64[1] e = {9223372036854775807}, int64[1] ax = {0}"),
    ("Slice(x, s, e, ax)", "int64[1] s = {-4}, int64[1] e = {4}, int64[1] ax = {-1}"),
    ("Slice(x, s, e, ax, st)", "int64[2] s = {0, 0}, int64[2] e = {9223372036854775807, 100}, int64[2] ax = {0, 1}, int64[2] st = {1, 1}"),
    ("Concat <axis = 1> (x)", ""),
])
def test_exact_noop_removed(op, inits):
    before = model("g (float[N,4] x) => (float[N,4] y)", f"a = {op}\n y = Relu(a)", inits)
    expected = model("g (float[N,4] x) => (float[N,4] y)", "y = Relu(x)")
    result = check_pass(RemoveIdentityPass(), before, expected)
    assert result.stats == {"identities_removed": 0, "dropouts_removed": 0, "noops_removed": 1}


def test_int_mul_by_int_one_removed():
    before = model("g (int64[N,4] x) => (int64[N,4] y)", "a = Mul(x, c)\n y = Neg(a)", "int64 c = {1}")
    expected = model("g (int64[N,4] x) => (int64[N,4] y)", "y = Neg(x)")
    check_pass(RemoveIdentityPass(), before, expected)


# --- graph outputs keep their names ------------------------------------------------------------

def test_noop_at_graph_output_renames_the_producer():
    before = model("g (float[N,4] x) => (float[N,4] y)", "a = Relu(x)\n y = Mul(a, one)", "float one = {1.0}")
    expected = model("g (float[N,4] x) => (float[N,4] y)", "y = Relu(x)")
    result = check_pass(RemoveIdentityPass(), before, expected)
    assert output_names(result.model) == ["y"]
    assert result.model.graph.node(0).outputs[0].name == "y"


def test_noop_from_graph_input_to_graph_output_becomes_identity():
    before = model("g (float[N,4] x) => (float[N,4] y)", "y = Tile(x, c)", "int64[2] c = {1, 1}")
    expected = model("g (float[N,4] x) => (float[N,4] y)", "y = Identity(x)")
    result = check_pass(RemoveIdentityPass(), before, expected)
    assert output_names(result.model) == ["y"]


def test_dropout_between_two_graph_outputs_becomes_identity():
    before = model("g (float[N,4] x) => (float[N,4] a, float[N,4] y)", "a = Relu(x)\n y = Dropout(a)")
    expected = model("g (float[N,4] x) => (float[N,4] a, float[N,4] y)", "a = Relu(x)\n y = Identity(a)")
    result = check_pass(RemoveIdentityPass(), before, expected)
    assert output_names(result.model) == ["a", "y"]


@pytest.mark.parametrize("signature, body, inits", [
    # input -> output: the Identity is the only thing that carries the output's name
    ("g (float[N,4] x) => (float[N,4] y)", "y = Identity(x)", ""),
    # an initializer as a named output
    ("g (float[N,4] x) => (float[N,4] r, float[4] y)", "r = Relu(x)\n y = Identity(w)",
     "float[4] w = {1.0, 2.0, 3.0, 4.0}"),
    # both names are outputs of the graph
    ("g (float[N,4] x) => (float[N,4] a, float[N,4] y)", "a = Relu(x)\n y = Identity(a)", ""),
])
def test_identity_that_carries_an_output_name_is_kept(signature, body, inits):
    before = model(signature, body, inits)
    result = check_pass(RemoveIdentityPass(), before, None)
    assert output_names(result.model) == output_names(before)


def test_identity_inside_a_subgraph():
    # assert_graph_equal cannot compare subgraphs, so the checks are spelled out here.
    before = model("g (bool c, float[N,4] x) => (float[N,4] y)", """y = If(c) <
        then_branch = t () => (float[N,4] ty) { r = Relu(x)
 ty = Identity(r) },
        else_branch = e () => (float[N,4] ey) { ey = Identity(x) }>""")
    result = run_pass(RemoveIdentityPass(), before)
    eir.verify(result.model)
    assert result.stats["identities_removed"] == 1
    branches = result.model.graph.node(0).attributes
    then, other = branches["then_branch"].as_graph(), branches["else_branch"].as_graph()
    assert [n.op_type for n in then] == ["Relu"] and [v.name for v in then.outputs] == ["ty"]
    # else reads x of the outer graph: only the Identity can carry the name ey
    assert [n.op_type for n in other] == ["Identity"] and [v.name for v in other.outputs] == ["ey"]
    for flag in (True, False):
        feeds = {"c": np.array(flag), "x": np.arange(-4, 4, dtype=np.float32).reshape(2, 4)}
        assert_numerically_equal(before, result.model, feeds)
    assert not RemoveIdentityPass()(result.model, PassContext()).modified


# --- near-misses ----------------------------------------------------------------------------------

@pytest.mark.parametrize("signature, body, inits", [
    # Dropout in training mode, or a mode only known at run time, or its mask read
    ("g (float[N,4] x) => (float[N,4] y)", "a = Dropout(x, r, t)\n y = Relu(a)", "float r = {0.0}, bool t = {1}"),
    ("g (float[N,4] x, bool t) => (float[N,4] y)", "a = Dropout(x, r, t)\n y = Relu(a)", "float r = {0.0}"),
    ("g (float[N,4] x) => (float[N,4] y, bool[N,4] m)", "a, m = Dropout(x)\n y = Relu(a)", ""),
    # adding zeros that broadcast x to a bigger shape
    ("g (float[N,1] x) => (float[N,4] y)", "a = Add(x, z)\n y = Relu(a)", "float[1,4] z = {0.0, 0.0, 0.0, 0.0}"),
    ("g (float[4] x) => (float[3,4] y)", "a = Add(x, z)\n y = Relu(a)", "float[3,1] z = {0.0, 0.0, 0.0}"),
    # not neutral, or the neutral element on the wrong side
    ("g (float[N,4] x) => (float[N,4] y)", "a = Mul(x, c)\n y = Relu(a)", "float c = {2.0}"),
    ("g (float[N,4] x) => (float[N,4] y)", "a = Add(x, c)\n y = Relu(a)", "float[4] c = {0.0, 0.0, 1.0, 0.0}"),
    ("g (float[N,4] x) => (float[N,4] y)", "a = Div(c, x)\n y = Relu(a)", "float c = {1.0}"),
    ("g (float[N,4] x) => (float[N,4] y)", "a = Sub(c, x)\n y = Relu(a)", "float c = {0.0}"),
    # an overridable initializer (also a graph input) is not a constant
    ("g (float[N,4] x, float c) => (float[N,4] y)", "a = Mul(x, c)\n y = Relu(a)", "float c = {1.0}"),
    # Tile / Pad / Slice that change something
    ("g (float[N,4] x) => (float[N,8] y)", "a = Tile(x, c)\n y = Relu(a)", "int64[2] c = {1, 2}"),
    ("g (float[N,4] x) => (float[N,5] y)", "a = Pad(x, c)\n y = Relu(a)", "int64[4] c = {0, 0, 0, 1}"),
    ("g (float[N,4] x) => (float[N,3] y)", "a = Slice(x, s, e, ax)\n y = Relu(a)",
     "int64[1] s = {1}, int64[1] e = {9223372036854775807}, int64[1] ax = {1}"),
    ("g (float[N,4] x) => (float[N,4] y)", "a = Slice(x, s, e, ax, st)\n y = Relu(a)",
     "int64[1] s = {-1}, int64[1] e = {-9223372036854775807}, int64[1] ax = {1}, int64[1] st = {-1}"),
    ("g (float[N,4] x) => (float[N,2] y)", "a = Slice(x, s, e, ax, st)\n y = Relu(a)",
     "int64[1] s = {0}, int64[1] e = {9223372036854775807}, int64[1] ax = {1}, int64[1] st = {2}"),
    # the end of a symbolic axis that a real sequence could pass
    ("g (float[N,S] x) => (float[N,T] y)", "a = Slice(x, s, e, ax)\n y = Relu(a)",
     "int64[1] s = {0}, int64[1] e = {8}, int64[1] ax = {1}"),
    ("g (float[N,4] x) => (float[N,8] y)", "a = Concat <axis = 1> (x, x)\n y = Relu(a)", ""),
    # a no-op Expand is simplify-shapes' (tested there): removed in one place only
    ("g (float[N,4] x) => (float[N,4] y)", "a = Expand(x, c)\n y = Relu(a)", "int64[2] c = {1, 4}"),
])
def test_near_misses_left_alone(signature, body, inits):
    check_pass(RemoveIdentityPass(), model(signature, body, inits), None)


def test_mul_by_ones_where_a_symbolic_dim_may_broadcast_left_alone():
    # N may be 1 at run time, and then the ones stretch x to [2, 4].
    before = model("g (float[2,N] x) => (float[2,4] y)", "y = Mul(x, o)", "float[4] o = {1.0, 1.0, 1.0, 1.0}")
    check_pass(RemoveIdentityPass(), before, None, feeds={"x": np.ones((2, 1), np.float32)})


def test_mul_by_float_one_of_an_int_tensor_left_alone():
    # Not valid ONNX (Mul wants one type), so no onnxruntime here: the point is that the pass does
    # not drop a Mul whose constant has another type than x, which would change the output's type.
    before = model("g (int64[N,4] x) => (float[N,4] y)", "y = Mul(x, c)", "float c = {1.0}")
    result = run_pass(RemoveIdentityPass(), before)
    assert not result.modified
    assert [n.op_type for n in result.model.graph] == ["Mul"]


# --- debug counter -----------------------------------------------------------------------------------

def test_debug_counter_stops_after_one_rewrite():
    before = model("g (float[N,4] x) => (float[N,4] y)",
                   "a = Identity(x)\n b = Dropout(a)\n c = Mul(b, one)\n y = Relu(c)", "float one = {1.0}")
    ctx = PassContext(counter=DebugCounter({"remove-identity": 1}))
    result = run_pass(RemoveIdentityPass(), before, ctx)
    eir.verify(result.model)
    assert result.modified
    assert sum(result.stats.values()) == 1
    assert [n.op_type for n in result.model.graph] == ["Dropout", "Mul", "Relu"]

    none = run_pass(RemoveIdentityPass(), before, PassContext(counter=DebugCounter({"remove-identity": 0})))
    assert not none.modified and sum(none.stats.values()) == 0


# --- real exports ----------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("arch", realistic.ARCHS)
@pytest.mark.parametrize("exporter", realistic.EXPORTERS)
def test_real_export(arch, exporter):
    before, after, result = realistic.check_export(RemoveIdentityPass(), arch, exporter)
    # Every export here has a no-op: Identity (TorchScript, raw dynamo) or an Add of a zero bias
    # (freshly initialised weights).
    assert result.modified
    assert result.stats["identities_removed"] == realistic.ops(before, "Identity")
    assert realistic.ops(after, "Identity") == 0
    assert eir.node_count(before) - eir.node_count(after) == sum(result.stats.values())


def test_zero_bias_is_an_exact_noop_numerically():
    before = model("g (float[N,4] x) => (float[N,4] y)", "y = Add(x, b)", "float[4] b = {0.0, 0.0, 0.0, 0.0}")
    feeds = {"x": np.array([[-0.0, 1.5, np.inf, -2.0]] * 2, dtype=np.float32)}
    check_pass(RemoveIdentityPass(), before, model("g (float[N,4] x) => (float[N,4] y)", "y = Identity(x)"), feeds=feeds)
