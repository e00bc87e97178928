"""Helpers for testing passes (edgec's own and users' plugins): golden graphs, numerics, idempotence."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from edgec import ir as eir
from edgec.passes.core import Pass, PassContext, PassResult


OPSET_HEADER = '<ir_version: 10, opset_import: ["" : 20]>\n'


def graph(signature: str, body: str, inits: str = "", *, header: str = OPSET_HEADER, functions: str = "") -> ir.Model:
    """A model from its pieces in ONNX text: `graph("g (float[N] x) => (float[N] y)", "y = Relu(x)")`."""
    return parse(header + signature + (f"\n<{inits}>" if inits else "") + "\n{\n" + body + "\n}\n" + functions)


def output_names(model: ir.Model) -> list[str]:
    return [v.name for v in model.graph.outputs]


def parse(text: str) -> ir.Model:
    """A model from ONNX textual syntax (`<ir_version: 10, opset_import: ["" : 20]> g (float[N,4] x) => (...) {...}`)."""
    return ir.from_proto(onnx.parser.parse_model(text))


def assert_graph_equal(actual: ir.Model, expected: ir.Model) -> None:
    a, e = eir.structure_key(actual), eir.structure_key(expected)
    if a != e:
        raise AssertionError(
            "graphs differ\n--- actual ---\n" + ir.to_onnx_text(actual) + "\n--- expected ---\n" + ir.to_onnx_text(expected)
        )


def run_pass(pass_: Pass, model: ir.Model, ctx: PassContext | None = None) -> PassResult:
    """Runs the pass on a clone, so the caller's model stays as it was."""
    return pass_(eir.clone(model), ctx or PassContext())


def assert_numerically_equal(before: ir.Model, after: ir.Model, feeds=None, *, rtol=1e-5, atol=1e-5) -> None:
    from edgec.verify import generate_inputs, run_model

    feeds = feeds if feeds is not None else generate_inputs(before)
    ref = run_model(before, feeds, optimize=False)
    out = run_model(after, feeds, optimize=False)
    assert list(ref) == list(out), f"outputs differ: {list(ref)} vs {list(out)}"
    for name in ref:
        np.testing.assert_allclose(out[name], ref[name], rtol=rtol, atol=atol, err_msg=f"output {name}")


def check_pass(pass_: Pass, before: ir.Model, expected: ir.Model | None = None, *, feeds=None, ctx=None) -> PassResult:
    """The four checks every pass owes: golden (or unchanged when `expected` is None), valid IR,
    numeric equivalence in onnxruntime, and idempotence."""
    result = run_pass(pass_, before, ctx)
    eir.verify(result.model)
    if expected is None:
        assert not result.modified, f"{pass_.name} changed a graph it should leave alone"
        assert_graph_equal(result.model, before)
    else:
        assert result.modified, f"{pass_.name} reported no change"
        assert_graph_equal(result.model, expected)
    assert_numerically_equal(before, result.model, feeds)
    again = pass_(result.model, ctx or PassContext())
    assert not again.modified, f"{pass_.name} is not idempotent: a second run changed the model again"
    return result
