"""LayerNorm pieces and zoo checks shared by the fusion tests: the decomposed LayerNorm as TorchScript
and hand-written modules spell it, and the cleaned zoo models the fusions are checked on."""

import functools

import numpy as np
import onnx_ir as ir

from edgec import ir as eir
from edgec.frontends.onnx import load_onnx
from edgec.passes.core import PassContext
from edgec.passes.manager import PassManager
from edgec.testing import assert_numerically_equal
from edgec.verify import generate_inputs

W = 8
GAMMA = ", ".join(f"{0.5 + i / 10}" for i in range(W))
BETA = ", ".join(f"{i / 7 - 0.5:.6f}" for i in range(W))
CONSTANTS = "int64[1] last = {-1}, float two = {2.0}, float eps = {1e-5}"


def decomposed(x: str = "x", y: str = "y", k: str = "") -> str:
    """x - mean, over the root of the mean square plus epsilon, scaled and shifted: how TorchScript
    and hand-written modules spell LayerNorm (`k` keeps the names of a second one apart)."""
    return f"""
    m{k} = ReduceMean({x}, last)
    c{k} = Sub({x}, m{k})
    sq{k} = Pow(c{k}, two)
    var{k} = ReduceMean(sq{k}, last)
    ve{k} = Add(var{k}, eps)
    sd{k} = Sqrt(ve{k})
    n{k} = Div(c{k}, sd{k})
    s{k} = Mul(n{k}, gamma)
    {y} = Add(s{k}, beta)
"""


# --- the model zoo -------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _cleaned(path: str, random_biases: bool) -> ir.Model:
    model = load_onnx(path)
    if random_biases:
        _randomize_biases(model)
    PassManager("cleanup", PassContext()).run(model)
    return model


def _randomize_biases(model: ir.Model) -> None:
    """The zoo's random init leaves every bias zero, and cleanup removes Add(x, 0): given values, the
    projections' biases stay for the fusions that fold them (LayerNorm biases get values too)."""
    rng = np.random.default_rng(0)
    for value in model.graph.initializers.values():
        array = value.const_value.numpy()
        if array.ndim == 1 and array.size > 1 and array.dtype == np.float32 and not array.any():
            value.const_value = ir.tensor(rng.normal(0, 0.1, array.shape).astype(array.dtype), name=value.name)


def cleaned_zoo(path, *, random_biases: bool = False) -> ir.Model:
    """A fresh copy of the zoo export at `path` after the cleanup pipeline (cleaned once per process)."""
    return eir.clone(_cleaned(str(path), random_biases))


def check_zoo(model: ir.Model, *passes) -> dict[str, dict[str, int]]:
    """Runs `passes` on the cleaned zoo model: valid IR, the cleaned model's outputs within 1e-4 and
    nothing left to do on a second run. Returns each pass's stats by name."""
    before = eir.clone(model)
    result = PassManager(list(passes), PassContext()).run(model)
    eir.verify(model)
    assert_numerically_equal(before, model, generate_inputs(before), rtol=1e-4, atol=1e-4)
    again = PassManager(list(passes), PassContext()).run(model)
    assert not again.modified, [(r.name, r.stats) for r in again.records if r.modified]
    return {r.name: r.stats for r in result.records}
