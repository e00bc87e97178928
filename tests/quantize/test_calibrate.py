import math
import os

import numpy as np
import pytest

import zoo
from edgec import verify
from edgec.frontends.onnx import load_onnx
from edgec.passes.core import PassContext
from edgec.passes.manager import PassManager
from edgec.quantize import DTYPES, METHODS, Calibration, calibrate
from edgec.quantize.calibrate import _KL_SMOOTHING, _histogram_edges, _kl_bins, _sq_error
from edgec.testing import graph

IDENTITY = graph("g (float[N,D] x) => (float[N,D] y)", "y = Identity(x)")
# Elementwise ops and a MatMul: each sample's values do not depend on the others in its batch.
SMALL = graph(
    "g (float[N,4] x) => (float[N,3] out)",
    "a = Mul(x, w)\n r = Relu(a)\n out = MatMul(r, m)",
    "float[4] w = {1, -2, 3, -4}, float[4,3] m = {1, 0, 2, -1, 0.5, 0, 0, 1, 1, 2, 0, -3}",
)


def _x(samples=16, seed=0):
    return np.random.default_rng(seed).standard_normal((samples, 4)).astype(np.float32)


def _data(values: np.ndarray, **kwargs) -> Calibration:
    """Statistics of `values` (rows are samples), fed through an Identity so the model path runs."""
    return calibrate(IDENTITY, ["y"], {"x": values.astype(np.float32)}, **kwargs)


# --- what is collected -------------------------------------------------------------------------


def test_min_max_and_channels_of_activations_inputs_and_initializers():
    x = _x()
    cal = calibrate(SMALL, ["a", "r", "out", "x", "w"], {"x": x})
    a = x * np.array([1, -2, 3, -4], np.float32)
    expected = {"a": a, "r": np.maximum(a, 0), "x": x, "w": np.array([1, -2, 3, -4], np.float32)}
    expected["out"] = verify.run_model(SMALL, {"x": x}, optimize=False)["out"]
    assert cal.samples == 16 and list(cal.stats) == ["a", "r", "out", "x", "w"]
    for name, arr in expected.items():
        st = cal.stats[name]
        assert (st.min, st.max) == (float(arr.min()), float(arr.max())), name
        assert st.channel_absmax.dtype == np.float64 and st.channel_absmax.shape == (arr.shape[-1],)
        np.testing.assert_array_equal(st.channel_absmax, np.abs(arr).reshape(-1, arr.shape[-1]).max(axis=0))
        assert st.histogram.dtype == np.int64 and st.histogram.sum() == arr.size
        assert len(st.edges) == len(st.histogram) + 1 == 2 * 2048 + 1
        limit = st.edges[-1]
        assert limit > np.abs(arr).max() >= limit / 2 and math.log2(limit).is_integer()
        expected_hist, _ = np.histogram(arr, bins=st.edges)
        np.testing.assert_array_equal(st.histogram, expected_hist)


def test_scalar_has_no_channels_and_all_zero_tensor_gets_zero_range():
    model = graph("g (float[N,2] x) => (float s, float[N,2] z)", "s = ReduceSum<keepdims=0>(x)\n z = Mul(x, zero)", "float zero = {0}")
    cal = calibrate(model, ["s", "z"], {"x": np.ones((3, 2), np.float32)})
    assert cal.stats["s"].channel_absmax is None and cal.stats["s"].min == cal.stats["s"].max == 6.0
    assert cal.stats["z"].histogram.sum() == 6 and not cal.stats["z"].edges.any()
    for method in METHODS:
        assert cal.ranges(method)["z"] == (0.0, 0.0)


def test_nonfinite_intermediate_values_are_counted_and_left_out():
    model = graph("g (float[N,2] x) => (float[N,2] y)", "y = Log(x)")
    cal = calibrate(model, ["y"], {"x": np.array([[0.0, 1.0], [np.e, 0.5]], np.float32)})
    st = cal.stats["y"]
    assert st.nonfinite == 1 and st.histogram.sum() == 3
    assert st.min == pytest.approx(np.log(0.5)) and st.max == pytest.approx(1.0)
    assert np.isfinite(st.channel_absmax).all()


def test_integer_inputs_and_fixed_batch_dimension():
    model = graph("g (int64[1,3] ids) => (float[1,3] y)", "y = Cast<to=1>(ids)")
    ids = np.arange(15, dtype=np.int64).reshape(5, 3)
    cal = calibrate(model, ["ids", "y"], {"ids": ids}, batch_size=4)  # the model only takes batches of 1
    assert cal.samples == 5
    assert (cal.stats["ids"].min, cal.stats["ids"].max) == (cal.stats["y"].min, cal.stats["y"].max) == (0.0, 14.0)


# --- ranges --------------------------------------------------------------------------------------


def test_outliers_are_clipped_by_every_method_but_minmax():
    values = np.random.default_rng(0).standard_normal((1000, 1000))
    values[0, 0] = 1000.0
    cal = _data(values, batch_size=250)
    assert cal.ranges("minmax", dtype="int8")["y"] == (-1000.0, 1000.0)
    for method in ("percentile", "entropy", "mse"):
        low, high = cal.ranges(method, dtype="int8")["y"]
        assert 3.0 < high < 200.0 and low == -high, method


def test_uniform_data_keeps_its_range():
    values = np.random.default_rng(0).uniform(-1.0, 3.0, (500, 200))
    cal = _data(values, batch_size=100)
    for method in METHODS:
        low, high = cal.ranges(method, dtype="uint8")["y"]
        # (MSE trades a sliver of the edges for finer steps: about 0.01 here.)
        assert low == pytest.approx(-1.0, abs=0.02) and high == pytest.approx(3.0, abs=0.02), method
        low, high = cal.ranges(method, dtype="int8")["y"]
        assert high == pytest.approx(3.0, abs=0.02) and low == -high, method


def test_percentile_is_the_quantile_of_the_data():
    values = np.random.default_rng(1).standard_normal((400, 500))
    cal = _data(values, batch_size=100)
    low, high = cal.ranges("percentile", dtype="int8", percentile=99.0)["y"]
    assert high == pytest.approx(np.quantile(np.abs(values.astype(np.float32)), 0.99), rel=2e-3)
    low, high = cal.ranges("percentile", dtype="uint8", percentile=99.0)["y"]
    assert low == pytest.approx(np.quantile(values.astype(np.float32), 0.01), rel=2e-3)
    assert high == pytest.approx(np.quantile(values.astype(np.float32), 0.99), rel=2e-3)


def test_mse_clips_more_when_there_are_fewer_levels():
    values = np.random.default_rng(2).standard_normal((400, 500))
    cal = _data(values, batch_size=100)
    highs = {dtype: cal.ranges("mse", dtype=dtype)["y"][1] for dtype in ("int4", "int8", "int16")}
    # Published optima for a unit gaussian: about 2.5 (4 bits), about 4 (8 bits); 16 bits clips nothing.
    assert 2.2 < highs["int4"] < 2.8 and 3.5 < highs["int8"] < 4.5
    assert highs["int16"] == pytest.approx(np.abs(values.astype(np.float32)).max(), rel=0.01)


def test_one_sided_tensor_has_no_negative_range_and_symmetric_types_mirror():
    cal = calibrate(SMALL, ["r", "a"], {"x": _x(64)})
    for method in METHODS:
        for dtype, (qmin, _) in DTYPES.items():
            for name, (low, high) in cal.ranges(method, dtype=dtype).items():
                assert low <= 0.0 <= high and high > 0.0, (method, dtype, name)
                if qmin < 0:
                    assert low == -high, (method, dtype, name)
                elif name == "r":
                    assert low == 0.0, (method, dtype)


def test_bad_arguments_to_ranges():
    cal = _data(_x())
    with pytest.raises(ValueError, match="unknown calibration method 'kl'"):
        cal.ranges("kl")
    with pytest.raises(ValueError, match="unknown quantized type 'int7'"):
        cal.ranges(dtype="int7")
    with pytest.raises(ValueError, match="percentile"):
        cal.ranges("percentile", percentile=0)


def _kl_reference(hist, levels):
    """TensorRT's entropy calibration spelled out one candidate at a time."""
    kept = np.flatnonzero(hist)[-1] + 1
    if kept <= levels:
        return kept
    h = hist[:kept].astype(float)
    best, best_i = math.inf, kept
    for i in range(levels, kept + 1):
        p = h[:i].copy()
        p[-1] += h[i:].sum()
        support = p > 0
        group = np.arange(i) * levels // i
        q = np.zeros(i)
        for g in range(levels):
            members = group == g
            if support[members].any():
                q[members & support] = h[:i][members].sum() / support[members].sum()
        if q.sum() == 0:
            continue
        q = (1 - _KL_SMOOTHING) * q / q.sum() + _KL_SMOOTHING * support / support.sum()
        p = p / p.sum()
        kl = np.sum(p[support] * np.log(p[support] / q[support]))
        if kl < best:
            best, best_i = kl, i
    return best_i


def test_entropy_threshold_matches_the_one_candidate_at_a_time_definition():
    rng = np.random.default_rng(3)
    for _ in range(20):
        size = int(rng.integers(20, 300))
        hist = rng.integers(0, 50, size) * (rng.random(size) < 0.7)
        hist[-1] = 3
        if rng.random() < 0.5:
            hist[size // 2 : -1] = 0  # a gap before a far outlier
        if rng.random() < 0.3:
            hist[0] = 100_000  # a spike at zero
        levels = int(rng.choice([4, 8, 16]))
        assert _kl_bins(hist, levels) == _kl_reference(hist, levels)


def test_mse_error_model_matches_direct_integration():
    rng = np.random.default_rng(4)
    hist = rng.integers(0, 10, 45) * (rng.random(45) < 0.6)
    width, start, step = 0.37, -20 * 0.37, 0.29
    for lo, hi in [(-5, 7), (-13, 3), (-2, 2)]:
        got = _sq_error(np.array([lo * step]), np.array([hi * step]), np.array([step]), _histogram_edges(hist, start, width))
        points = (np.arange(4000) + 0.5) / 4000 * width
        direct = 0.0
        for k, count in enumerate(hist):
            x = start + k * width + points
            direct += count * np.mean((x - np.clip(np.rint(x / step), lo, hi) * step) ** 2)
        assert got[0] == pytest.approx(direct, rel=1e-6)


# --- determinism, batching, streaming -------------------------------------------------------------


def test_two_runs_are_identical():
    x = _x(32)
    first, second = calibrate(SMALL, ["a", "r", "out"], {"x": x}), calibrate(SMALL, ["a", "r", "out"], {"x": x})
    assert first == second
    for method in METHODS:
        assert first.ranges(method, dtype="int8") == second.ranges(method, dtype="int8")


def test_batch_size_does_not_change_the_statistics():
    x = _x(23)
    x *= np.exp2(np.arange(23, dtype=np.float32) / 2)[:, None]  # every batch is larger: the histogram grows
    one = calibrate(SMALL, ["a", "r", "out", "x"], {"x": x}, batch_size=1)
    assert one == calibrate(SMALL, ["a", "r", "out", "x"], {"x": x}, batch_size=7)
    assert one == calibrate(SMALL, ["a", "r", "out", "x"], {"x": x[::-1].copy()}, batch_size=23)


def test_progress_counts_samples_per_batch():
    calls = []
    calibrate(SMALL, ["a"], {"x": _x(10)}, batch_size=4, progress=lambda done, total, message: calls.append((done, total)))
    assert calls == [(0, 10), (4, 10), (8, 10), (10, 10)]


# --- cache ---------------------------------------------------------------------------------------


def test_cache_hit_does_not_run_the_model(tmp_path, monkeypatch):
    x = _x()
    first = calibrate(SMALL, ["a", "out"], {"x": x}, cache_dir=tmp_path)
    assert not first.from_cache and [p.suffix for p in tmp_path.iterdir()] == [".npz"]

    def refuse(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(verify, "ort_session", refuse)
    messages = []
    again = calibrate(SMALL, ["a", "out"], {"x": x}, cache_dir=tmp_path, progress=lambda d, t, m: messages.append((d, t, m)))
    assert again.from_cache and again == first
    assert len(messages) == 1 and messages[0][:2] == (16, 16) and "cache" in messages[0][2]


def test_cache_misses_when_anything_that_matters_changes(tmp_path):
    x = _x()
    calibrate(SMALL, ["a"], {"x": x}, cache_dir=tmp_path)
    other_weights = graph(
        "g (float[N,4] x) => (float[N,3] out)",
        "a = Mul(x, w)\n r = Relu(a)\n out = MatMul(r, m)",
        "float[4] w = {1, -2, 3, -5}, float[4,3] m = {1, 0, 2, -1, 0.5, 0, 0, 1, 1, 2, 0, -3}",
    )
    changes = [
        (SMALL, ["a"], {"x": x + 1}, {}),
        (SMALL, ["a"], {"x": x}, {"bins": 1024}),
        (SMALL, ["a"], {"x": x}, {"batch_size": 4}),
        (SMALL, ["a", "r"], {"x": x}, {}),
        (other_weights, ["a"], {"x": x}, {}),
    ]
    for model, names, feeds, kwargs in changes:
        assert not calibrate(model, names, feeds, cache_dir=tmp_path, **kwargs).from_cache
    assert len(list(tmp_path.iterdir())) == 1 + len(changes)


def test_damaged_cache_file_is_recomputed(tmp_path):
    first = calibrate(SMALL, ["a"], {"x": _x()}, cache_dir=tmp_path)
    (cached,) = tmp_path.iterdir()
    cached.write_bytes(b"not an npz")
    again = calibrate(SMALL, ["a"], {"x": _x()}, cache_dir=tmp_path)
    assert not again.from_cache and again == first


def test_save_and_load_round_trip(tmp_path):
    cal = calibrate(SMALL, ["a", "r", "x", "w"], {"x": _x()})
    path = cal.save(tmp_path / "stats.npz")
    assert os.listdir(tmp_path) == ["stats.npz"]  # the temporary file was renamed, not left behind
    loaded = Calibration.load(path)
    assert loaded == cal and loaded.samples == 16
    assert loaded.ranges("entropy", dtype="int8") == cal.ranges("entropy", dtype="int8")
    (tmp_path / "other.npz").write_bytes(b"")
    np.savez(tmp_path / "other.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="not an edgec calibration"):
        Calibration.load(tmp_path / "other.npz")


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_input_data_is_refused(bad):
    x = _x()
    x[3, 1] = bad
    with pytest.raises(ValueError, match="'x' contains NaN or inf"):
        calibrate(SMALL, ["a"], {"x": x})


def test_unknown_tensors_are_listed():
    with pytest.raises(ValueError, match="'nope', 'gone'"):
        calibrate(SMALL, ["a", "nope", "gone"], {"x": _x()})


def test_bad_feeds_and_arguments():
    with pytest.raises(ValueError, match="no calibration data for graph input"):
        calibrate(SMALL, ["a"], {"other": _x()})
    two = graph("g (float[N,4] x, float[N,4] z) => (float[N,4] y)", "y = Add(x, z)")
    with pytest.raises(ValueError, match="disagree on the number of samples"):
        calibrate(two, ["y"], {"x": _x(4), "z": _x(5)})
    with pytest.raises(ValueError, match="power of two"):
        calibrate(SMALL, ["a"], {"x": _x()}, bins=1000)
    with pytest.raises(ValueError, match="batch_size"):
        calibrate(SMALL, ["a"], {"x": _x()}, batch_size=0)


# --- a real export -------------------------------------------------------------------------------


def test_matmul_inputs_of_a_zoo_bert(zoo_model):
    path = zoo_model("bert", "dynamo")
    model = load_onnx(path)
    PassManager("cleanup", PassContext()).run(model)
    names = list(dict.fromkeys(v.name for n in model.graph if n.op_type == "MatMul" for v in n.inputs if v is not None))
    feeds = zoo.zoo_inputs("bert", path, batch=6, seq_len=16)
    cal = calibrate(model, names, feeds, batch_size=4)
    assert list(cal.stats) == names and cal.samples == 6
    # The statistics are those of the activations of one unbatched run.
    probe = [n for n in names if n in {v.name for node in model.graph for v in node.outputs}][:4]
    reference = calibrate(model, probe, feeds, batch_size=6)
    for name in probe:
        assert (cal.stats[name].min, cal.stats[name].max) == (reference.stats[name].min, reference.stats[name].max)
    values = {v.name: v for node in model.graph for v in node.outputs}
    for name, st in cal.stats.items():
        assert st.nonfinite == 0 and st.histogram.sum() > 0
        shape = values[name].shape if name in values else model.graph.initializers[name].shape
        if shape is not None and isinstance(shape[-1], int):
            assert st.channel_absmax.shape == (shape[-1],)
    for method in METHODS:
        for dtype in ("int8", "uint8"):
            for name, (low, high) in cal.ranges(method, dtype=dtype).items():
                lowest, highest = min(cal.stats[name].min, 0.0), max(cal.stats[name].max, 0.0)
                if dtype == "int8":
                    lowest, highest = -max(-lowest, highest), max(-lowest, highest)
                assert lowest <= low <= 0.0 <= high <= highest, (method, dtype, name)


def test_sqnr_estimate_matches_quantizing_the_data():
    """sqnr_db from the histogram agrees with quantizing the values themselves; an outlier that sets the
    range leaves the rest few levels (what keeps a residual branch's result float)."""
    rng = np.random.default_rng(3)
    values = rng.standard_normal((64, 256))
    for data in (values, np.concatenate([values, np.full((64, 1), 60.0)], axis=1)):
        st = _data(data).stats["y"]
        scale = float(np.abs(data).max()) / 127
        q = np.clip(np.rint(data / scale), -127, 127) * scale
        measured = 10 * np.log10((data**2).sum() / ((data - q) ** 2).sum())
        assert abs(st.sqnr_db(scale, 0, -127, 127) - measured) < 0.5, (st.sqnr_db(scale, 0, -127, 127), measured)
    assert _data(values).stats["y"].sqnr_db(4 / 127, 0, -127, 127) > 35 > st.sqnr_db(60 / 127, 0, -127, 127)
    # Clipping counts as noise: a grid that covers a tenth of the range is worse than one that covers it.
    assert st.sqnr_db(6 / 127, 0, -127, 127) < st.sqnr_db(60 / 127, 0, -127, 127)
