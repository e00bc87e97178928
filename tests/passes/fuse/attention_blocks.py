"""Attention blocks for the fusion tests: one written the way exporters write it, and zoo models made
to show what their attention computes."""

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from edgec.analysis.attention import _values_by_name, find_attention
from edgec.ir.constants import constant_array
from edgec.passes.core import PassContext
from edgec.passes.manager import PassManager

HIDDEN, HEADS, HEAD_DIM = 8, 2, 4
RNG = np.random.default_rng(0)
W = {name: RNG.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) for name in ("wq", "wk", "wv", "wo")}
B = {name: RNG.standard_normal(HIDDEN).astype(np.float32) for name in ("bq", "bk", "bv", "bo")}


def _init(name, array):
    return helper.make_tensor(name, TensorProto.FLOAT if array.dtype == np.float32 else TensorProto.INT64,
                              array.shape, array.reshape(-1).tolist())


def _model(nodes, inputs, inits, outputs=("y",)) -> ir.Model:
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [_init(k, v) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    return load_onnx_model(model)


def load_onnx_model(proto: onnx.ModelProto) -> ir.Model:
    model = ir.from_proto(proto)
    PassManager("cleanup", PassContext()).run(model)  # shapes, as every compile has them
    return model


X = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", HIDDEN])
MASK = helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["B", 1, "S", "S"])
KEEP = helper.make_tensor_value_info("keep", TensorProto.BOOL, ["B", 1, "S", "S"])
SPLIT = np.array([0, 0, HEADS, HEAD_DIM], np.int64)
MERGE = np.array([0, 0, HIDDEN], np.int64)


def head_projections() -> list:
    """Q, K and V of x: MatMul, bias Add, split into heads ([B, H, S, D] as q3, k3, v3)."""
    nodes = []
    for role in "qkv":
        nodes += [
            helper.make_node("MatMul", ["x", f"w{role}"], [f"{role}0"]),
            helper.make_node("Add", [f"{role}0", f"b{role}"], [f"{role}1"]),
            helper.make_node("Reshape", [f"{role}1", "split"], [f"{role}2"]),
            helper.make_node("Transpose", [f"{role}2"], [f"{role}3"], perm=[0, 2, 1, 3]),
        ]
    return nodes


def exported_block(mask: str = "additive", fill: float = -3.0e38) -> ir.Model:
    """An attention block the way exporters write it: scale as a Div on the scores, K transposed on its
    own, the mask added (or a Where), heads split and merged with Reshape/Transpose."""
    nodes = head_projections()
    nodes += [
        helper.make_node("Transpose", ["k3"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q3", "kt"], ["s0"]),
        helper.make_node("Div", ["s0", "root"], ["s1"]),
    ]
    if mask == "additive":
        nodes.append(helper.make_node("Add", ["s1", "mask"], ["s2"]))
    elif mask == "boolean":
        nodes.append(helper.make_node("Where", ["keep", "s1", "fill"], ["s2"]))
    else:
        nodes.append(helper.make_node("Identity", ["s1"], ["s2"]))
    nodes += [
        helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v3"], ["a0"]),
        helper.make_node("Transpose", ["a0"], ["a1"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["a1", "merge"], ["a2"]),
        helper.make_node("MatMul", ["a2", "wo"], ["o0"]),
        helper.make_node("Add", ["o0", "bo"], ["y"]),
    ]
    inputs = [X] + {"additive": [MASK], "boolean": [KEEP]}.get(mask, [])
    inits = dict(W, **B, split=SPLIT, merge=MERGE, root=np.array(np.sqrt(HEAD_DIM), np.float32))
    if mask == "boolean":
        inits["fill"] = np.array(fill, np.float32)
    return _model(nodes, inputs, inits)


def feeds(mask: str = "additive", batch: int = 2, sequence: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    keep = np.ones((batch, 1, sequence, sequence), bool)
    keep[0, ..., -2:] = False  # the first sample is padded by two tokens
    out = {"x": rng.standard_normal((batch, sequence, HIDDEN)).astype(np.float32)}
    if mask == "additive":
        out["mask"] = np.where(keep, 0.0, np.finfo(np.float32).min).astype(np.float32)
    elif mask == "boolean":
        out["keep"] = keep
    return out


def sharpen_and_expose(model: ir.Model) -> None:
    """Makes attention matter and shows it: Q and K weights x8 (random-weight softmax is nearly
    uniform), and every block's output becomes a graph output, compared directly (in these tiny models
    attention adds about 1% to the final output, below what a wrong mask or scale would show)."""
    values = _values_by_name(model)
    scaled = set()
    for block in find_attention(model):
        for p in (block.q, block.k):
            if (p.weight, p.columns) in scaled:
                continue
            scaled.add((p.weight, p.columns))
            w = constant_array(values[p.weight]).copy()
            columns = slice(*p.columns) if p.columns else slice(None)
            if p.weight_transposed:
                w[columns, :] *= 8
            else:
                w[:, columns] *= 8
            values[p.weight].const_value = ir.tensor(w, name=p.weight)
        output = values[block.output]
        if not output.is_graph_output():
            model.graph.outputs.append(output)


ARCHS = ("bert", "distilbert", "mobilebert", "roberta", "gpt2", "vit", "mobilevit", "albert", "electra", "llama", "deit")
