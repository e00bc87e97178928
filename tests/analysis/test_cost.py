"""FLOPs and bytes per node: fused attention counts the work it fuses, a gather the rows it reads."""

import pytest

from edgec import ir as eir
from edgec.analysis.cost import model_cost
from edgec.passes.core import PassContext
from edgec.passes.manager import PassManager
from edgec.pruning import estimate_ms
from edgec.targets import get_target
from edgec.testing import graph

MS_HEADER = '<ir_version: 10, opset_import: ["" : 20, "com.microsoft" : 1]>\n'
B, S = 2, 5  # batch and sequence of every test graph: 10 rows of hidden state


def _flops(signature: str, body: str, header: str = MS_HEADER, **bindings) -> dict[str, float]:
    cost = model_cost(graph(signature, body, header=header), bindings or None)
    return {node.op_type: node.flops for node in cost.nodes}


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
