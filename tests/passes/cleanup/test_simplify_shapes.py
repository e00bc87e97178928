import onnx_ir as ir
import pytest

import realistic
from edgec.passes.cleanup.simplify_shapes import SimplifyShapesPass
from edgec.passes.core import DebugCounter, PassContext
from edgec.testing import check_pass, graph

# Index and axes constants as TorchScript exports spell them.
CONSTS = "int64 i0 = {0}, int64 i1 = {1}, int64 i2 = {2}, int64[1] ax0 = {0}, int64[1] m1 = {-1}, int64[1] c16 = {16}"


def model(signature: str, body: str, inits: str = CONSTS) -> ir.Model:
    return graph(signature, body, inits)


# --- golden ----------------------------------------------------------------------------------

def test_shape_of_static_tensor_becomes_constant():
    before = model("g (float[2,3] t, float[3] x) => (float[2,3] y)", "s = Shape(t)\n y = Expand(x, s)")
    expected = model("g (float[2,3] t, float[3] x) => (float[2,3] y)", "y = Expand(x, s)", "int64[2] s = {2, 3}")
    result = check_pass(SimplifyShapesPass(), before, expected)
    assert result.stats["shapes_folded"] == 1


def test_static_dim_picked_from_partly_dynamic_shape():
    # Shape(start=1) of [N,S,8] is [S,8]: its element 1 is known although S is not.
    before = model(
        "g (float[N,S,8] x) => (float[M,8] y)",
        "s = Shape <start = 1> (x)\n d = Gather <axis = 0> (s, i1)\n u = Unsqueeze(d, ax0)\n"
        " c = Concat <axis = 0> (m1, u)\n y = Reshape(x, c)",
    )
    expected = model("g (float[N,S,8] x) => (float[M,8] y)", "y = Reshape(x, c)", "int64[2] c = {-1, 8}")
    result = check_pass(SimplifyShapesPass(), before, expected)
    assert result.stats["shapes_folded"] == 1 and result.stats["nodes_removed"] == 4


def test_torchscript_head_split_reshape_becomes_static():
    # view(batch, seq, -1, 16) with batch and seq read back from the tensor itself.
    before = model(
        "g (float[B,S,32] x) => (float[B,S,2,16] y)",
        "s = Shape(x)\n b = Gather <axis = 0> (s, i0)\n q = Gather <axis = 0> (s, i1)\n"
        " ub = Unsqueeze(b, ax0)\n uq = Unsqueeze(q, ax0)\n c = Concat <axis = 0> (ub, uq, m1, c16)\n"
        " y = Reshape(x, c)",
    )
    expected = model("g (float[B,S,32] x) => (float[B,S,2,16] y)", "y = Reshape(x, k)", "int64[4] k = {0, 0, -1, 16}")
    result = check_pass(SimplifyShapesPass(), before, expected)
    assert result.stats["reshapes_made_static"] == 1 and result.stats["nodes_removed"] == 6


def test_dims_of_another_tensor_with_the_same_symbolic_dims():
    # The shape comes from x, the data is h: both are [B,S,32], so B and S can be copied from h.
    before = model(
        "g (float[B,S,32] x, float[B,S,32] h) => (float[B,S,2,16] y)",
        "s = Shape <end = 2> (x)\n c = Concat <axis = 0> (s, m1, c16)\n r = Relu(h)\n y = Reshape(r, c)",
    )
    expected = model("g (float[B,S,32] x, float[B,S,32] h) => (float[B,S,2,16] y)",
                     "r = Relu(h)\n y = Reshape(r, k)", "int64[4] k = {0, 0, -1, 16}")
    check_pass(SimplifyShapesPass(), before, expected)


def test_dynamo_allowzero_reshape_becomes_static_without_allowzero():
    # allowzero=1 only matters for literal zeros; the rewritten shape has none, its 0s copy dims.
    before = model(
        "g (float[B,S,32] x) => (float[B,S,2,16] y)",
        "b = Shape <start = 0, end = 1> (x)\n q = Shape <start = 1, end = 2> (x)\n"
        " c = Concat <axis = 0> (b, q, two, c16)\n y = Reshape <allowzero = 1> (x, c)",
        CONSTS + ", int64[1] two = {2}",
    )
    expected = model("g (float[B,S,32] x) => (float[B,S,2,16] y)", "y = Reshape(x, k)", "int64[4] k = {0, 0, 2, 16}")
    check_pass(SimplifyShapesPass(), before, expected)


def test_slice_of_shape_and_arithmetic_on_known_dims():
    # [B,S,4,8] -> [B,S,32]: the last two dims sliced off the shape and multiplied.
    before = model(
        "g (float[B,S,4,8] x) => (float[B,S,32] y)",
        "s = Shape(x)\n bs = Slice(s, i0v, i2v)\n hd = Slice(s, i2v, big)\n"
        " h = Gather <axis = 0> (hd, i0)\n d = Gather <axis = 0> (hd, i1)\n p = Mul(h, d)\n u = Unsqueeze(p, ax0)\n"
        " c = Concat <axis = 0> (bs, u)\n y = Reshape(x, c)",
        CONSTS + ", int64[1] i0v = {0}, int64[1] i2v = {2}, int64[1] big = {9223372036854775807}",
    )
    expected = model("g (float[B,S,4,8] x) => (float[B,S,32] y)", "y = Reshape(x, k)", "int64[3] k = {0, 0, 32}")
    check_pass(SimplifyShapesPass(), before, expected)


def test_torch_expand_minus_one_idiom_is_a_no_op():
    # x.expand(B, -1, S) as TorchScript writes it: Where(Equal(shape, -1), 1, shape).
    before = model(
        "g (float[B,1,S] x) => (float[B,1,S] y)",
        "s = Shape(x)\n b = Slice(s, i0v, i1v)\n q = Slice(s, i2v, i3v)\n c = Concat <axis = 0> (b, m1, q)\n"
        " eq = Equal(c, m1x3)\n w = Where(eq, ones, c)\n e = Expand(x, w)\n y = Relu(e)",
        CONSTS + ", int64[1] i0v = {0}, int64[1] i1v = {1}, int64[1] i2v = {2}, int64[1] i3v = {3},"
        " int64[3] m1x3 = {-1, -1, -1}, int64[3] ones = {1, 1, 1}",
    )
    expected = model("g (float[B,1,S] x) => (float[B,1,S] y)", "y = Relu(x)")
    result = check_pass(SimplifyShapesPass(), before, expected)
    assert result.stats["expands_removed"] == 1


@pytest.mark.parametrize("target", ["int64[2] c = {1, 4}", "int64[1] c = {1}"])
def test_expand_to_a_constant_that_broadcasts_into_the_input_removed(target):
    before = model("g (float[N,4] x) => (float[N,4] y)", "a = Expand(x, c)\n y = Relu(a)", target)
    expected = model("g (float[N,4] x) => (float[N,4] y)", "y = Relu(x)")
    result = check_pass(SimplifyShapesPass(), before, expected)
    assert result.stats == {"shapes_folded": 0, "reshapes_made_static": 0, "expands_removed": 1, "nodes_removed": 1}


def test_expand_to_the_shape_of_its_own_input_removed():
    before = model("g (float[2,4] x) => (float[2,4] y)", "s = Shape(x)\n a = Expand(x, s)\n y = Relu(a)", "")
    expected = model("g (float[2,4] x) => (float[2,4] y)", "y = Relu(x)")
    check_pass(SimplifyShapesPass(), before, expected)


def test_noop_expand_from_graph_input_to_graph_output_becomes_identity():
    before = model("g (float[N,4] x) => (float[N,4] y)", "y = Expand(x, c)", "int64[1] c = {1}")
    expected = model("g (float[N,4] x) => (float[N,4] y)", "y = Identity(x)")
    result = check_pass(SimplifyShapesPass(), before, expected)
    assert [v.name for v in result.model.graph.outputs] == ["y"]


# --- near-misses -----------------------------------------------------------------------------

def test_swapped_dynamic_dims_stay_dynamic():
    # [B,S,32] -> [S,B,32]: neither dim sits where 0 could copy it, and only one may be -1.
    before = model(
        "g (float[B,S,32] x) => (float[S,B,32] y)",
        "s = Shape(x)\n b = Gather <axis = 0> (s, i0)\n q = Gather <axis = 0> (s, i1)\n"
        " ub = Unsqueeze(b, ax0)\n uq = Unsqueeze(q, ax0)\n c = Concat <axis = 0> (uq, ub, c32)\n y = Reshape(x, c)",
        CONSTS + ", int64[1] c32 = {32}",
    )
    check_pass(SimplifyShapesPass(), before, None)


def test_dims_of_a_tensor_with_other_symbolic_dims_stay_dynamic():
    # B and C may differ at run time, so B cannot be copied from h (whose dim 0 is C).
    before = model(
        "g (float[B,S,32] x, float[C,S,32] h) => (float[C,S,2,16] y)",
        "s = Shape <end = 1> (x)\n c = Concat <axis = 0> (s, m1, c16)\n y = Reshape(h, c)",
    )
    check_pass(SimplifyShapesPass(), before, None)


def test_allowzero_with_a_literal_zero_is_left_alone():
    before = model(
        "g (float[B,S,0] x) => (float[B,S,0] y)",
        "s = Shape <end = 2> (x)\n c = Concat <axis = 0> (s, zero)\n y = Reshape <allowzero = 1> (x, c)",
        "int64[1] zero = {0}",
    )
    check_pass(SimplifyShapesPass(), before, None)


@pytest.mark.parametrize("signature, body, inits", [
    ("g (float[B,1,S] x, float[B,4,S] t) => (float[B,4,S] y)", "s = Shape(t)\n e = Expand(x, s)\n y = Relu(e)", ""),
    # a constant target that adds an axis, or stretches one
    ("g (float[N,4] x) => (float[N,2,4] y)", "e = Expand(x, s)\n y = Relu(e)", "int64[3] s = {1, 2, 4}"),
    ("g (float[2,1] x) => (float[2,4] y)", "e = Expand(x, s)\n y = Relu(e)", "int64[2] s = {2, 4}"),
])
def test_expand_that_broadcasts_stays(signature, body, inits):
    check_pass(SimplifyShapesPass(), model(signature, body, inits), None)


# --- debug counter ---------------------------------------------------------------------------

def test_debug_counter_stops_after_one_rewrite():
    body = (
        "s = Shape <end = 2> (x)\n c = Concat <axis = 0> (s, m1, c16)\n"
        " a = Reshape(x, c)\n r = Relu(x)\n b = Reshape(r, c)\n y = Add(a, b)"
    )
    before = model("g (float[B,S,32] x) => (float[B,S,2,16] y)", body)
    expected = model(
        "g (float[B,S,32] x) => (float[B,S,2,16] y)",
        "s = Shape <end = 2> (x)\n c = Concat <axis = 0> (s, m1, c16)\n"
        " a = Reshape(x, k)\n r = Relu(x)\n b = Reshape(r, c)\n y = Add(a, b)",
        CONSTS + ", int64[4] k = {0, 0, -1, 16}",
    )
    ctx = PassContext(counter=DebugCounter({"simplify-shapes": 1}))
    result = check_pass(SimplifyShapesPass(), before, expected, ctx=ctx)
    assert result.stats["reshapes_made_static"] == 1


# --- a real export ---------------------------------------------------------------------------

def test_bert_torchscript_export():
    result = realistic.check_realistic(SimplifyShapesPass())
    # Q, K and V of both layers are split into heads with a static target now.
    assert result.stats["reshapes_made_static"] >= 6
