import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

from edgec.passes.quantize.insert_qdq import InsertQdqOptions, quantizable_activations
from edgec.quantize.calibrate import spread
from edgec.quantize.mixed import Assignment, assign, quantized
from edgec.testing import graph
from edgec.verify import compare, run_model

NAMES = ["exact", "mid", "bad", "last"]
BAD = "bad"  # reads h2, whose range is made 300 times too wide
OPTIONS = InsertQdqOptions()


def chain() -> tuple[ir.Model, dict[str, np.ndarray]]:
    """Four chained MatMuls. The first quantizes exactly: integer inputs in a [0, 255] range (uint8
    scale 1, zero point 0) and integer weights with 127 in every column (int8 scale 1)."""
    rng = np.random.default_rng(0)
    w1 = rng.integers(-20, 21, (8, 8)).astype(np.float32)
    np.fill_diagonal(w1, 127)
    weights = {"w1": w1, **{f"w{i}": rng.standard_normal((8, 8)).astype(np.float32) / 8 for i in (2, 3, 4)}}
    zeros = "{" + ",".join(["0"] * 64) + "}"
    m = graph("g (float[N,8] x) => (float[N,8] y)", """
        h1 = MatMul(x, w1)
        h2 = MatMul(h1, w2)
        h3 = MatMul(h2, w3)
        y = MatMul(h3, w4)""", ", ".join(f"float[8,8] {k} = {zeros}" for k in weights))
    for name, array in weights.items():
        m.graph.initializers[name].const_value = ir.tensor(array)
    for node, name in zip(m.graph, NAMES):
        node.name = name
    feeds = {"x": rng.integers(0, 11, (16, 8)).astype(np.float32)}
    return m, feeds


def float_ranges(feeds: dict[str, np.ndarray], m: ir.Model) -> dict[str, tuple[float, float]]:
    """Min and max of each MatMul input, by numpy; x gets [0, 255] so that its quantization is exact."""
    w = {k: v.const_value.numpy().astype(np.float64) for k, v in m.graph.initializers.items()}
    h1 = feeds["x"].astype(np.float64) @ w["w1"]
    h2 = h1 @ w["w2"]
    h3 = h2 @ w["w3"]
    ranges = {"x": (0.0, 255.0)}
    ranges.update({name: (float(a.min()), float(a.max())) for name, a in (("h1", h1), ("h2", h2), ("h3", h3))})
    return ranges


@pytest.fixture(scope="module")
def setup():
    m, feeds = chain()
    assert quantizable_activations(m, OPTIONS) == ["x", "h1", "h2", "h3"]
    ranges = float_ranges(feeds, m)
    low, high = ranges["h2"]
    ranges["h2"] = (300 * low, 300 * high)
    return m, feeds, ranges


def cosines(m: ir.Model, feeds, ranges, exclude: tuple[str, ...]) -> tuple[float, float]:
    """Mean and min output cosine of the model quantized with `exclude` in float, against float."""
    reference = run_model(m, feeds)
    figures = compare(reference, run_model(quantized(m, dataclasses.replace(OPTIONS, exclude=exclude), ranges), feeds))
    return figures["cosine_mean"], figures["cosine_min"]


def precisions(a: Assignment) -> dict[str, str]:
    return {c.node: c.precision for c in a.choices}


def test_budget_zero_quantizes_everything(setup):
    m, feeds, ranges = setup
    a = assign(m, OPTIONS, ranges, feeds, 0.0)
    assert [c.node for c in a.choices] == NAMES  # graph order
    assert precisions(a) == dict.fromkeys(NAMES, "int8")
    assert a.exclude == () and a.budget == 0.0
    assert {c.kind for c in a.choices} == {"linear"}
    assert (a.cosine_mean, a.cosine_min) == pytest.approx(cosines(m, feeds, ranges, ()))
    assert a.cosine_mean < 0.99  # the bad range hurts


def test_full_budget_keeps_all_but_the_exact_op_in_float(setup):
    m, feeds, ranges = setup
    only_exact = quantized(m, dataclasses.replace(OPTIONS, exclude=("mid", "bad", "last")), ranges)
    np.testing.assert_array_equal(run_model(only_exact, feeds)["y"], run_model(m, feeds)["y"])  # the premise
    a = assign(m, OPTIONS, ranges, feeds, 1.0)
    assert precisions(a) == {"exact": "int8", "mid": "fp32", "bad": "fp32", "last": "fp32"}
    assert a.exclude == ("mid", "bad", "last")
    assert a.cosine_mean == 1.0 and a.cosine_min == pytest.approx(1.0, abs=1e-12)
    assert next(c for c in a.choices if c.node == "exact").sensitivity == 0.0


def test_bit_identical_assignment_reports_cosine_min_one(setup):
    m, feeds, ranges = setup
    assert assign(m, OPTIONS, ranges, feeds, 1.0).cosine_min == 1.0


def test_intermediate_budget_keeps_the_most_sensitive_op_in_float(setup):
    m, feeds, ranges = setup
    all_int8 = cosines(m, feeds, ranges, ())[0]
    without_bad = cosines(m, feeds, ranges, (BAD,))[0]
    assert all_int8 < without_bad < 1.0
    budget = without_bad
    a = assign(m, OPTIONS, ranges, feeds, budget)
    assert a.exclude == (BAD,)
    assert precisions(a) == {"exact": "int8", "mid": "int8", "bad": "fp32", "last": "int8"}
    assert a.cosine_mean >= budget and a.budget == budget
    assert (a.cosine_mean, a.cosine_min) == pytest.approx(cosines(m, feeds, ranges, a.exclude))
    # Just above what keeping the bad op alone reaches, a second op must stay in float too.
    stricter = assign(m, OPTIONS, ranges, feeds, (without_bad + 1.0) / 2)
    assert BAD in stricter.exclude and len(stricter.exclude) >= 2
    assert stricter.cosine_mean >= (without_bad + 1.0) / 2


def test_sensitivity_is_the_error_of_the_op_quantized_alone(setup):
    m, feeds, ranges = setup
    a = assign(m, OPTIONS, ranges, feeds, 0.0)
    sensitivity = {c.node: c.sensitivity for c in a.choices}
    assert all(s >= 0 for s in sensitivity.values())
    assert max(sensitivity, key=sensitivity.get) == BAD
    assert sensitivity[BAD] > 10 * max(s for n, s in sensitivity.items() if n != BAD)
    others = tuple(n for n in NAMES if n != BAD)
    picked = spread(min(len(v) for v in feeds.values()), 8)
    assert sensitivity[BAD] == pytest.approx(1 - cosines(m, {k: v[picked] for k, v in feeds.items()}, ranges, others)[0])


def test_sensitivities_are_measured_on_samples_spread_over_the_data_only(setup):
    m, feeds, ranges = setup
    samples = min(len(v) for v in feeds.values())
    assert samples > 3
    few = assign(m, OPTIONS, ranges, feeds, 0.0, sensitivity_samples=2)
    ends = {k: v[[0, samples - 1]] for k, v in feeds.items()}  # the first sample and the last
    heads = {k: v[:2] for k, v in feeds.items()}
    differ = 0
    for choice in few.choices:
        others = tuple(n for n in NAMES if n != choice.node)
        assert choice.sensitivity == pytest.approx(1 - cosines(m, ends, ranges, others)[0], abs=1e-9)
        differ += choice.sensitivity != pytest.approx(1 - cosines(m, heads, ranges, others)[0], abs=1e-9)
    assert differ  # the first two samples would have measured otherwise


def test_ops_the_user_excluded_are_no_choice(setup):
    m, feeds, ranges = setup
    options = dataclasses.replace(OPTIONS, exclude=(BAD,))
    a = assign(m, options, ranges, feeds, 0.0)
    assert [c.node for c in a.choices] == ["exact", "mid", "last"]
    assert a.exclude == ()  # the compile adds the user's own exclude to these
    assert a.cosine_mean > 0.99


def test_progress_is_reported(setup):
    m, feeds, ranges = setup
    calls = []
    # A budget all-int8 keeps (its cosine depends on the CPU's int8 kernel: 0.24 with AVX-512 VNNI).
    budget = cosines(m, feeds, ranges, ())[0] / 2
    a = assign(m, OPTIONS, ranges, feeds, budget, progress=lambda done, total, message: calls.append((done, total, message)))
    measuring = [(d, t) for d, t, msg in calls if msg == "measuring int8 sensitivity"]
    assert measuring == [(i, len(NAMES)) for i in range(len(NAMES) + 1)]
    choosing = [(d, t) for d, t, msg in calls if msg == "placing ops at int8"]
    assert choosing and all(1 <= d <= t for d, t in choosing)
    assert {msg for _, _, msg in calls} == {"measuring int8 sensitivity", "placing ops at int8"}
    assert a.exclude == ()


# --- the ladder: int8, int16 (A16W8), fp16, fp32 ---------------------------------------------------------

def score(m, feeds, ranges, precisions: dict[str, str]) -> float:
    """Mean output cosine with ops at the given rungs (the others int8)."""
    def at(rung):
        return tuple(n for n, p in precisions.items() if p == rung)
    options = dataclasses.replace(OPTIONS, exclude=at("fp32"), wide=at("int16"), half=at("fp16"))
    return compare(run_model(m, feeds), run_model(quantized(m, options, ranges), feeds))["cosine_mean"]


def test_int16_rung_takes_the_op_int8_cannot_hold(setup):
    m, feeds, ranges = setup
    # The bad op at int16 or in float, the others int8: both about 0.9995 (their order is noise).
    budget = min(score(m, feeds, ranges, {BAD: "int16"}), score(m, feeds, ranges, {BAD: "fp32"}))
    assert score(m, feeds, ranges, {}) < budget
    two_rungs = assign(m, OPTIONS, ranges, feeds, budget)
    assert two_rungs.exclude == (BAD,)  # without int16 the op goes to float
    a = assign(m, OPTIONS, ranges, feeds, budget, ladder=("int8", "int16", "fp32"))
    assert precisions(a) == {"exact": "int8", "mid": "int8", "bad": "int16", "last": "int8"}
    assert a.exclude == () and a.at("int16") == (BAD,) and a.counts() == {"int8": 3, "int16": 1, "fp32": 0}
    assert a.cosine_mean == pytest.approx(score(m, feeds, ranges, {BAD: "int16"}))
    bad = next(c for c in a.choices if c.node == BAD)
    assert set(bad.sensitivities) == {"int8", "int16"} and bad.sensitivities["int16"] < bad.sensitivities["int8"] / 100
    # Only the ops int8 could not hold are measured at int16.
    assert all(set(c.sensitivities) == {"int8"} for c in a.choices if c.node != BAD)
    assert a.options(OPTIONS).wide == (BAD,) and a.options(OPTIONS).exclude == ()


def test_fp16_rung_and_what_still_needs_float(setup):
    m, feeds, ranges = setup
    half_bad = score(m, feeds, ranges, {BAD: "fp16"})
    a = assign(m, OPTIONS, ranges, feeds, half_bad, ladder=("int8", "fp16", "fp32"))
    assert a.at("fp16") == (BAD,) and a.exclude == ()
    # A budget no fp16 op meets (bit-identical output) sends every op int8 cannot hold to fp32.
    exact = assign(m, OPTIONS, ranges, feeds, 1.0, ladder=("int8", "int16", "fp16", "fp32"))
    assert precisions(exact) == {"exact": "int8", "mid": "fp32", "bad": "fp32", "last": "fp32"}
    assert all(set(c.sensitivities) == {"int8", "int16", "fp16"} for c in exact.choices if c.node != "exact")


def test_embedding_skips_the_int16_rung():
    rng = np.random.default_rng(0)
    table, w = rng.standard_normal((16, 8)).astype(np.float32), rng.standard_normal((8, 4)).astype(np.float32)
    m = graph("g (int64[N,S] ids) => (float[N,S,4] y)", "h = Gather(t, ids)\n y = MatMul(h, w)",
              "float[16,8] t = {" + ",".join(["0"] * 128) + "}, float[8,4] w = {" + ",".join(["0"] * 32) + "}")
    m.graph.initializers["t"].const_value, m.graph.initializers["w"].const_value = ir.tensor(table), ir.tensor(w)
    feeds = {"ids": rng.integers(0, 16, (4, 6))}
    h = table[feeds["ids"]]
    a = assign(m, OPTIONS, {"h": (float(h.min()), float(h.max()))}, feeds, 1.0, ladder=("int8", "int16", "fp16", "fp32"))
    by_kind = {c.kind: c for c in a.choices}
    assert set(by_kind["embedding"].sensitivities) == {"int8", "fp16"}
    assert by_kind["embedding"].precision == "fp32"


def test_ladder_out_of_order_is_refused(setup):
    m, feeds, ranges = setup
    with pytest.raises(ValueError, match="ladder"):
        assign(m, OPTIONS, ranges, feeds, 0.5, ladder=("fp16", "int8", "fp32"))
