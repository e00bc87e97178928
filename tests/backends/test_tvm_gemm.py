"""The MatMul design space of the tvm backend (edgec.backends.tvm.gemm): which kernels it takes, and
that every schedule it samples, in both forms, computes what the unscheduled kernel computes when
built with llvm and run on this CPU (row counts that leave a tail, batch axes, fused epilogues)."""

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import s_tir, te, tirx  # noqa: E402
from tvm.s_tir import dlight  # noqa: E402

from edgec.backends.tvm import gemm  # noqa: E402
from edgec.backends.tvm.targets import host_target  # noqa: E402

RNG = np.random.default_rng(0)


def kernel(batch, m, k, n, epilogue=True, transposed_b=False, producer=False, weights=False):
    """A Relax-legalized MatMul's form: C[b, i, j] = sum A[b, i, r] * B[b, r, j] (block "matmul"),
    then a bias Add and a GELU-like elementwise tail, each its own block. With `weights`, B is one
    [k, n] matrix for every batch (a Linear's weights), and a batch of 0 leaves A two-dimensional."""
    if weights:
        a = te.placeholder((batch, m, k) if batch else (m, k), name="a")
        w = te.placeholder((k, n), name="w")
        bias = te.placeholder((n,), name="bias")
        r = te.reduce_axis((0, k), name="r")
        if batch:
            c = te.compute((batch, m, n), lambda x, i, j: te.sum(a[x, i, r] * w[r, j], axis=r), name="matmul")
        else:
            c = te.compute((m, n), lambda i, j: te.sum(a[i, r] * w[r, j], axis=r), name="matmul")
        out = te.compute(c.shape, lambda *i: c[i] + bias[i[-1]], name="add")
        return tvm.IRModule({"main": te.create_prim_func([a, w, bias, out])})
    a = te.placeholder((batch, m, k), name="a")
    b = te.placeholder((batch, n, k) if transposed_b else (batch, k, n), name="b")
    bias = te.placeholder((n,), name="bias")
    source = te.compute(a.shape, lambda x, i, r: a[x, i, r] * 2.0, name="scaled") if producer else a
    r = te.reduce_axis((0, k), name="r")
    if transposed_b:
        c = te.compute((batch, m, n), lambda x, i, j: te.sum(source[x, i, r] * b[x, j, r], axis=r), name="matmul")
    else:
        c = te.compute((batch, m, n), lambda x, i, j: te.sum(source[x, i, r] * b[x, r, j], axis=r), name="matmul")
    if not epilogue:
        return tvm.IRModule({"main": te.create_prim_func([a, b, bias, c])})
    added = te.compute(c.shape, lambda *i: c[i] + bias[i[-1]], name="add")
    out = te.compute(c.shape, lambda *i: added[i] * tirx.sigmoid(added[i] * 1.702), name="gelu")
    return tvm.IRModule({"main": te.create_prim_func([a, b, bias, out])})


def run(mod, arrays):
    library = tvm.compile(mod, target=tvm.target.Target(host_target()))
    tensors = [tvm.runtime.tensor(x) for x in arrays]
    library["main"](*tensors)
    return tensors[-1].numpy()


def arguments(mod):
    func = mod["main"]
    return [RNG.standard_normal([int(d) for d in p.shape]).astype(np.float32) for p in func.params]


@pytest.mark.parametrize("shape", [(1, 64, 48, 96), (1, 65, 40, 40), (3, 16, 32, 24)],
                         ids=["even", "row-tail", "batched"])
@pytest.mark.parametrize("epilogue", [True, False], ids=["epilogue", "bare"])
def test_every_sampled_schedule_computes_the_kernel(shape, epilogue):
    check_every_sampled_schedule(kernel(*shape, epilogue=epilogue))


def test_the_strip_form_walks_k_in_steps():
    strips = check_every_sampled_schedule(kernel(1, 33, 192, 16))  # steps of 192, 96, 64, 48 or 32
    assert any(decision[2] > 0 for decision in strips)  # a step shorter than K was taken and checked


@pytest.mark.parametrize("batch", [1, 0], ids=["batch-of-one", "two-dimensional"])
def test_linear_layers_weights_shared_by_the_batch(batch):
    # What Relax legalizes a transformer's Linear into: x[1, tokens, k] @ W[k, n] + bias.
    check_every_sampled_schedule(kernel(batch, 24, 64, 32, weights=True))


def test_the_default_point_computes_the_kernel():
    mod = kernel(1, 65, 96, 48)
    with tvm.target.Target(host_target()):
        scheduled = dlight.ApplyDefaultSchedule(gemm.DefaultMatMul())(mod)
    assert scheduled["main"].attrs["tirx.is_scheduled"]
    arrays = arguments(mod)
    np.testing.assert_allclose(run(scheduled, arrays), run(mod, arrays), rtol=1e-5, atol=1e-5)
    assert "T.parallel" in scheduled.script()


def check_every_sampled_schedule(mod) -> set:
    """Runs both forms at the points eight seeds sample; returns the strip form's decisions."""
    assert gemm.applies(mod)
    arrays = arguments(mod)
    expected = run(mod, arrays)
    decisions, strips = set(), set()
    for seed in range(1, 9):
        registers, strip = gemm.design_spaces(s_tir.Schedule(mod, seed=seed))
        for space in (registers, strip):
            np.testing.assert_allclose(run(space.mod, arrays), expected, rtol=1e-5, atol=1e-5)
            decisions.add(tuple(int(d) for d in space.trace.decisions.values()))
        strips.add(tuple(int(d) for d in strip.trace.decisions.values()))
    assert len(decisions) > 2  # the seeds reached different micro-kernels
    return strips


def test_the_micro_kernel_holds_c_in_a_local_block_under_a_parallel_loop():
    space = gemm.design_spaces(s_tir.Schedule(kernel(1, 64, 48, 96), seed=1))[0]
    script = space.mod.script()
    assert 'scope="local"' in script and "T.parallel" in script and "T.vectorized(8)" in script.replace("T.int64(8)", "8")
    assert "gelu" not in {b.name_hint for b in _blocks(space)}  # the epilogue is computed as C is written


def _blocks(space):
    return [space.get(block) for block in space.get_child_blocks(space.get_sblock("root"))]


@pytest.mark.parametrize("form", [
    dict(transposed_b=True),        # B read as [n, k]: no contiguous row of B per step of K
    dict(producer=True),            # an op fused before the MatMul
], ids=["transposed-b", "producer"])
def test_other_forms_keep_the_generic_space(form):
    assert not gemm.applies(kernel(1, 32, 32, 32, **form))


def test_columns_that_are_not_whole_vectors_keep_the_generic_space():
    assert not gemm.applies(kernel(1, 32, 32, 20))


def test_other_dtypes_keep_the_generic_space():
    a, b = te.placeholder((1, 16, 16), "int32", name="a"), te.placeholder((1, 16, 16), "int32", name="b")
    r = te.reduce_axis((0, 16), name="r")
    c = te.compute((1, 16, 16), lambda x, i, j: te.sum(a[x, i, r] * b[x, r, j], axis=r), name="matmul")
    assert not gemm.applies(tvm.IRModule({"main": te.create_prim_func([a, b, c])}))
    assert gemm.applies(kernel(1, 16, 16, 16, epilogue=False))  # the same in fp32


def test_a_reduction_that_is_not_a_matmul_keeps_the_generic_space():
    x = te.placeholder((4, 32), name="x")
    r = te.reduce_axis((0, 32), name="r")
    total = te.compute((4,), lambda i: te.sum(x[i, r], axis=r), name="sum")
    assert not gemm.applies(tvm.IRModule({"main": te.create_prim_func([x, total])}))
