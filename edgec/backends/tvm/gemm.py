"""The design space of MatMul kernels on CPUs: register-blocked micro-kernels, searched by MetaSchedule.

MetaSchedule's generic multi-level tiling samples five tile levels per axis, where a few hundred
trials rarely land on the form fast CPU GEMMs share (the GotoBLAS micro-kernel): an `mr` x `nr` block
of C held in vector registers while the K loop broadcasts one element of A per row and loads `nr`
contiguous elements of B per step, `nr` a multiple of the vector width. On MiniLM's FFN MatMuls
(128x384x1536 and back) its best after 900 trials took 2.3-2.5 ms here, onnxruntime's MLAS 1.0-1.1 ms,
and this space's best 1.0-1.3 ms. It fixes that structure and leaves the numbers to the search:

- `mr` rows and `nr` = `nv` x 8 columns per micro-kernel (mr x nv accumulators: 8-12 fit AVX2's 16
  registers and NEON's 32; more spill, which the measurements show);
- `registers`: each (batch, column block, row block) is one parallel task that keeps its C block in
  registers over all of K; `strip`: each (batch, column block) is a task that walks K in `kc` steps
  outside the row blocks, so a kc x nr panel of B is reused by every row block while it is in cache,
  and the task's M x nr column of C is kept in a local buffer between steps (what paid for the FFN
  down-projection, K = 1536).

The kernel's elementwise epilogue (bias, GELU, residual Add) is computed when the C block is written.
Kernels of another form (no fp32 MatMul, a producer fused before it such as a transpose, B read as
[n, k], a column count that is not a multiple of the vector width, symbolic extents) keep
MetaSchedule's generic space. Kernels that no tuning record covers (a target edgec cannot measure
on, a budget of 0) get the space's default point, `DEFAULT_ROWS` x `DEFAULT_VECTORS` in registers,
instead of TVM's untuned loop nest.
"""

from __future__ import annotations

from tvm import IRModule, s_tir, tirx
from tvm.s_tir import dlight
from tvm.tirx import IterVar

VECTOR = 8        # fp32 lanes of an AVX2 register; two NEON registers
ROWS = (2, 4, 6, 8)
VECTORS = (1, 2, 3, 4)
MIN_KC = 32
# The default point: within 10% of the best of the space on MiniLM's QKV and FFN-up MatMuls here.
DEFAULT_ROWS, DEFAULT_VECTORS = 4, 3


class NotAMatMul(Exception):
    """The kernel is not of the form this space schedules (an fp32 MatMul, B[..., k, n], whole vectors
    of columns, static extents, an elementwise epilogue)."""


def applies(mod: IRModule) -> bool:
    """Whether `mod` (one PrimFunc, "main") is a kernel this space schedules."""
    try:
        design_spaces(s_tir.Schedule(mod))
    except (NotAMatMul, s_tir.ScheduleError):
        return False
    return True


def design_spaces(sch: s_tir.Schedule) -> list[s_tir.Schedule]:
    """The `registers` and `strip` forms of the kernel in `sch`, micro-kernel sizes sampled."""
    spaces = []
    for strip in (False, True):
        space = sch.copy()
        spaces.append(_schedule(space, strip, lambda name, candidates, space=space: space.sample_categorical(
            list(candidates), [1 / len(candidates)] * len(candidates))))
    return spaces


class DefaultMatMul(dlight.ScheduleRule):
    """A dlight rule: the space's default point for the kernels the space takes, None for others."""

    def apply(self, func: tirx.PrimFunc, target, tunable: bool):
        mod = IRModule({"main": func})
        if not applies(mod):  # the kernels tuning would give this space, no others
            return None
        return _schedule(s_tir.Schedule(mod), False, _default)


def _default(name: str, candidates) -> int:
    """The registers form's default point: the largest candidate up to the default."""
    wanted = {"rows": DEFAULT_ROWS, "vectors": DEFAULT_VECTORS}[name]
    return max(c for c in candidates if c <= wanted)  # rows and vectors both offer 1 or 2


def _analyse(sch):
    """The MatMul block, its epilogue blocks in order, and the extents (M, N, K)."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    reductions = [b for b in blocks if any(v.iter_type == IterVar.CommReduce for v in sch.get(b).iter_vars)]
    if len(reductions) != 1:
        raise NotAMatMul("not one reduction")
    matmul = reductions[0]
    if not sch.get(blocks[0]).same_as(sch.get(matmul)):
        raise NotAMatMul("a producer is fused before the MatMul")
    block = sch.get(matmul)
    kinds = [v.iter_type for v in block.iter_vars]
    if len(kinds) < 3 or kinds[-1] != IterVar.CommReduce or any(k != IterVar.DataPar for k in kinds[:-1]):
        raise NotAMatMul("iterators are not (spatial..., m, n, k)")
    if len(sch.get_loops(matmul)) != len(kinds):
        raise NotAMatMul("loops do not match iterators")
    m, n, k = (v.var for v in block.iter_vars[-3:])
    reads = [r for r in block.reads if not r.source.same_as(block.writes[0].source)]
    if len(reads) != 2 or not _indexed_by(reads[0], (m, k)) or not _indexed_by(reads[1], (k, n)):
        raise NotAMatMul("operands are not A[..., m, k] and B[..., k, n]")
    if block.writes[0].source.dtype != "float32":
        raise NotAMatMul("not fp32: the vector width is counted in fp32 lanes")
    if not all(isinstance(v.dom.extent, tirx.IntImm) for v in block.iter_vars):
        raise NotAMatMul("symbolic extents")
    extents = [int(v.dom.extent) for v in block.iter_vars[-3:]]
    if extents[1] % VECTOR:
        raise NotAMatMul("columns are not a multiple of the vector width")
    for epilogue in blocks[1:]:
        if any(v.iter_type != IterVar.DataPar for v in sch.get(epilogue).iter_vars):
            raise NotAMatMul("the epilogue is not elementwise")
    return matmul, list(blocks[1:]), extents


def _indexed_by(region, variables) -> bool:
    """Whether the region's last two indices are exactly `variables` (single points)."""
    if len(region.region) < 2:
        return False
    last = region.region[-2:]
    return all(isinstance(r.extent, tirx.IntImm) and r.extent.value == 1 and r.min.same_as(v)
               for r, v in zip(last, variables))


def _schedule(sch, strip: bool, choose):
    """The kernel in the `registers` or `strip` form; `choose(name, candidates)` picks each size."""
    matmul, epilogue, (rows, columns, depth) = _analyse(sch)
    for block in epilogue[:-1]:
        sch.compute_inline(block)
    *batch, m, n, k = sch.get_loops(matmul)

    mr = choose("rows", [r for r in ROWS if r <= rows] or [rows])
    nv = choose("vectors", [v for v in VECTORS if (columns // VECTOR) % v == 0])
    mo, mi = sch.split(m, [None, mr])
    no, nvl, lanes = sch.split(n, [None, nv, VECTOR])
    if strip:
        steps = [depth // d for d in (1, 2, 3, 4, 6, 8, 12, 16) if depth % d == 0 and depth // d >= MIN_KC]
        kc = choose("depth", steps or [depth])
        ko, ki = sch.split(k, [None, kc])
        sch.reorder(*batch, no, ko, mo, ki, mi, nvl, lanes)
        task = sch.fuse(*batch, no)
        reduction_outer = ko
    else:
        sch.reorder(*batch, no, mo, k, mi, nvl, lanes)
        task = sch.fuse(*batch, no, mo)
        reduction_outer = k
    sch.parallel(task)
    # C's part of the task lives in a local buffer (registers, in the registers form) and is written,
    # epilogue applied, once the task's K loop is done.
    write = sch.cache_write(matmul, 0, "local")
    sch.reverse_compute_at(write, task)
    if epilogue:
        sch.reverse_compute_inline(epilogue[-1])
    *_, column = sch.get_loops(write)
    sch.vectorize(column)
    sch.unroll(mi)
    sch.unroll(nvl)
    sch.vectorize(lanes)
    sch.decompose_reduction(matmul, reduction_outer)
    return sch
