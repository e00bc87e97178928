"""Norms, activations and feed-forward blocks: every zoo export's found with the config's sizes and
epsilons, norms proven by execution, and hand-built near-misses left unrecognised."""

import numpy as np
import pytest
import zoo

from edgec.analysis import AnalysisCache
from edgec.analysis.structure import check_norm, find_activations, find_feed_forward, find_norms
from edgec.frontends.onnx import load_onnx
from edgec.passes.manager import run_pipeline
from edgec.testing import parse

_GELU = {"bert", "distilbert", "roberta", "vit", "electra", "deit"}
_GELU_TANH = {"gpt2", "albert"}  # gelu_new


def _expected(arch: str) -> tuple[list[int], str, float | None]:
    """(intermediate size of each FFN block, activation kind, norm epsilon) from the transformers config."""
    config = zoo.zoo_config(arch)
    if arch == "mobilevit":
        # One MLP per transformer layer: three stages of 2, 4 and 3 layers, each mlp_ratio times its width.
        sizes = [int(size * config.mlp_ratio) for size, depth in zip(config.hidden_sizes, (2, 4, 3)) for _ in range(depth)]
        return sizes, "silu", config.layer_norm_eps
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", None) or config.n_layer
    intermediate = (getattr(config, "intermediate_size", None) or getattr(config, "hidden_dim", None)
                    or config.n_inner or 4 * config.n_embd)
    # MobileBERT stacks num_feedforward_networks MLPs per layer, and normalizes with NoNorm (an
    # elementwise affine, not a normalization): it has no norm to find.
    blocks = layers * getattr(config, "num_feedforward_networks", 1)
    epsilon = getattr(config, "rms_norm_eps", None) or getattr(config, "layer_norm_eps", None) or getattr(config, "layer_norm_epsilon", None)
    if arch == "distilbert":
        epsilon = 1e-12  # fixed in DistilBERT's code, not in its config
    if arch == "mobilebert":
        epsilon = None
    activation = {"llama": "silu", "mobilebert": "relu"}.get(arch) or ("gelu_tanh" if arch in _GELU_TANH else "gelu")
    return [intermediate] * blocks, activation, epsilon


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
@pytest.mark.parametrize("arch", zoo.ARCHS)
def test_zoo_structure_is_recognised(zoo_model, arch, exporter):
    model = load_onnx(zoo_model(arch, exporter))
    run_pipeline(model, "cleanup")
    cache = AnalysisCache()
    sizes, activation, epsilon = _expected(arch)
    blocks = cache.get("ffn", model)
    assert [b.intermediate for b in blocks] == sizes
    assert {b.activation for b in blocks} == {activation}
    assert {b.gated for b in blocks} == {arch == "llama"}
    for b in blocks:
        assert b.up.node in b.nodes and b.down.node in b.nodes
        assert (b.gate is not None) == (arch == "llama")
    activations = cache.get("activations", model)
    if arch in _GELU:
        # torchscript writes GELU's erf arithmetic; dynamo writes the Gelu op.
        assert {(a.kind, a.form) for a in activations} == {("gelu", "decomposed" if exporter == "torchscript" else "op")}
    norms = cache.get("norms", model)
    assert norms.unrecognised == []
    if epsilon is None:
        assert len(norms) == 0
        return
    assert len(norms) > 0
    assert all(n.epsilon == pytest.approx(epsilon, rel=1e-5) for n in norms)
    assert {(n.kind, n.form) for n in norms} == ({("rmsnorm", "decomposed")} if arch == "llama" else {("layernorm", "op")})
    assert check_norm(model, norms.norms[0], np.random.default_rng(0)) < 1e-5


_WIDTH = 8
_WEIGHTS = f"""
    gamma = Constant<value = float[{_WIDTH}] {{{", ".join(f"{0.5 + i / 10}" for i in range(_WIDTH))}}}>()
    beta = Constant<value = float[{_WIDTH}] {{{", ".join(f"{i / 7}" for i in range(_WIDTH))}}}>()
    last = Constant<value = int64[1] {{-1}}>()
    middle = Constant<value = int64[1] {{1}}>()
    two = Constant<value = float {{2.0}}>()
    eps = Constant<value = float {{1e-5}}>()
"""


def _norm_graph(body: str) -> str:
    return f"""
<ir_version: 10, opset_import: ["" : 20]>
g (float[2,4,{_WIDTH}] x) => (float[2,4,{_WIDTH}] y) {{{_WEIGHTS}{body}}}
"""


LAYERNORM = """
    m = ReduceMean(x, last)
    c = Sub(x, m)
    sq = Pow(c, two)
    var = ReduceMean(sq, last)
    ve = Add(var, eps)
    sd = Sqrt(ve)
    n = Div(c, sd)
    s = Mul(n, gamma)
    y = Add(s, beta)
"""

RMSNORM = """
    sq = Mul(x, x)
    var = ReduceMean(sq, last)
    ve = Add(eps, var)
    sd = Sqrt(ve)
    r = Reciprocal(sd)
    n = Mul(x, r)
    y = Mul(gamma, n)
"""


@pytest.mark.parametrize("body, kind", [(LAYERNORM, "layernorm"), (RMSNORM, "rmsnorm")])
def test_hand_built_norm_is_recognised_and_proven(body, kind):
    model = parse(_norm_graph(body))
    (norm,) = find_norms(model).norms
    assert (norm.kind, norm.form, norm.axis, norm.input, norm.output) == (kind, "decomposed", -1, "x", "y")
    assert norm.epsilon == pytest.approx(1e-5) and norm.weight == "gamma"
    assert norm.bias == ("beta" if kind == "layernorm" else None)
    assert check_norm(model, norm, np.random.default_rng(0)) < 1e-5


@pytest.mark.parametrize("body, reason", [
    (LAYERNORM.replace("var = ReduceMean(sq, last)", "var = ReduceMean(sq, middle)"),
     "the mean of squares is not over the last axis alone"),
    (LAYERNORM.replace("m = ReduceMean(x, last)", "m = ReduceMean(x, middle)"),
     "the mean subtracted is not over the last axis alone"),
    (LAYERNORM.replace("    sd = Sqrt(ve)\n", "").replace("Div(c, sd)", "Div(c, ve)"),
     "the variance plus epsilon is not square-rooted"),
    (RMSNORM.replace("n = Mul(x, r)", "n = Mul(sq, r)"), "the inverse square root does not multiply the value"),
])
def test_norm_near_misses_say_why(body, reason):
    found = find_norms(parse(_norm_graph(body)))
    assert found.norms == []
    assert [why for _, why in found.unrecognised] == [reason]


def _mlp(body: str) -> str:
    up = ", ".join(f"{(i % 5) / 10}" for i in range(4 * 8))
    down = ", ".join(f"{(i % 3) / 10}" for i in range(8 * 4))
    return f"""
<ir_version: 10, opset_import: ["" : 20]>
g (float[2,3,4] x, float[2,3,8] other) => (float[2,3,4] y) {{
    wu = Constant<value = float[4,8] {{{up}}}>()
    wd = Constant<value = float[8,4] {{{down}}}>()
    h = MatMul(x, wu){body}    y = MatMul(a, wd)
}}
"""


GELU_ERF = """
    root2 = Constant<value = float {1.4142135}>()
    one = Constant<value = float {1.0}>()
    half = Constant<value = float {0.5}>()
    d = Div(h, root2)
    e = Erf(d)
    p = Add(one, e)
    hh = Mul(half, h)
    a = Mul(p, hh)
"""


def test_gelu_in_another_association_is_an_ffn():
    model = parse(_mlp(GELU_ERF))
    (activation,) = find_activations(model)
    assert (activation.kind, activation.form, activation.input, activation.output) == ("gelu", "decomposed", "h", "a")
    (block,) = find_feed_forward(model)
    assert (block.hidden, block.intermediate, block.activation, block.gated) == (4, 8, "gelu", False)
    assert (block.up.weight, block.down.weight, block.input, block.output) == ("wu", "wd", "x", "y")


@pytest.mark.parametrize("body", [
    "\n    s = Sigmoid(other)\n    a = Mul(h, s)\n",  # x * Sigmoid(y), y != x: not SiLU
    GELU_ERF.replace("hh = Mul(half, h)", "hh = Mul(half, other)"),  # 0.5 * y * (1 + erf(x / sqrt2))
    GELU_ERF.replace("1.4142135", "2.0"),
])
def test_activation_near_misses_are_not_recognised(body):
    model = parse(_mlp(body))
    assert find_activations(model) == []
    assert find_feed_forward(model) == []


def test_inspect_json_lists_norms_and_ffn(zoo_model):
    from edgec.commands import inspect_model

    info = inspect_model(str(zoo_model("llama", "dynamo")))
    assert [(n["kind"], n["form"], n["epsilon"]) for n in info["norms"]] == [("rmsnorm", "decomposed", pytest.approx(1e-6))] * 5
    assert [(f["intermediate"], f["activation"], f["gated"]) for f in info["ffn"]] == [(128, "silu", True)] * 2
    assert all(n["nodes"] for n in info["norms"] + info["ffn"])
