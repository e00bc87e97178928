import pytest

import realistic_dynamo as realistic
from edgec import ir as eir
from edgec.passes.cleanup.remove_redundant_transposes import RemoveRedundantTransposesPass
from edgec.passes.core import DebugCounter, PassContext
from edgec.testing import check_pass, graph, output_names, run_pass



model = graph



# --- golden ----------------------------------------------------------------------------------

@pytest.mark.parametrize("x_type, transpose", [
    ("float[N,S,4]", "Transpose <perm = [0, 1, 2]> (x)"),
    ("float[N]", "Transpose (x)"),  # no perm reverses the axes: of one axis, nothing
])
def test_identity_transpose_removed(x_type, transpose):
    before = model(f"g ({x_type} x) => ({x_type} y)", f"a = {transpose}\n y = Relu(a)")
    expected = model(f"g ({x_type} x) => ({x_type} y)", "y = Relu(x)")
    result = check_pass(RemoveRedundantTransposesPass(), before, expected)
    assert result.stats == {"transposes_removed": 1}


@pytest.mark.parametrize("inner, outer", [
    ("<perm = [0, 2, 1]>", "<perm = [0, 2, 1]>"),
    ("<perm = [1, 2, 0]>", "<perm = [2, 0, 1]>"),
    ("", ""),  # reverse twice
])
def test_transposes_that_cancel_removed(inner, outer):
    before = model("g (float[N,S,4] x) => (float[N,S,4] y)", f"a = Transpose {inner} (x)\n b = Transpose {outer} (a)\n y = Relu(b)")
    expected = model("g (float[N,S,4] x) => (float[N,S,4] y)", "y = Relu(x)")
    result = check_pass(RemoveRedundantTransposesPass(), before, expected)
    assert result.stats == {"transposes_removed": 2}


@pytest.mark.parametrize("signature, inner, outer, composed", [
    ("g (float[N,S,4] x) => (float[A,B,C] y)", "<perm = [1, 0, 2]>", "<perm = [0, 2, 1]>", "[1, 2, 0]"),
    ("g (float[N,S,4,5] x) => (float[A,B,C,D] y)", "<perm = [0, 2, 1, 3]>", "<perm = [0, 1, 3, 2]>", "[0, 2, 3, 1]"),
    ("g (float[N,S,4,5] x) => (float[A,B,C,D] y)", "", "<perm = [1, 0, 2, 3]>", "[2, 3, 1, 0]"),  # inner reverses
])
def test_transpose_of_transpose_composed(signature, inner, outer, composed):
    before = model(signature, f"a = Transpose {inner} (x)\n b = Transpose {outer} (a)\n y = Relu(b)")
    expected = model(signature, f"b = Transpose <perm = {composed}> (x)\n y = Relu(b)")
    result = check_pass(RemoveRedundantTransposesPass(), before, expected)
    assert result.stats == {"transposes_removed": 1}


def test_three_transposes_composed_in_one_run():
    before = model("g (float[N,S,4] x) => (float[A,B,C] y)",
                   "a = Transpose <perm = [1, 0, 2]> (x)\n b = Transpose <perm = [0, 2, 1]> (a)\n"
                   " c = Transpose <perm = [1, 0, 2]> (b)\n y = Relu(c)")
    # [1, 0, 2] then [0, 2, 1] is [1, 2, 0]; then [1, 0, 2] gives [2, 1, 0]
    expected = model("g (float[N,S,4] x) => (float[A,B,C] y)", "c = Transpose <perm = [2, 1, 0]> (x)\n y = Relu(c)")
    result = check_pass(RemoveRedundantTransposesPass(), before, expected)
    assert result.stats == {"transposes_removed": 2}


def test_cancelling_outer_removed_while_inner_with_other_reader_stays():
    before = model("g (float[N,S,4] x) => (float[N,S,4] y, float[N,4,S] z)",
                   "a = Transpose <perm = [0, 2, 1]> (x)\n b = Transpose <perm = [0, 2, 1]> (a)\n y = Relu(b)\n z = Neg(a)")
    expected = model("g (float[N,S,4] x) => (float[N,S,4] y, float[N,4,S] z)",
                     "a = Transpose <perm = [0, 2, 1]> (x)\n y = Relu(x)\n z = Neg(a)")
    result = check_pass(RemoveRedundantTransposesPass(), before, expected)
    assert result.stats == {"transposes_removed": 1}


# --- graph outputs keep their names ------------------------------------------------------------

def test_identity_transpose_at_graph_output_renames_the_producer():
    before = model("g (float[N,4] x) => (float[N,4] y)", "a = Relu(x)\n y = Transpose <perm = [0, 1]> (a)")
    expected = model("g (float[N,4] x) => (float[N,4] y)", "y = Relu(x)")
    result = check_pass(RemoveRedundantTransposesPass(), before, expected)
    assert output_names(result.model) == ["y"]


def test_cancelling_pair_from_input_to_output_leaves_an_identity():
    before = model("g (float[N,4] x) => (float[N,4] y)", "a = Transpose <perm = [1, 0]> (x)\n y = Transpose <perm = [1, 0]> (a)")
    expected = model("g (float[N,4] x) => (float[N,4] y)", "y = Identity(x)")
    result = check_pass(RemoveRedundantTransposesPass(), before, expected)
    assert output_names(result.model) == ["y"]


def test_composed_transpose_keeps_its_output_name():
    before = model("g (float[N,S,4] x) => (float[S,4,N] y)",
                   "a = Transpose <perm = [1, 0, 2]> (x)\n y = Transpose <perm = [0, 2, 1]> (a)")
    expected = model("g (float[N,S,4] x) => (float[S,4,N] y)", "y = Transpose <perm = [1, 2, 0]> (x)")
    result = check_pass(RemoveRedundantTransposesPass(), before, expected)
    assert output_names(result.model) == ["y"]


# --- near-misses ----------------------------------------------------------------------------------

@pytest.mark.parametrize("signature, body", [
    ("g (float[N,4] x) => (float[4,N] y)", "y = Transpose <perm = [1, 0]> (x)"),
    ("g (float[N,S] x) => (float[S,N] y)", "y = Transpose (x)"),
    # the inner Transpose has another reader: composing would leave two Transposes all the same
    ("g (float[N,S,4] x) => (float[A,B,C] y, float[S,N,4] z)",
     "a = Transpose <perm = [1, 0, 2]> (x)\n y = Transpose <perm = [0, 2, 1]> (a)\n z = Neg(a)"),
    # ... or is a graph output
    ("g (float[N,S,4] x) => (float[S,N,4] a, float[A,B,C] y)",
     "a = Transpose <perm = [1, 0, 2]> (x)\n y = Transpose <perm = [0, 2, 1]> (a)"),
    # a Relu between the two
    ("g (float[N,4] x) => (float[N,4] y)", "a = Transpose <perm = [1, 0]> (x)\n b = Relu(a)\n y = Transpose <perm = [1, 0]> (b)"),
])
def test_near_misses_left_alone(signature, body):
    check_pass(RemoveRedundantTransposesPass(), model(signature, body), None)


# --- debug counter -----------------------------------------------------------------------------------

def test_debug_counter_stops_after_one_rewrite():
    before = model("g (float[N,4] x) => (float[N,4] y)",
                   "a = Transpose <perm = [0, 1]> (x)\n b = Relu(a)\n c = Transpose <perm = [0, 1]> (b)\n y = Relu(c)")
    result = run_pass(RemoveRedundantTransposesPass(), before,
                      PassContext(counter=DebugCounter({"remove-redundant-transposes": 1})))
    eir.verify(result.model)
    assert result.modified and result.stats == {"transposes_removed": 1}
    assert [n.op_type for n in result.model.graph] == ["Relu", "Transpose", "Relu"]


# --- real exports ----------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("arch", realistic.ARCHS)
@pytest.mark.parametrize("exporter", realistic.EXPORTERS)
def test_real_export(arch, exporter):
    before, after, result = realistic.check_export(RemoveRedundantTransposesPass(), arch, exporter)
    assert result.stats["transposes_removed"] == eir.node_count(before) - eir.node_count(after)
    if exporter == "dynamo-raw":
        # The raw dynamo graph transposes the attention mask with identity permutations.
        assert result.stats["transposes_removed"] > 0
