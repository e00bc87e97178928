import numpy as np
import pytest

import realistic_dynamo as realistic
from edgec import ir as eir
from edgec.passes.cleanup.remove_redundant_reshapes import RemoveRedundantReshapesPass
from edgec.passes.core import DebugCounter, PassContext
from edgec.testing import check_pass, graph, output_names, run_pass



model = graph



# --- golden: a reshape to the shape the data already has -------------------------------------------

@pytest.mark.parametrize("x_type, target", [
    ("float[2,4]", "{2, 4}"),
    ("float[2,4]", "{2, -1}"),
    ("float[N,S,4]", "{0, 0, 4}"),
    ("float[N,S,4]", "{0, -1, 4}"),
    ("float[N,S,4]", "{-1, 0, 4}"),
])
def test_reshape_to_own_shape_removed(x_type, target):
    rank = x_type.count(",") + 1
    before = model(f"g ({x_type} x) => ({x_type} y)", "a = Reshape(x, s)\n y = Relu(a)", f"int64[{rank}] s = {target}")
    expected = model(f"g ({x_type} x) => ({x_type} y)", "y = Relu(x)")
    result = check_pass(RemoveRedundantReshapesPass(), before, expected)
    assert result.stats == {"reshapes_removed": 1}


def test_reshape_to_symbolically_equal_shape_removed():
    # The target is computed at run time; shape inference proves it is [N, S, 4] again.
    before = model("g (float[N,S,4] x) => (float[N,S,4] y)", "s = Shape(x)\n a = Reshape(x, s)\n y = Relu(a)")
    expected = model("g (float[N,S,4] x) => (float[N,S,4] y)", "s = Shape(x)\n y = Relu(x)")
    check_pass(RemoveRedundantReshapesPass(), before, expected)


def test_flatten_of_a_matrix_removed():
    before = model("g (float[N,4] x) => (float[N,4] y)", "a = Flatten <axis = 1> (x)\n y = Relu(a)")
    expected = model("g (float[N,4] x) => (float[N,4] y)", "y = Relu(x)")
    check_pass(RemoveRedundantReshapesPass(), before, expected)


# --- golden: chains ---------------------------------------------------------------------------------

def test_reshape_of_reshape_becomes_one():
    before = model("g (float[N,4,6] x) => (float[M,8,3] y)",
                   "a = Reshape(x, s1)\n b = Reshape(a, s2)\n y = Relu(b)", "int64[2] s1 = {-1, 24}, int64[3] s2 = {-1, 8, 3}")
    expected = model("g (float[N,4,6] x) => (float[M,8,3] y)",
                     "b = Reshape(x, s2)\n y = Relu(b)", "int64[3] s2 = {-1, 8, 3}")
    result = check_pass(RemoveRedundantReshapesPass(), before, expected)
    assert result.stats == {"reshapes_removed": 1}


def test_three_reshapes_back_to_the_start_removed():
    before = model("g (float[N,4,6] x) => (float[N,4,6] y)",
                   "a = Reshape(x, s1)\n b = Reshape(a, s2)\n c = Reshape(b, s3)\n y = Relu(c)",
                   "int64[2] s1 = {-1, 24}, int64[3] s2 = {-1, 8, 3}, int64[3] s3 = {-1, 4, 6}")
    expected = model("g (float[N,4,6] x) => (float[N,4,6] y)", "y = Relu(x)")
    result = check_pass(RemoveRedundantReshapesPass(), before, expected)
    assert result.stats == {"reshapes_removed": 3}


def test_flatten_then_reshape_back_removed():
    before = model("g (float[N,4,6] x) => (float[N,4,6] y)",
                   "a = Flatten <axis = 1> (x)\n b = Reshape(a, s)\n y = Relu(b)", "int64[3] s = {-1, 4, 6}")
    expected = model("g (float[N,4,6] x) => (float[N,4,6] y)", "y = Relu(x)")
    result = check_pass(RemoveRedundantReshapesPass(), before, expected)
    assert result.stats == {"reshapes_removed": 2}


def test_reshape_after_flatten_reads_the_source():
    before = model("g (float[N,4,6] x) => (float[M,2,12] y)",
                   "a = Flatten <axis = 2> (x)\n b = Reshape(a, s)\n y = Relu(b)", "int64[3] s = {-1, 2, 12}")
    expected = model("g (float[N,4,6] x) => (float[M,2,12] y)", "b = Reshape(x, s)\n y = Relu(b)",
                     "int64[3] s = {-1, 2, 12}")
    check_pass(RemoveRedundantReshapesPass(), before, expected)


@pytest.mark.parametrize("x_type, body, inits", [
    ("float[N,1,S]", "a = Squeeze(x, ax)\n b = Unsqueeze(a, ax)", "int64[1] ax = {1}"),
    ("float[N,1,S]", "a = Squeeze(x, ax)\n b = Unsqueeze(a, ax2)", "int64[1] ax = {-2}, int64[1] ax2 = {1}"),
    ("float[N,S]", "a = Unsqueeze(x, ax)\n b = Squeeze(a, ax)", "int64[1] ax = {-1}"),
    ("float[N,S]", "a = Unsqueeze(x, ax)\n b = Squeeze(a, ax)", "int64[2] ax = {0, 3}"),
    ("float[2,1,3]", "a = Squeeze(x)\n b = Unsqueeze(a, ax)", "int64[1] ax = {1}"),
])
def test_squeeze_unsqueeze_pair_that_cancels_removed(x_type, body, inits):
    before = model(f"g ({x_type} x) => ({x_type} y)", f"{body}\n y = Relu(b)", inits)
    expected = model(f"g ({x_type} x) => ({x_type} y)", "y = Relu(x)")
    result = check_pass(RemoveRedundantReshapesPass(), before, expected)
    assert result.stats == {"reshapes_removed": 2}


def test_inner_reshape_with_other_reader_kept_when_outer_returns_to_the_source():
    # The outer Reshape gives x back, so it goes; the inner one stays for z.
    before = model("g (float[N,4,6] x) => (float[N,4,6] y, float[M,24] z)",
                   "a = Reshape(x, s1)\n b = Reshape(a, s2)\n y = Relu(b)\n z = Neg(a)",
                   "int64[2] s1 = {-1, 24}, int64[3] s2 = {-1, 4, 6}")
    expected = model("g (float[N,4,6] x) => (float[N,4,6] y, float[M,24] z)",
                     "a = Reshape(x, s1)\n y = Relu(x)\n z = Neg(a)", "int64[2] s1 = {-1, 24}")
    result = check_pass(RemoveRedundantReshapesPass(), before, expected)
    assert result.stats == {"reshapes_removed": 1}


# --- graph outputs keep their names ------------------------------------------------------------

def test_reshape_at_graph_output_renames_the_producer():
    before = model("g (float[N,4] x) => (float[N,4] y)", "a = Relu(x)\n y = Reshape(a, s)", "int64[2] s = {0, 4}")
    expected = model("g (float[N,4] x) => (float[N,4] y)", "y = Relu(x)")
    result = check_pass(RemoveRedundantReshapesPass(), before, expected)
    assert output_names(result.model) == ["y"]


def test_chain_from_input_back_to_output_leaves_an_identity():
    before = model("g (float[N,1,S] x) => (float[N,1,S] y)", "a = Squeeze(x, ax)\n y = Unsqueeze(a, ax)", "int64[1] ax = {1}")
    expected = model("g (float[N,1,S] x) => (float[N,1,S] y)", "y = Identity(x)")
    result = check_pass(RemoveRedundantReshapesPass(), before, expected)
    assert output_names(result.model) == ["y"]


def test_collapsed_reshape_keeps_its_output_name():
    before = model("g (float[N,4,6] x) => (float[M,8,3] y)",
                   "a = Reshape(x, s1)\n y = Reshape(a, s2)", "int64[2] s1 = {-1, 24}, int64[3] s2 = {-1, 8, 3}")
    expected = model("g (float[N,4,6] x) => (float[M,8,3] y)", "y = Reshape(x, s2)", "int64[3] s2 = {-1, 8, 3}")
    result = check_pass(RemoveRedundantReshapesPass(), before, expected)
    assert output_names(result.model) == ["y"]


def test_inner_reshape_that_is_a_graph_output_stays():
    before = model("g (float[N,4,6] x) => (float[M,24] a, float[K,8,3] y)",
                   "a = Reshape(x, s1)\n y = Reshape(a, s2)", "int64[2] s1 = {-1, 24}, int64[3] s2 = {-1, 8, 3}")
    check_pass(RemoveRedundantReshapesPass(), before, None)


# --- near-misses ----------------------------------------------------------------------------------

@pytest.mark.parametrize("signature, body, inits", [
    # a 0 in the outer target copies a dim of the inner result (6), not of x (2)
    ("g (float[2,3,4] x) => (float[6,2,2] y)", "a = Reshape(x, s1)\n b = Reshape(a, s2)\n y = Relu(b)",
     "int64[2] s1 = {6, 4}, int64[3] s2 = {0, 2, 2}"),
    # the inner Reshape has another reader: reading x instead would save nothing
    ("g (float[N,4,6] x) => (float[M,8,3] y, float[K,24] z)", "a = Reshape(x, s1)\n b = Reshape(a, s2)\n y = Relu(b)\n z = Neg(a)",
     "int64[2] s1 = {-1, 24}, int64[3] s2 = {-1, 8, 3}"),
    # a different shape, with a symbolic dim
    ("g (float[N,4] x) => (float[M,2] y)", "a = Reshape(x, s)\n y = Relu(a)", "int64[2] s = {-1, 2}"),
    ("g (float[N,S,4] x) => (float[N,T,8] y)", "a = Reshape(x, s)\n y = Relu(a)", "int64[3] s = {0, -1, 8}"),
    # Squeeze / Unsqueeze that do not cancel
    ("g (float[N,1,S,1] x) => (float[N,S,1,1] y)", "a = Squeeze(x, ax)\n b = Unsqueeze(a, ax2)\n y = Relu(b)",
     "int64[1] ax = {1}, int64[1] ax2 = {3}"),
    ("g (float[N,1] x) => (float[M] y)", "a = Unsqueeze(x, ax)\n b = Squeeze(a)\n y = Relu(b)", "int64[1] ax = {0}"),
    ("g (float[N,1,S] x) => (float[N,1,S] y)", "a = Squeeze(x)\n b = Unsqueeze(a, ax)\n y = Relu(b)", "int64[1] ax = {1}"),
    # Flatten that changes the shape
    ("g (float[N,4] x) => (float[1,M] y)", "a = Flatten <axis = 0> (x)\n y = Relu(a)", ""),
])
def test_near_misses_left_alone(signature, body, inits):
    check_pass(RemoveRedundantReshapesPass(), model(signature, body, inits), None)


@pytest.mark.parametrize("signature, body, inits, feeds", [
    ("g (float[N,4] x, int64[2] s) => (float[A,B] y)", "a = Reshape(x, s)\n y = Relu(a)", "",
     {"x": np.ones((2, 4), np.float32), "s": np.array([2, 4])}),
    ("g (float[N,4,6] x, int64[3] s) => (float[A,B,C] y)", "a = Reshape(x, s1)\n b = Reshape(a, s)\n y = Relu(b)",
     "int64[2] s1 = {-1, 24}", {"x": np.ones((2, 4, 6), np.float32), "s": np.array([2, 4, 6])}),
])
def test_target_known_only_at_run_time_left_alone(signature, body, inits, feeds):
    # Even when it happens to be the input's shape at run time: another call may pass another one.
    check_pass(RemoveRedundantReshapesPass(), model(signature, body, inits), None, feeds=feeds)


def test_allowzero_zero_means_an_empty_dim_not_a_copy():
    # With allowzero=1 the 0 is a literal size: [N, 4] -> [0, 4] works only for empty x, and then
    # only because N happens to be 0. The pass cannot assume that.
    before = model("g (float[N,4] x) => (float[0,4] y)", "a = Reshape <allowzero = 1> (x, s)\n y = Relu(a)",
                   "int64[2] s = {0, 4}")
    check_pass(RemoveRedundantReshapesPass(), before, None, feeds={"x": np.zeros((0, 4), np.float32)})


def test_allowzero_outer_reshape_of_reshape_still_collapses():
    # allowzero=1 with no 0 in the target: nothing is copied from the input, so the inner one can go.
    before = model("g (float[N,4,6] x) => (float[M,8,3] y)",
                   "a = Reshape(x, s1)\n b = Reshape <allowzero = 1> (a, s2)\n y = Relu(b)",
                   "int64[2] s1 = {-1, 24}, int64[3] s2 = {-1, 8, 3}")
    expected = model("g (float[N,4,6] x) => (float[M,8,3] y)", "b = Reshape <allowzero = 1> (x, s2)\n y = Relu(b)",
                     "int64[3] s2 = {-1, 8, 3}")
    check_pass(RemoveRedundantReshapesPass(), before, expected)


# --- debug counter -----------------------------------------------------------------------------------

def test_debug_counter_stops_after_one_rewrite():
    before = model("g (float[N,4] x) => (float[N,4] y)",
                   "a = Reshape(x, s)\n b = Relu(a)\n c = Reshape(b, s)\n y = Relu(c)", "int64[2] s = {0, 4}")
    result = run_pass(RemoveRedundantReshapesPass(), before,
                      PassContext(counter=DebugCounter({"remove-redundant-reshapes": 1})))
    eir.verify(result.model)
    assert result.modified and result.stats == {"reshapes_removed": 1}
    assert [n.op_type for n in result.model.graph] == ["Relu", "Reshape", "Relu"]


# --- real exports ----------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("arch", realistic.ARCHS)
@pytest.mark.parametrize("exporter", realistic.EXPORTERS)
def test_real_export(arch, exporter):
    before, after, result = realistic.check_export(RemoveRedundantReshapesPass(), arch, exporter)
    assert result.stats["reshapes_removed"] == eir.node_count(before) - eir.node_count(after)
    if exporter != "dynamo":
        # TorchScript reshapes 1-D shape vectors to [-1]; raw dynamo Squeezes [1] to a scalar and
        # Reshapes it back to [1], and reshapes attention outputs to the shape they have.
        assert result.stats["reshapes_removed"] > 0
