"""Pass infrastructure: pipelines as text, options, fixpoint groups, debug counter, instruments, analyses."""

from dataclasses import dataclass

import numpy as np
import pytest

from edgec.errors import UserError
from edgec.passes.core import DebugCounter, Pass, PassContext, PassResult
from edgec.passes.instruments import PassBrokeModel, PrintAfterChange, VerifyAfterEachPass
from edgec.passes.manager import PassManager
from edgec.passes.registry import PASSES, FixPoint, format_pipeline, parse_pipeline, register_pass
from edgec.testing import parse

MODEL = """
<ir_version: 10, opset_import: ["" : 20]>
g (float[N,4] x) => (float[N,4] y) {
  a = Identity(x)
  b = Identity(a)
  y = Relu(b)
}
"""


@dataclass
class _Opts:
    ratio: float = 0.5
    keep: bool = False
    names: tuple[str, ...] = ()
    mode: str = "fast"


class DropOneIdentity(Pass):
    """Removes the first Identity it finds (one per run, to exercise fixpoint)."""

    name = "test-drop-one-identity"
    Options = _Opts

    def run(self, model, ctx):
        for node in list(model.graph):
            if node.op_type == "Identity" and ctx.allow(self.name):
                node.outputs[0].replace_all_uses_with(node.inputs[0])
                model.graph.remove(node, safe=True)
                return PassResult(model, True, {"identities_removed": 1})
        return PassResult(model, False)


class BreakNumerics(Pass):
    """Turns Relu into Neg: a pass with a bug, for the verify instrument."""

    name = "test-break-numerics"

    def run(self, model, ctx):
        for node in model.graph:
            if node.op_type == "Relu":
                node.op_type = "Neg"
                return PassResult(model, True)
        return PassResult(model, False)


register_pass(DropOneIdentity)
register_pass(BreakNumerics)


def test_parse_pipeline_with_options_round_trips():
    items = parse_pipeline("test-drop-one-identity{ratio=0.25,keep=true,names=a:b,mode=slow}")
    (p,) = items
    assert p.options == _Opts(ratio=0.25, keep=True, names=("a", "b"), mode="slow")
    assert format_pipeline(items) == "test-drop-one-identity{ratio=0.25,keep=true,names=a:b,mode=slow}"
    assert parse_pipeline(format_pipeline(items))[0].options == p.options


def test_unknown_pass_lists_valid_names():
    with pytest.raises(UserError) as err:
        parse_pipeline("test-drop-one-identity,no-such-pass")
    assert "no-such-pass" in str(err.value) and "test-drop-one-identity" in str(err.value)


def test_unknown_option_lists_valid_options():
    with pytest.raises(UserError) as err:
        parse_pipeline("test-drop-one-identity{ratoi=0.3}")
    msg = str(err.value)
    assert "ratoi" in msg and "ratio" in msg and "keep" in msg


def test_bad_option_value_is_user_error():
    with pytest.raises(UserError, match="ratio"):
        parse_pipeline("test-drop-one-identity{ratio=lots}")


@pytest.mark.parametrize("text", ["", "a,,b", "test-drop-one-identity{ratio=1", "fixpoint(test-drop-one-identity"])
def test_malformed_pipeline_is_user_error(text):
    with pytest.raises(UserError):
        parse_pipeline(text)


def test_fixpoint_runs_until_nothing_changes():
    model = parse(MODEL)
    result = PassManager("fixpoint(test-drop-one-identity)").run(model)
    assert [n.op_type for n in result.model.graph] == ["Relu"]
    assert [r.modified for r in result.records] == [True, True, False]
    (row,) = result.summary()
    assert row["runs"] == 3 and row["stats"]["identities_removed"] == 2 and row["nodes_removed"] == 2
    assert isinstance(parse_pipeline("fixpoint(test-drop-one-identity)")[0], FixPoint)


def test_debug_counter_stops_after_n_rewrites():
    model = parse(MODEL)
    ctx = PassContext(counter=DebugCounter.parse("test-drop-one-identity=1"))
    result = PassManager("fixpoint(test-drop-one-identity)", ctx).run(model)
    assert [n.op_type for n in result.model.graph] == ["Identity", "Relu"]


def test_debug_counter_syntax_error():
    with pytest.raises(UserError, match="PASS=N"):
        DebugCounter.parse("cse")


def test_print_after_change_dumps_only_changes(tmp_path):
    model = parse(MODEL)
    ctx = PassContext(instruments=[PrintAfterChange(dump_dir=tmp_path)])
    PassManager("fixpoint(test-drop-one-identity)", ctx).run(model)
    dumps = sorted(p.name for p in tmp_path.iterdir())
    assert dumps == ["001-test-drop-one-identity.txt", "002-test-drop-one-identity.txt"]
    assert "Relu" in (tmp_path / dumps[-1]).read_text()


def test_verify_after_each_pass_names_the_pass_that_broke_numerics():
    from edgec.verify import run_model

    model = parse(MODEL)
    feeds = {"x": np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)}
    ctx = PassContext(instruments=[VerifyAfterEachPass(feeds, run_model(model, feeds))])
    with pytest.raises(PassBrokeModel, match="test-break-numerics"):
        PassManager("test-drop-one-identity,test-break-numerics", ctx).run(model)


def test_analyses_are_cached_and_invalidated():
    from edgec.analysis import AnalysisCache

    model = parse(MODEL)
    cache = AnalysisCache()
    first = cache.get("cost", model)
    assert cache.get("cost", model) is first
    ctx = PassContext(analyses=cache)
    PassManager("test-drop-one-identity", ctx).run(model)
    assert "cost" not in cache.cached()


def test_pass_rejects_options_object_and_kwargs_together():
    with pytest.raises(TypeError):
        DropOneIdentity(_Opts(), ratio=0.1)


def test_registry_rejects_duplicate_names():
    with pytest.raises(UserError, match="already registered"):
        register_pass(DropOneIdentity)
    assert "test-drop-one-identity" in PASSES
