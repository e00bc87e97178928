"""FLOPs and bytes per node: fused attention counts the work it fuses, a gather the rows it reads."""

import numpy as np
import onnx_ir as ir
import pytest

from edgec import ir as eir
from edgec.analysis.cost import model_cost
from edgec.passes.core import PassContext
from edgec.passes.manager import PassManager
from edgec.pruning import estimate_ms
from edgec.targets import get_target
from edgec.testing import graph
from edgec.verify import run_model

MS_HEADER = '<ir_version: 10, opset_import: ["" : 20, "com.microsoft" : 1]>\n'
B, S = 2, 5  # batch and sequence of every test graph: 10 rows of hidden state


def _flops(signature: str, body: str, header: str = MS_HEADER, **bindings) -> dict[str, float]:
    return _op_flops(graph(signature, body, header=header), **bindings)


def _op_flops(model: ir.Model, **bindings) -> dict[str, float]:
    return {node.op_type: node.flops for node in model_cost(eir.clone(model), bindings or None).nodes}


def _weighted(signature: str, body: str, **arrays: np.ndarray) -> ir.Model:
    """A graph whose named float weights are initializers with these contents (quantizers need them)."""
    inits = ", ".join(f"float[{','.join(map(str, a.shape))}] {name} = {{{','.join(['0'] * a.size)}}}"
                      for name, a in arrays.items())
    model = graph(signature, body, inits, header=MS_HEADER)
    for name, array in arrays.items():
        model.graph.initializers[name].const_value = ir.tensor(array.astype(np.float32))
    return model


def _random(*shape, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(0).normal(size=shape).astype(dtype)


def test_onnxruntime_attention_counts_its_packed_projection_and_its_core():
    flops = _flops(f"g (float[{B},{S},16] x, float[16,48] w, float[48] b) => (float[{B},{S},16] y)",
                   "y = com.microsoft.Attention <num_heads: int = 2> (x, w, b)")
    projection = 2 * B * S * 16 * 48
    core = 2 * B * S * S * (16 + 16)  # Q·Kᵀ over the Q width, then the weighted sum over the V width
    assert flops["Attention"] == projection + core


def test_the_attention_core_follows_the_inner_widths_not_the_hidden_state():
    # Half the heads gone: the projection has half the columns, Q/K/V half the width.
    flops = _flops(f"g (float[{B},{S},16] x, float[16,24] w, float[24] b) => (float[{B},{S},8] y)",
                   "y = com.microsoft.Attention <num_heads: int = 1> (x, w, b)")
    assert flops["Attention"] == 2 * B * S * 16 * 24 + 2 * B * S * S * (8 + 8)
    flops = _flops(f"g (float[{B},{S},16] x, float[16,32] w, float[32] b) => (float[{B},{S},16] y)",
                   "y = com.microsoft.Attention <num_heads: int = 2, qkv_hidden_sizes: ints = [8, 8, 16]> (x, w, b)")
    assert flops["Attention"] == 2 * B * S * 16 * 32 + 2 * B * S * S * (8 + 16)


def test_multi_head_and_function_attention_count_the_core_over_the_keys():
    flops = _flops(f"g (float[{B},{S},16] q, float[{B},7,16] k, float[{B},7,8] v) => (float[{B},{S},8] y)",
                   "y = com.microsoft.MultiHeadAttention <num_heads: int = 2> (q, k, v)")
    assert flops["MultiHeadAttention"] == 2 * B * S * 7 * (16 + 8)
    # [B, heads, S, head_dim], as lower-attention{form=sdpa} calls its function (body not counted)
    flops = _flops(f"g (float[{B},3,{S},4] q, float[{B},3,7,4] k, float[{B},3,7,6] v) => (float[{B},3,{S},6] y)",
                   "y = ai.edgec.ScaledDotProductAttention (q, k, v)",
                   header='<ir_version: 10, opset_import: ["" : 20, "ai.edgec" : 1]>\n')
    assert flops["ScaledDotProductAttention"] == 2 * (B * 3 * S) * 7 * (4 + 6)


def test_integer_matmuls_count_as_matmuls():
    flops = _flops(f"g (uint8[{B},{S},16] a, int8[16,8] w, float[1] sa, float[1] sw) => (float[{B},{S},8] y)",
                   "y = com.microsoft.MatMulIntegerToFloat (a, w, sa, sw)")
    assert flops["MatMulIntegerToFloat"] == 2 * B * S * 8 * 16


def test_a_gather_reads_the_rows_it_returns_not_its_whole_table():
    cost = model_cost(graph(f"g (float[30000,16] table, int64[{B},{S}] ids) => (float[{B},{S},16] y)",
                            "y = Gather (table, ids)"))
    rows = B * S * 16 * 4
    assert cost.nodes[0].bytes == 2 * rows + B * S * 8  # rows read, rows written, the indices


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_the_lowered_estimate_falls_with_the_heads(zoo_model, exporter):
    """Lowered for onnxruntime on x86-64 (fused Attention), what removing heads saves is their share of
    the attention's work: half the heads of every layer gone, half its FLOPs."""
    from edgec.backends.onnxruntime import OnnxRuntimeBackend
    from edgec.frontends.onnx import load_onnx

    target = get_target("x86-64")
    lowering = OnnxRuntimeBackend().lowering_pipeline(target, "fp32")
    model = load_onnx(zoo_model("bert", exporter))
    PassManager("cleanup", PassContext()).run(model)
    pruned = eir.clone(model)
    PassManager("remove-attention-heads{heads=0.0:0.1:1.0:1.1,reconstruct=false},cleanup", PassContext()).run(pruned)
    bindings = {"batch": 4, "*": 32}

    def attention_flops(m) -> float:
        lowered = eir.clone(m)
        PassManager(lowering, PassContext(target=target)).run(lowered)
        nodes = model_cost(lowered, bindings).nodes
        # Every GEMM is counted, the O projection reading the fused op's output too.
        assert all(n.flops > 0 for n in nodes if n.op_type in ("MatMul", "Gemm"))
        return sum(n.flops for n in nodes if n.op_type == "Attention")

    assert attention_flops(pruned) == pytest.approx(attention_flops(model) / 2) and attention_flops(model) > 0
    assert estimate_ms(pruned, target, "fp32", bindings, lowering) < estimate_ms(model, target, "fp32", bindings, lowering)
    # The copy is lowered, not the model itself.
    assert "Attention" not in {node.op_type for node in pruned.graph}


def test_a_sum_adds_each_input_after_the_first():
    flops = _flops(f"g (float[{B},{S},8] a, float[{B},{S},8] b, float[8] c) => (float[{B},{S},8] y)", "y = Sum(a, b, c)")
    assert flops["Sum"] == 2 * B * S * 8


# --- onnxruntime's contrib ops: each runs in onnxruntime (CPU) where it can, and counts as the float graph it
# replaces. Their outputs are left without a shape (`float[]`), as onnx infers none for com.microsoft ops.

@pytest.mark.parametrize("quantizer", ["MatMulNBits", "MatMulBnb4"])
def test_weight_only_quantized_matmuls_count_the_matmul_they_replace(quantizer):
    from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    before = _weighted(f"g (float[{B},{S},64] a) => (float[{B},{S},32] y)", "y = MatMul(a, w)", w=_random(64, 32))
    if quantizer == "MatMulNBits":
        q = MatMulNBitsQuantizer(eir.to_proto(before), bits=4, block_size=32, is_symmetric=True)
    else:
        q = MatMulBnb4Quantizer(eir.to_proto(before), MatMulBnb4Quantizer.NF4, 32)
    q.process()
    after = ir.from_proto(q.model.model)
    assert run_model(after, {"a": _random(B, S, 64)}, optimize=False)["y"].shape == (B, S, 32)
    assert _op_flops(before)["MatMul"] == _op_flops(after)[quantizer] == 2 * B * S * 64 * 32


@pytest.mark.parametrize("op, signature, body, feeds", [
    ("MatMulIntegerToFloat", f"g (uint8[{B},{S},16] a, int8[16,8] w, float sa, float sw) => (float[] y)",
     "y = com.microsoft.MatMulIntegerToFloat (a, w, sa, sw)",
     {"a": np.ones((B, S, 16), np.uint8), "w": np.ones((16, 8), np.int8), "sa": np.array(0.1, np.float32), "sw": np.array(0.1, np.float32)}),
    ("DynamicQuantizeMatMul", f"g (float[{B},{S},16] a, int8[16,8] w, float sw) => (float[] y)",
     "y = com.microsoft.DynamicQuantizeMatMul (a, w, sw)",
     {"a": _random(B, S, 16), "w": np.ones((16, 8), np.int8), "sw": np.array(0.1, np.float32)}),
    ("FusedMatMul", f"g (float[{B},16,{S}] a, float[8,16] w) => (float[] y)",
     "y = com.microsoft.FusedMatMul <transA: int = 1, transB: int = 1> (a, w)",
     {"a": _random(B, 16, S), "w": _random(8, 16)}),
], ids=["MatMulIntegerToFloat", "DynamicQuantizeMatMul", "FusedMatMul"])
def test_matmuls_without_an_output_shape_count_from_their_inputs(op, signature, body, feeds):
    # As onnxruntime's quantizer and optimizer write them: onnx infers no output shape for these ops.
    model = graph(signature, body, header=MS_HEADER)
    assert run_model(model, feeds, optimize=False)["y"].shape == (B, S, 8)
    assert _op_flops(model)[op] == 2 * B * S * 16 * 8


def test_quantized_attention_counts_as_the_attention_it_quantizes(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    before = _weighted(f"g (float[{B},{S},16] x) => (float[{B},{S},16] y)",
                       "y = com.microsoft.Attention <num_heads: int = 2> (x, w, b)", w=_random(16, 48), b=_random(48))
    quantize_dynamic(eir.to_proto(before), tmp_path / "q.onnx", weight_type=QuantType.QInt8)
    after = ir.load(tmp_path / "q.onnx")
    assert [n.op_type for n in after.graph] == ["DynamicQuantizeLinear", "QAttention"]
    assert run_model(after, {"x": _random(B, S, 16)}, optimize=False)["y"].shape == (B, S, 16)
    projection, core = 2 * B * S * 16 * 48, 2 * B * S * S * (16 + 16)
    assert _op_flops(before)["Attention"] == _op_flops(after)["QAttention"] == projection + core


# One sequence (onnxruntime's CPU kernel takes a batch of one when new tokens meet cached ones) of
# 3 new tokens after 6 cached, 4 query heads in 2 groups, head_dim 16 (its rotary needs a multiple of 16).
GQ_S, GQ_PAST, GQ_HEADS, GQ_KV_HEADS, GQ_DIM = 3, 6, 4, 2, 16
GQ_CORE = 2 * GQ_S * (GQ_PAST + GQ_S) * GQ_HEADS * GQ_DIM * 2  # Q·Kᵀ, then the weighted sum of V


def _group_query_attention(packed: bool, rotary: bool) -> tuple[ir.Model, dict[str, np.ndarray]]:
    q_width, kv_width = GQ_HEADS * GQ_DIM, GQ_KV_HEADS * GQ_DIM
    past, total = f"float[1,{GQ_KV_HEADS},{GQ_PAST},{GQ_DIM}]", GQ_PAST + GQ_S
    signature = ([f"float[1,{GQ_S},{q_width + 2 * kv_width}] q"] if packed else
                 [f"float[1,{GQ_S},{q_width}] q", f"float[1,{GQ_S},{kv_width}] k", f"float[1,{GQ_S},{kv_width}] v"])
    signature += [f"{past} pk", f"{past} pv", "int32[1] seqlens", "int32 total"]
    signature += [f"float[{total},{GQ_DIM // 2}] cos", f"float[{total},{GQ_DIM // 2}] sin"] if rotary else []
    inputs = "q, , , " if packed else "q, k, v, "
    model = graph(f"g ({', '.join(signature)}) => (float[] y, float[] present_k, float[] present_v)",
                  f"y, present_k, present_v = com.microsoft.GroupQueryAttention <num_heads: int = {GQ_HEADS}, "
                  f"kv_num_heads: int = {GQ_KV_HEADS}, do_rotary: int = {int(rotary)}> "
                  f"({inputs}pk, pv, seqlens, total{', cos, sin' if rotary else ''})", header=MS_HEADER)
    feeds = {v.name: _random(*v.shape) for v in model.graph.inputs if v.dtype == ir.DataType.FLOAT}
    feeds |= {"seqlens": np.array([total - 1], np.int32), "total": np.array(total, np.int32)}
    return model, feeds


@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])
def test_group_query_attention_counts_its_core_over_cached_and_new_keys(packed):
    model, feeds = _group_query_attention(packed, rotary=False)
    outputs = run_model(model, feeds, optimize=False)
    assert outputs["y"].shape == (1, GQ_S, GQ_HEADS * GQ_DIM)
    assert outputs["present_k"].shape == (1, GQ_KV_HEADS, GQ_PAST + GQ_S, GQ_DIM)
    assert _op_flops(model)["GroupQueryAttention"] == GQ_CORE
    # The same attention decomposed, K and V already concatenated after the cache and repeated to the query heads.
    heads, keys = f"1,{GQ_HEADS}", GQ_PAST + GQ_S
    decomposed = graph(
        f"g (float[{heads},{GQ_S},{GQ_DIM}] q, float[{heads},{GQ_PAST},{GQ_DIM}] pk, float[{heads},{GQ_S},{GQ_DIM}] k, "
        f"float[{heads},{keys},{GQ_DIM}] v) => (float[{heads},{GQ_S},{GQ_DIM}] y)",
        """keys = Concat <axis: int = 2> (pk, k)
        kt = Transpose <perm: ints = [0, 1, 3, 2]> (keys)
        scores = MatMul(q, kt)
        p = Softmax <axis: int = -1> (scores)
        y = MatMul(p, v)""")
    assert sum(n.flops for n in model_cost(decomposed).nodes if n.op_type == "MatMul") == GQ_CORE


def test_group_query_attention_adds_its_rotary_on_q_and_k():
    model, feeds = _group_query_attention(packed=False, rotary=True)
    assert run_model(model, feeds, optimize=False)["y"].shape == (1, GQ_S, GQ_HEADS * GQ_DIM)
    assert _op_flops(model)["GroupQueryAttention"] == GQ_CORE + 3 * GQ_S * (GQ_HEADS + GQ_KV_HEADS) * GQ_DIM


def test_multi_head_attention_counts_its_cached_keys():
    heads, dim, past = 2, 8, 6
    model = graph(f"g (float[{B},{S},16] q, float[{B},{S},16] k, float[{B},{S},16] v, float[{B},{heads},{past},{dim}] pk, "
                  f"float[{B},{heads},{past},{dim}] pv) => (float[] y, float[] present_k, float[] present_v)",
                  "y, present_k, present_v = com.microsoft.MultiHeadAttention <num_heads: int = 2> (q, k, v, , , , pk, pv)",
                  header=MS_HEADER)
    feeds = {v.name: _random(*v.shape) for v in model.graph.inputs}
    assert run_model(model, feeds, optimize=False)["present_k"].shape == (B, heads, past + S, dim)
    assert _op_flops(model)["MultiHeadAttention"] == 2 * B * S * (past + S) * (16 + 16)
    # Packed [B, keys, heads, 2, head_dim] K/V (onnxruntime runs it on CUDA only): keys are its dim 1.
    flops = _flops(f"g (float[{B},{S},16] q, float[{B},7,{heads},2,{dim}] kv) => (float[] y)",
                   "y = com.microsoft.MultiHeadAttention <num_heads: int = 2> (q, kv)")
    assert flops["MultiHeadAttention"] == 2 * B * S * 7 * (16 + 16)


def test_decoder_masked_attention_counts_the_shared_cache_it_attends_over():
    heads, dim, buffer = 2, 8, 10  # the cache is one buffer of `buffer` positions for past and present
    model = graph(f"g (float[{B},1,16] q, float[{B},1,16] k, float[{B},1,16] v, float[{B},{heads},{buffer},{dim}] pk, "
                  f"float[{B},{heads},{buffer},{dim}] pv, int32[1] past_length) => "
                  "(float[] y, float[] present_k, float[] present_v)",
                  "y, present_k, present_v = com.microsoft.DecoderMaskedMultiHeadAttention "
                  "<num_heads: int = 2, past_present_share_buffer: int = 1> (q, k, v, , , pk, pv, past_length)",
                  header=MS_HEADER)
    feeds = {v.name: _random(*v.shape) for v in model.graph.inputs if v.dtype == ir.DataType.FLOAT}
    assert run_model(model, feeds | {"past_length": np.array([4], np.int32)}, optimize=False)["y"].shape == (B, 1, 16)
    # The keys attended (past_length + 1 at run time) are bounded by the buffer, which is what is counted.
    assert _op_flops(model)["DecoderMaskedMultiHeadAttention"] == 2 * B * 1 * buffer * (16 + 16)


def test_quantized_gemm_counts_as_the_gemm():
    quantized = graph("g (uint8[5,16] a, float as, uint8 az, int8[8,16] b, float bs, int8 bz, int32[8] c) => (float[] y)",
                      "y = com.microsoft.QGemm <transB: int = 1> (a, as, az, b, bs, bz, c)", header=MS_HEADER)
    feeds = {"a": np.ones((5, 16), np.uint8), "as": np.array(0.1, np.float32), "az": np.array(0, np.uint8),
             "b": np.ones((8, 16), np.int8), "bs": np.array(0.1, np.float32), "bz": np.array(0, np.int8),
             "c": np.zeros(8, np.int32)}
    assert run_model(quantized, feeds, optimize=False)["y"].shape == (5, 8)
    flops = _flops("g (float[5,16] a, float[8,16] b, float[8] c) => (float[5,8] y)", "y = Gemm <transB: int = 1> (a, b, c)")
    assert _op_flops(quantized)["QGemm"] == flops["Gemm"] == 2 * 5 * 16 * 8


def test_gemm_fast_gelu_counts_its_gemm_bias_and_gelu():
    # onnxruntime implements GemmFastGelu for ROCm only, so this one is counted, not run.
    fused = _flops(f"g (float[{B},{S},16] x, float[16,8] w, float[8] bias) => (float[] y)",
                   "y = com.microsoft.GemmFastGelu (x, w, bias)")
    parts = _flops(f"g (float[{B},{S},16] x, float[16,8] w, float[8] bias) => (float[{B},{S},8] y)",
                   "h = MatMul(x, w)\nb = Add(h, bias)\ny = com.microsoft.FastGelu(b)")
    assert fused["GemmFastGelu"] == sum(parts.values()) == 2 * B * S * 16 * 8 + (1 + 10) * B * S * 8


def test_rotary_embedding_counts_a_rotation_per_element():
    model = graph(f"g (float[{B},{S},32] x, int64[{B},{S}] pos, float[16,8] cos, float[16,8] sin) => (float[] y)",
                  "y = com.microsoft.RotaryEmbedding <num_heads: int = 2> (x, pos, cos, sin)", header=MS_HEADER)
    feeds = {"x": _random(B, S, 32), "pos": np.zeros((B, S), np.int64), "cos": _random(16, 8), "sin": _random(16, 8)}
    assert run_model(model, feeds, optimize=False)["y"].shape == (B, S, 32)
    assert _op_flops(model)["RotaryEmbedding"] == 3 * B * S * 32


def test_a_block_quantized_gather_reads_the_rows_it_returns_not_its_whole_table():
    # 100 rows of 32 4-bit values, two to a byte, with a scale per block of 16.
    model = graph(f"g (uint8[100,16] table, int64[{B},{S}] ids, float[100,2] scales) => (float[{B},{S},32] y)",
                  "y = com.microsoft.GatherBlockQuantized <bits: int = 4, block_size: int = 16> (table, ids, scales)",
                  header=MS_HEADER)
    feeds = {"table": np.full((100, 16), 0x21, np.uint8), "ids": np.arange(B * S).reshape(B, S),
             "scales": np.ones((100, 2), np.float32)}
    assert run_model(model, feeds, optimize=False)["y"].shape == (B, S, 32)
    cost = model_cost(model)
    rows = B * S
    assert cost.nodes[0].flops == 0
    # the packed rows and their scales read, the ids, the rows written
    assert cost.nodes[0].bytes == rows * 16 + rows * 2 * 4 + rows * 8 + rows * 32 * 4


@pytest.mark.parametrize("signature, body", [
    ("g (float[] a, uint8[32,2,16] w, float[32,2] sc) => (float[] y)",
     "y = com.microsoft.MatMulNBits <K: int = 64, N: int = 32, bits: int = 4, block_size: int = 32> (a, w, sc)"),
    ("g (float[] q, float[] k, float[] v) => (float[] y, float[] pk, float[] pv)",
     "y, pk, pv = com.microsoft.GroupQueryAttention <num_heads: int = 4, kv_num_heads: int = 2> (q, k, v)"),
    ("g (uint8[] x, int8[16,48] w, float[48] b, float s, float ws) => (float[] y)",
     "y = com.microsoft.QAttention <num_heads: int = 2> (x, w, b, s, ws)"),
    ("g (uint8[] a, float as, uint8 az, int8[8,16] b, float bs, int8 bz) => (float[] y)",
     "y = com.microsoft.QGemm (a, as, az, b, bs, bz)"),
    ("g (float[] x, float[16,8] w) => (float[] y)", "y = com.microsoft.GemmFastGelu (x, w)"),
    ("g (float[] x, int64[1,5] pos, float[16,8] cos, float[16,8] sin) => (float[] y)",
     "y = com.microsoft.RotaryEmbedding (x, pos, cos, sin)"),
], ids=["MatMulNBits", "GroupQueryAttention", "QAttention", "QGemm", "GemmFastGelu", "RotaryEmbedding"])
def test_a_contrib_op_whose_input_shape_is_unknown_counts_nothing(signature, body):
    assert list(_flops(signature, body).values()) == [0.0]
