import pytest

import realistic_dynamo as realistic
from edgec import ir as eir
from edgec.passes.cleanup.remove_redundant_casts import RemoveRedundantCastsPass
from edgec.passes.core import DebugCounter, PassContext
from edgec.testing import check_pass, graph, output_names, run_pass

# onnx.TensorProto data types, as Cast's `to` spells them
FLOAT, UINT8, INT8, UINT16, INT16, INT32, INT64, BOOL, FLOAT16, DOUBLE = 1, 2, 3, 4, 5, 6, 7, 9, 10, 11


model = graph



# --- golden ----------------------------------------------------------------------------------

def test_cast_to_own_type_removed():
    before = model("g (float[N,4] x) => (float[N,4] y)", f"a = Cast <to = {FLOAT}> (x)\n y = Relu(a)")
    expected = model("g (float[N,4] x) => (float[N,4] y)", "y = Relu(x)")
    result = check_pass(RemoveRedundantCastsPass(), before, expected)
    assert result.stats == {"casts_removed": 1}


def test_castlike_to_own_type_removed():
    before = model("g (float[N,4] x, float[3] like) => (float[N,4] y)", "a = CastLike(x, like)\n y = Relu(a)")
    expected = model("g (float[N,4] x, float[3] like) => (float[N,4] y)", "y = Relu(x)")
    check_pass(RemoveRedundantCastsPass(), before, expected)


def test_cast_of_inferred_type_removed():
    # a's type is only known from shape inference (int64 out of Shape).
    before = model("g (float[N,4] x) => (int64[2] y)", f"a = Shape(x)\n b = Cast <to = {INT64}> (a)\n y = Neg(b)")
    expected = model("g (float[N,4] x) => (int64[2] y)", "a = Shape(x)\n y = Neg(a)")
    check_pass(RemoveRedundantCastsPass(), before, expected)


@pytest.mark.parametrize("source, middle, target", [
    ("int32", INT64, FLOAT),
    ("bool", FLOAT16, FLOAT),
    ("uint8", INT16, DOUBLE),
    ("int8", FLOAT16, INT64),
    ("float16", FLOAT, DOUBLE),
    ("float", DOUBLE, FLOAT16),
])
def test_chain_through_lossless_type_collapsed(source, middle, target):
    out = {FLOAT: "float", DOUBLE: "double", INT64: "int64", FLOAT16: "float16"}[target]
    before = model(f"g ({source}[N,4] x) => ({out}[N,4] y)",
                   f"a = Cast <to = {middle}> (x)\n b = Cast <to = {target}> (a)\n y = Identity(b)")
    expected = model(f"g ({source}[N,4] x) => ({out}[N,4] y)", f"b = Cast <to = {target}> (x)\n y = Identity(b)")
    result = check_pass(RemoveRedundantCastsPass(), before, expected)
    assert result.stats == {"casts_removed": 1}


def test_long_chain_collapsed_in_one_run():
    before = model("g (int8[N,4] x) => (float[N,4] y)",
                   f"a = Cast <to = {INT16}> (x)\n b = Cast <to = {INT32}> (a)\n c = Cast <to = {FLOAT}> (b)\n y = Relu(c)")
    expected = model("g (int8[N,4] x) => (float[N,4] y)", f"c = Cast <to = {FLOAT}> (x)\n y = Relu(c)")
    result = check_pass(RemoveRedundantCastsPass(), before, expected)
    assert result.stats == {"casts_removed": 2}


def test_widen_and_back_removed_entirely():
    before = model("g (int32[N,4] x) => (int32[N,4] y)", f"a = Cast <to = {INT64}> (x)\n b = Cast <to = {INT32}> (a)\n y = Neg(b)")
    expected = model("g (int32[N,4] x) => (int32[N,4] y)", "y = Neg(x)")
    result = check_pass(RemoveRedundantCastsPass(), before, expected)
    assert result.stats == {"casts_removed": 2}


def test_widen_and_back_with_other_reader_keeps_the_inner_cast():
    before = model("g (int32[N,4] x) => (int32[N,4] y, int64[N,4] z)",
                   f"a = Cast <to = {INT64}> (x)\n b = Cast <to = {INT32}> (a)\n y = Neg(b)\n z = Neg(a)")
    expected = model("g (int32[N,4] x) => (int32[N,4] y, int64[N,4] z)",
                     f"a = Cast <to = {INT64}> (x)\n y = Neg(x)\n z = Neg(a)")
    result = check_pass(RemoveRedundantCastsPass(), before, expected)
    assert result.stats == {"casts_removed": 1}


def test_castlike_after_lossless_cast_reads_the_source():
    before = model("g (int32[N,4] x, float[1] like) => (float[N,4] y)",
                   f"a = Cast <to = {INT64}> (x)\n b = CastLike(a, like)\n y = Relu(b)")
    expected = model("g (int32[N,4] x, float[1] like) => (float[N,4] y)", "b = CastLike(x, like)\n y = Relu(b)")
    check_pass(RemoveRedundantCastsPass(), before, expected)


# --- graph outputs keep their names ------------------------------------------------------------

def test_cast_at_graph_output_renames_the_producer():
    before = model("g (float[N,4] x) => (float[N,4] y)", f"a = Relu(x)\n y = Cast <to = {FLOAT}> (a)")
    expected = model("g (float[N,4] x) => (float[N,4] y)", "y = Relu(x)")
    result = check_pass(RemoveRedundantCastsPass(), before, expected)
    assert output_names(result.model) == ["y"]


def test_widen_and_back_between_input_and_output_leaves_an_identity():
    before = model("g (int32[N,4] x) => (int32[N,4] y)", f"a = Cast <to = {INT64}> (x)\n y = Cast <to = {INT32}> (a)")
    expected = model("g (int32[N,4] x) => (int32[N,4] y)", "y = Identity(x)")
    result = check_pass(RemoveRedundantCastsPass(), before, expected)
    assert output_names(result.model) == ["y"]


def test_inner_cast_that_is_a_graph_output_stays():
    before = model("g (int32[N,4] x) => (int64[N,4] a, float[N,4] y)",
                   f"a = Cast <to = {INT64}> (x)\n y = Cast <to = {FLOAT}> (a)")
    check_pass(RemoveRedundantCastsPass(), before, None)


# --- near-misses ----------------------------------------------------------------------------------

@pytest.mark.parametrize("source, middle, target", [
    ("float", INT32, FLOAT),     # truncates
    ("float", FLOAT16, FLOAT),   # rounds
    ("int64", INT32, INT64),     # narrows
    ("uint16", FLOAT16, FLOAT),  # 16 bits do not fit float16's 11-bit mantissa
    ("int32", FLOAT, INT64),     # nor 32 bits float's 24
    ("float", BOOL, FLOAT),      # anything non-zero becomes 1
    ("int8", UINT8, INT32),      # negative numbers wrap
])
def test_lossy_chain_left_alone(source, middle, target):
    out = {FLOAT: "float", INT64: "int64", INT32: "int32"}[target]
    before = model(f"g ({source}[N,4] x) => ({out}[N,4] y)",
                   f"a = Cast <to = {middle}> (x)\n b = Cast <to = {target}> (a)\n y = Identity(b)")
    check_pass(RemoveRedundantCastsPass(), before, None)


def test_lossless_chain_with_other_reader_left_alone():
    # Reading x would not remove the inner Cast, which z still needs: nothing gained.
    before = model("g (int32[N,4] x) => (float[N,4] y, int64[N,4] z)",
                   f"a = Cast <to = {INT64}> (x)\n y = Cast <to = {FLOAT}> (a)\n z = Neg(a)")
    check_pass(RemoveRedundantCastsPass(), before, None)


def test_cast_to_another_type_left_alone():
    before = model("g (float[N,4] x) => (float16[N,4] y)", f"y = Cast <to = {FLOAT16}> (x)")
    check_pass(RemoveRedundantCastsPass(), before, None)


# --- debug counter -----------------------------------------------------------------------------------

def test_debug_counter_stops_after_one_rewrite():
    before = model("g (float[N,4] x) => (float[N,4] y)",
                   f"a = Cast <to = {FLOAT}> (x)\n b = Relu(a)\n c = Cast <to = {FLOAT}> (b)\n y = Relu(c)")
    result = run_pass(RemoveRedundantCastsPass(), before, PassContext(counter=DebugCounter({"remove-redundant-casts": 1})))
    eir.verify(result.model)
    assert result.modified and result.stats == {"casts_removed": 1}
    assert [n.op_type for n in result.model.graph] == ["Relu", "Cast", "Relu"]


# --- real exports ----------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("arch", realistic.ARCHS)
@pytest.mark.parametrize("exporter", realistic.EXPORTERS)
def test_real_export(arch, exporter):
    before, after, result = realistic.check_export(RemoveRedundantCastsPass(), arch, exporter)
    casts = lambda m: realistic.ops(m, "Cast") + realistic.ops(m, "CastLike")  # noqa: E731
    assert result.stats["casts_removed"] == casts(before) - casts(after)
    if exporter != "dynamo":
        # Both cast int64 values to int64 (TorchScript bools to bool too); raw dynamo CastLikes floats to float.
        assert result.stats["casts_removed"] > 0
