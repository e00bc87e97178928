"""Helpers shared by the structured-pruning tests: a hand-built attention layer and FFN layer (with their
numpy meaning, units zeroed on request), cleaned zoo models cached per (arch, exporter), and the error
of a pruned model against the original at the real tokens."""

import functools

import numpy as np
import onnx_ir as ir
import zoo
from onnx import TensorProto, helper

from edgec import ir as eir
from edgec.frontends.onnx import load_onnx
from edgec.ir.constants import constant_array
from edgec.passes.core import PassContext
from edgec.passes.manager import PassManager
from edgec.passes.prune.common import CALIBRATION_FEEDS_KEY
from edgec.verify import run_model, token_mask

HIDDEN, HEADS, HEAD_DIM = 8, 4, 2
INTERMEDIATE = 6
LOWEST = np.finfo(np.float32).min


def _tensor(name: str, array: np.ndarray):
    kind = TensorProto.FLOAT if array.dtype == np.float32 else TensorProto.INT64
    return helper.make_tensor(name, kind, array.shape, array.reshape(-1).tolist())


def _model(nodes, inputs, inits: dict) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [_tensor(k, v) for k, v in inits.items()])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10))
    PassManager("cleanup", PassContext()).run(model)  # shapes and names, as every compile has them
    return model


# --- one attention layer: 4 heads of 2, y = x + O(attention(x)) -------------------------------------------

def attention_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {f"w{r}": (rng.standard_normal((HIDDEN, HIDDEN)) * (1.5 if r in "qk" else 1.0)).astype(np.float32) for r in "qkvo"}
    w.update({f"b{r}": rng.standard_normal(HIDDEN).astype(np.float32) for r in "qkvo"})
    return w


def attention_layer(mask_shape: tuple | None = ("B", 1, 1, "S"), seed: int = 0) -> ir.Model:
    """x [B, S, 8] (and an additive mask of `mask_shape`, None for none) -> y = x + attention."""
    nodes = []
    for r in "qkv":
        nodes += [helper.make_node("MatMul", ["x", f"w{r}"], [f"{r}0"]),
                  helper.make_node("Add", [f"{r}0", f"b{r}"], [f"{r}1"]),
                  helper.make_node("Reshape", [f"{r}1", "split"], [f"{r}2"]),
                  helper.make_node("Transpose", [f"{r}2"], [f"{r}3"], perm=[0, 2, 1, 3])]
    nodes += [helper.make_node("Transpose", ["k3"], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q3", "kt"], ["s0"]),
              helper.make_node("Div", ["s0", "root"], ["s1"])]
    nodes += [helper.make_node("Add", ["s1", "mask"], ["s2"])] if mask_shape else \
        [helper.make_node("Identity", ["s1"], ["s2"])]
    nodes += [helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v3"], ["a0"]),
              helper.make_node("Transpose", ["a0"], ["a1"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["a1", "merge"], ["a2"]),
              helper.make_node("MatMul", ["a2", "wo"], ["o0"]),
              helper.make_node("Add", ["o0", "bo"], ["o1"]),
              helper.make_node("Add", ["x", "o1"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", HIDDEN])]
    if mask_shape:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, list(mask_shape)))
    inits = dict(attention_weights(seed), split=np.array([0, 0, HEADS, HEAD_DIM], np.int64),
                 merge=np.array([0, 0, HIDDEN], np.int64), root=np.array(np.sqrt(HEAD_DIM), np.float32))
    return _model(nodes, inputs, inits)


def attention_feeds(batch: int = 2, sequence: int = 5, seed: int = 1, mask: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {"x": rng.standard_normal((batch, sequence, HIDDEN)).astype(np.float32)}
    if mask:
        keep = np.ones((batch, 1, 1, sequence), bool)
        keep[0, ..., -2:] = False  # the first sample's last two tokens are padding
        feeds["mask"] = np.where(keep, 0.0, LOWEST).astype(np.float32)
    return feeds


def attention_reference(feeds: dict, removed_heads=(), seed: int = 0) -> np.ndarray:
    """The layer in float64 numpy with the context vectors of `removed_heads` zeroed before O."""
    w = {k: v.astype(np.float64) for k, v in attention_weights(seed).items()}
    x = feeds["x"].astype(np.float64)

    def split(t):
        return t.reshape(*t.shape[:2], HEADS, HEAD_DIM).transpose(0, 2, 1, 3)

    q, k, v = (split(x @ w[f"w{r}"] + w[f"b{r}"]) for r in "qkv")
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(HEAD_DIM)
    if "mask" in feeds:
        scores = scores + feeds["mask"].astype(np.float64)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    context = (p / p.sum(-1, keepdims=True)) @ v  # [B, H, S, D]
    context[:, list(removed_heads)] = 0.0
    merged = context.transpose(0, 2, 1, 3).reshape(*x.shape[:2], HIDDEN)
    return x + merged @ w["wo"] + w["bo"]


def head_columns(heads) -> np.ndarray:
    return np.concatenate([np.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in heads])


# --- one feed-forward layer: y = x + W2·act(W1·x + b1) + b2 -------------------------------------------------

def ffn_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w1": rng.standard_normal((HIDDEN, INTERMEDIATE)).astype(np.float32),
            "b1": rng.standard_normal(INTERMEDIATE).astype(np.float32),
            "w2": rng.standard_normal((INTERMEDIATE, HIDDEN)).astype(np.float32),
            "b2": rng.standard_normal(HIDDEN).astype(np.float32)}


def ffn_layer(activation: str = "Relu", seed: int = 0, extra_reader: bool = False) -> ir.Model:
    """`activation` None: no activation between the two MatMuls. `extra_reader`: the activation's
    output is read by a second node too (added to y)."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"])]
    hidden = "h1"
    if activation:
        nodes.append(helper.make_node(activation, ["h1"], ["h2"]))
        hidden = "h2"
    nodes += [helper.make_node("MatMul", [hidden, "w2"], ["d0"]), helper.make_node("Add", ["d0", "b2"], ["d1"])]
    if extra_reader:
        nodes += [helper.make_node("ReduceSum", [hidden, "axes"], ["r0"], keepdims=1),
                  helper.make_node("Add", ["x", "d1"], ["y0"]), helper.make_node("Add", ["y0", "r0"], ["y"])]
    else:
        nodes.append(helper.make_node("Add", ["x", "d1"], ["y"]))
    inits = dict(ffn_weights(seed))
    if extra_reader:
        inits["axes"] = np.array([-1], np.int64)
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", HIDDEN])], inits)


def ffn_feeds(batch: int = 2, sequence: int = 5, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, sequence, HIDDEN)).astype(np.float32)}


def ffn_reference(feeds: dict, removed=(), seed: int = 0, activation: str = "Relu") -> np.ndarray:
    w = {k: v.astype(np.float64) for k, v in ffn_weights(seed).items()}
    x = feeds["x"].astype(np.float64)
    h = x @ w["w1"] + w["b1"]
    if activation == "Relu":
        h = np.maximum(h, 0.0)
    else:
        from math import erf
        h = 0.5 * h * (1 + np.vectorize(erf)(h / np.sqrt(2)))
    h[..., list(removed)] = 0.0
    return x + h @ w["w2"] + w["b2"]


# --- the zoo ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _cleaned(path) -> ir.Model:
    model = load_onnx(path)
    PassManager("cleanup", PassContext()).run(model)
    return model


def cleaned(path) -> ir.Model:
    """The zoo model at `path` after cleanup (a fresh copy, the caller's to change)."""
    return eir.clone(_cleaned(path))


def initializer(model: ir.Model, name: str) -> np.ndarray:
    return constant_array(model.graph.initializers[name])


def calibrated(feeds) -> PassContext:
    return PassContext(options={CALIBRATION_FEEDS_KEY: feeds})


def errors_with_and_without_refit(make_pass, path, stat: str, expected: int, arch: str = "bert") -> dict[bool, float]:
    """The held-out relative error of the zoo model at `path` pruned by `make_pass(reconstruct=...)`
    (which must remove `expected` units, its stat `stat`), without and with the refit."""
    original = cleaned(path)
    calibration = zoo.zoo_inputs(arch, path, batch=32, seed=1)
    held_out = zoo.zoo_inputs(arch, path, batch=8, seed=2)
    errors = {}
    for reconstruct in (False, True):
        model = eir.clone(original)
        result = make_pass(reconstruct=reconstruct)(model, calibrated(calibration))
        assert result.stats[stat] == expected
        errors[reconstruct] = relative_error(original, model, held_out)
    return errors


def relative_error(reference: ir.Model, pruned: ir.Model, feeds: dict) -> float:
    """Norm of the first output's error over the norm of the original's, at the real tokens."""
    ref = next(iter(run_model(reference, feeds).values())).astype(np.float64)
    out = next(iter(run_model(pruned, feeds).values())).astype(np.float64)
    mask = token_mask(feeds)
    if mask is not None and ref.shape[:2] == mask.shape:
        ref, out = ref[mask], out[mask]
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


ARCHS = zoo.ARCHS
