import realistic
from edgec import ir as eir
from edgec.passes.manager import run_pipeline


def test_cleanup_pipeline_on_bert_torchscript_export():
    before = realistic.bert()
    result = run_pipeline(eir.clone(before), "cleanup")
    nodes_before, nodes_after = eir.node_count(before), eir.node_count(result.model)
    print(f"cleanup: {nodes_before} -> {nodes_after} nodes")
    for row in result.summary():
        print(f"  {row['pass']:<28} runs={row['runs']} nodes_removed={row['nodes_removed']} {row['stats']}")
    print("  remaining:", dict(eir.op_histogram(result.model).most_common()))
    assert nodes_after < 0.6 * nodes_before
    # What the TorchScript exporter adds around the math is gone ...
    ops = eir.op_histogram(result.model)
    assert ops["Constant"] == 0 and ops["Identity"] == 0
    # ... and the math is all there.
    assert ops["MatMul"] == eir.op_histogram(before)["MatMul"]
    eir.verify(result.model)
    realistic.assert_same_outputs(before, result.model)
    for value in (*result.model.graph.inputs, result.model.graph.outputs[0]):
        assert [d.value for d in value.shape[:2]] == ["batch", "sequence"]
    again = run_pipeline(result.model, "cleanup")
    assert not again.modified, [(r.name, r.stats) for r in again.records if r.modified]
