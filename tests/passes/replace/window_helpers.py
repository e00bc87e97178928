"""Helpers shared by the sliding-window-attention and linear-attention tests.

In the tiny zoo models attention is about 1% of the final output, so the checks read each block's own
output (exposed as a graph output) and scale the Q and K weights up: with near-uniform softmax a wrong
mask or scale would pass unnoticed.
"""

import functools

import numpy as np
import onnx_ir as ir
import zoo
from onnx import TensorProto, helper

from edgec import ir as eir
from edgec.analysis.attention import _values_by_name, block_inputs
from edgec.frontends.onnx import load_onnx
from edgec.ir.constants import constant_array
from edgec.passes.blocks import trusted_blocks
from edgec.passes.core import PassContext
from edgec.passes.manager import PassManager

LOWEST = np.finfo(np.float32).min
HIDDEN, HEADS, HEAD_DIM = 8, 2, 4


def hand_block(mask_shape=("B", 1, "S", "S"), cross: bool = False) -> ir.Model:
    """One attention block as exporters write it (scale on the scores, mask added), cleaned up.
    `cross`: K and V read a second sequence `y`."""
    rng = np.random.default_rng(0)
    inits = {name: rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) * (3.0 if name in ("wq", "wk") else 1.0)
             for name in ("wq", "wk", "wv", "wo")}
    inits.update(split=np.array([0, 0, HEADS, HEAD_DIM], np.int64), merge=np.array([0, 0, HIDDEN], np.int64),
                 root=np.array(np.sqrt(HEAD_DIM), np.float32))
    nodes = []
    for role in "qkv":
        source = "y" if cross and role != "q" else "x"
        nodes += [helper.make_node("MatMul", [source, f"w{role}"], [f"{role}0"]),
                  helper.make_node("Reshape", [f"{role}0", "split"], [f"{role}1"]),
                  helper.make_node("Transpose", [f"{role}1"], [f"{role}2"], perm=[0, 2, 1, 3])]
    nodes += [helper.make_node("Transpose", ["k2"], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q2", "kt"], ["s0"]),
              helper.make_node("Div", ["s0", "root"], ["s1"]),
              helper.make_node("Add", ["s1", "mask"], ["s2"]),
              helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v2"], ["a0"]),
              helper.make_node("Transpose", ["a0"], ["a1"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["a1", "merge"], ["a2"]),
              helper.make_node("MatMul", ["a2", "wo"], ["out"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", HIDDEN])]
    if cross:
        inputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", HIDDEN]))
    inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, list(mask_shape)))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [helper.make_tensor(k, TensorProto.FLOAT if v.dtype == np.float32 else TensorProto.INT64,
                                                  v.shape, v.reshape(-1).tolist()) for k, v in inits.items()])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10))
    PassManager("cleanup", PassContext()).run(model)
    return model


def hand_feeds(batch: int = 2, sequence: int = 7, padded: int = 2, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    keep = np.ones((batch, 1, 1, sequence), bool)
    keep[0, ..., sequence - padded:] = False
    mask = np.broadcast_to(np.where(keep, 0.0, LOWEST), (batch, 1, sequence, sequence))
    return {"x": rng.standard_normal((batch, sequence, HIDDEN)).astype(np.float32),
            "mask": np.ascontiguousarray(mask, dtype=np.float32)}


def probe(path):
    """A copy of `_probe(path)`: the model is the caller's to change."""
    model, blocks, inputs = _probe(path)
    return eir.clone(model), blocks, inputs


@functools.lru_cache(maxsize=None)
def _probe(path):
    """The cleaned zoo model with Q/K weights x8 and every block's inputs and output exposed as graph
    outputs, its proven blocks, and inputs (batch 2, 16 tokens, the second row's last 4 padded)."""
    model = load_onnx(path)
    ctx = PassContext()
    PassManager("cleanup", ctx).run(model)
    blocks, unproven = trusted_blocks(model, ctx)
    assert blocks and unproven == 0
    values = _values_by_name(model)
    for block in blocks:
        for p in (block.q, block.k):  # one fused QKV weight is scaled column range by column range
            value = values[p.weight]
            array = constant_array(value).copy()
            columns = slice(*p.columns) if p.columns else slice(None)
            if p.weight_transposed:
                array[columns, :] *= 8
            else:
                array[:, columns] *= 8
            value.const_value = ir.tensor(array, name=value.name)
    for name in dict.fromkeys(n for block in blocks for n in block_inputs(block) + [block.output]):
        if not values[name].is_graph_output() and not values[name].is_graph_input():
            model.graph.outputs.append(values[name])
    return model, blocks, zoo.zoo_inputs(path.name.split("-")[0], path)


def block_feeds(block, outputs: dict, inputs: dict) -> dict[str, np.ndarray]:
    """What the block read in a run, from the run's outputs (exposed values) and the model inputs."""
    return {name: outputs[name] if name in outputs else inputs[name] for name in block_inputs(block)}


def additive(block, feeds: dict) -> np.ndarray | float:
    if block.mask_value is None:
        return 0.0
    mask = feeds[block.mask_value]
    return np.where(mask, 0.0, LOWEST) if block.mask_form == "boolean" else mask.astype(np.float64)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected.reshape(actual.shape)).max() / np.abs(expected).max())
