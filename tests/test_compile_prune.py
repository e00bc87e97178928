"""`edgec compile --prune`: heads and FFN neurons removed by ratio or by budget, with INT8 and through
every backend, and the bad input around it."""

import json

import numpy as np
import pytest

from edgec.analysis.attention import find_attention
from edgec.analysis.structure import find_feed_forward
from edgec.cli import main
from edgec.commands import _failure_fix
from edgec.compiler import CompileOptions, compile_model
from edgec.errors import UserError
from edgec.frontends.onnx import load_onnx
from edgec.passes.core import PassContext
from edgec.passes.manager import PassManager
from edgec.pruning import (
    HEAD_RATIOS, MAX_RATIO, RATIO_STEP, SEARCH_FIT, SEARCH_SAMPLES, hold_out, parse_prune, split_for_search,
)
from edgec.verify import compare, run_model, token_mask

# The zoo's BERT: 2 layers of 4 heads (8 in all) and 64 FFN neurons (128 in all).
HEADS, NEURONS = 8, 128
NO_BUDGET = 0.05  # random-weight models: the tests check what was removed, not how close it stays


def _calibration(tmp_path, samples=16, sequence=16):
    rng = np.random.default_rng(0)
    mask = np.ones((samples, sequence), np.int64)
    mask[::3, sequence // 2:] = 0  # some padded sentences: padding is not counted by the statistics
    np.savez(tmp_path / "calib.npz", input_ids=rng.integers(1, 250, (samples, sequence)), attention_mask=mask,
             token_type_ids=np.zeros((samples, sequence), np.int64))
    return tmp_path / "calib.npz"


def _options(tmp_path, **kw):
    kw.setdefault("target", "x86-64")
    return CompileOptions(outdir=tmp_path / "out", cache_dir=tmp_path / "cache", **kw)


def _counts(path) -> tuple[int, int]:
    model = load_onnx(path)
    PassManager("cleanup", PassContext()).run(model)
    return sum(b.heads for b in find_attention(model)), sum(b.intermediate for b in find_feed_forward(model))


def test_prune_ratios_remove_heads_and_neurons_and_the_report_lists_them(zoo_model, tmp_path):
    source = zoo_model("bert", "torchscript")
    calib = _calibration(tmp_path)
    result = compile_model(source, _options(tmp_path, prune="heads=0.5,ffn=0.25", calib=calib,
                                            accuracy_budget=NO_BUDGET, backend="onnxruntime", precision="fp32"))
    assert result.passed, result.failures
    pruning = result.report["pruning"]
    assert pruning["heads_removed"] == HEADS // 2 and pruning["neurons_removed"] == NEURONS // 4
    assert sum(r["removed"] for r in pruning["heads"]) == 4
    assert all(r["kept"] + r["removed"] == r["heads"] == 4 for r in pruning["heads"])
    assert all(r["kept"] + r["removed"] == r["neurons"] == 64 for r in pruning["ffn"])
    assert pruning["reconstruct"] is True and pruning["search"] is None
    e = pruning["estimated_latency_ms"]
    assert e["after"] < e["before"]
    # The verification compared the pruned artifact with the original on calibration samples that no
    # refit saw: the last half of these 16.
    v = result.report["verification"]
    assert v["inputs"] == f"{calib} (8 samples held out from the refit)" and v["tolerance"]["min_cosine_mean"] == NO_BUDGET
    with np.load(calib) as data:
        _, held = hold_out(dict(data))
    assert len(held["input_ids"]) == 8
    check = compare(run_model(load_onnx(source), held), run_model(load_onnx(result.artifact.path), held), token_mask(held))
    assert v["cosine_mean"] == pytest.approx(check["cosine_mean"], abs=1e-6)
    assert "remove-attention-heads{ratio=0.5}" in result.report["pipeline"]
    # The artifact holds the cut weights: each layer's up projection is [hidden 32, kept neurons].
    shapes = {tuple(v.const_value.shape) for v in load_onnx(result.artifact.path).graph.initializers.values()
              if v.const_value is not None}
    for row in pruning["ffn"]:
        assert (32, row["kept"]) in shapes and (row["kept"], 32) in shapes
    assert _counts(source) == (HEADS, NEURONS)  # the input is untouched


def test_prune_then_int8(zoo_model, tmp_path):
    source = zoo_model("bert", "dynamo")
    result = compile_model(source, _options(tmp_path, prune="heads=0.25,ffn=0.5", calib=_calibration(tmp_path),
                                            accuracy_budget=NO_BUDGET, precision="int8"))
    assert result.passed, result.failures
    assert result.report["pruning"]["heads_removed"] == 2 and result.report["pruning"]["neurons_removed"] == 64
    assert result.report["quantization"]["calibration"]["samples"] == 8  # the 8 others are the check's
    ops = {n.op_type for n in load_onnx(result.artifact.path).graph}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


@pytest.mark.parametrize("target, backend", [("snapdragon-8", "tflite"), ("x86-64", "tvm")])
def test_pruned_model_compiles_through_the_other_backends(zoo_model, tmp_path, target, backend):
    source = zoo_model("bert", "torchscript")
    result = compile_model(source, _options(tmp_path, target=target, backend=backend, precision="fp32",
                                            prune="heads=0.5,ffn=0.5", calib=_calibration(tmp_path), accuracy_budget=NO_BUDGET))
    assert result.passed, result.failures
    assert result.report["verification"]["verified_in"] == backend
    assert result.report["pruning"]["heads_removed"] == 4


def _tried(search: dict, key: str) -> dict[tuple[float, float], float]:
    return {(t["heads"], t["ffn"]): t[key] for t in search["tried"] if key in t}


def test_prune_auto_meets_a_latency_budget_with_the_most_accurate_least_pruning(zoo_model, tmp_path):
    source = zoo_model("bert", "torchscript")
    calib = _calibration(tmp_path)
    first = compile_model(source, _options(tmp_path, prune="heads=0.05", calib=calib, accuracy_budget=NO_BUDGET))
    before = first.report["pruning"]["estimated_latency_ms"]["before"]
    # This model's estimate (lowered for onnxruntime) falls 14% with three quarters of its FFN neurons
    # gone, and 4% with one of its 8 heads (the least heads share tried, 15%): several mixes fit.
    budget = before * 0.92
    result = compile_model(source, _options(tmp_path, prune="auto", latency_budget_ms=budget, calib=calib, accuracy_budget=NO_BUDGET))
    assert result.passed, result.failures
    pruning = result.report["pruning"]
    search = pruning["search"]
    chosen = (search["heads"], search["ffn"])
    assert chosen != (0.0, 0.0) and (pruning["heads_ratio"], pruning["ffn_ratio"]) == chosen
    # The report (and a failed check's message) names the passes with the shares chosen.
    assert result.report["verification"]["approximate_passes"] == [spec for spec, share in (
        (f"remove-attention-heads{{ratio={chosen[0]:g}}}", chosen[0]), (f"remove-ffn-neurons{{ratio={chosen[1]:g}}}", chosen[1]))
        if share]
    assert pruning["estimated_latency_ms"]["after"] <= budget
    estimates, cosines = _tried(search, "estimated_ms"), _tried(search, "cosine_mean")
    # Several mixes fit; each is its heads share's least FFN share (one step less is over the budget),
    # and the one chosen is the most accurate of them.
    assert len(cosines) > 1 and chosen in cosines and cosines[chosen] == max(cosines.values())
    # The search's estimate is the compile's: this model's projections have no biases (zero ones
    # folded away), and the refit gives them none (an Add would make the refit model slower).
    assert estimates[chosen] == pytest.approx(pruning["estimated_latency_ms"]["after"], rel=1e-5)
    assert len({heads for heads, _ in cosines}) == len(cosines)
    for heads, ffn in cosines:
        assert estimates[heads, ffn] <= budget
        assert ffn == 0 or estimates[heads, round(ffn - RATIO_STEP, 4)] > budget
    # A mix only estimated had its FFN share taken without ranking (the first neurons of each layer):
    # the estimate is that of the mix pruned as a compile prunes it.
    heads, ffn = next(mix for mix in estimates if mix not in cosines and mix[1] and mix[1] != MAX_RATIO)
    compiled = compile_model(source, _options(tmp_path, prune=f"heads={heads:g},ffn={ffn:g}", calib=calib,
                                              accuracy_budget=NO_BUDGET))
    assert estimates[heads, ffn] == pytest.approx(compiled.report["pruning"]["estimated_latency_ms"]["after"], rel=1e-5)

    with pytest.raises(UserError, match="out of reach"):
        compile_model(source, _options(tmp_path, prune="auto", latency_budget_ms=before * 1e-6, calib=calib))
    # A budget the model already meets prunes nothing.
    result = compile_model(source, _options(tmp_path, prune="auto", latency_budget_ms=before * 2, calib=calib))
    assert result.passed, result.failures
    assert result.report["pruning"]["heads_removed"] == result.report["pruning"]["neurons_removed"] == 0
    assert "already within" in result.report["pruning"]["search"]["reason"]


def test_prune_auto_keeps_an_accuracy_budget_with_the_least_latency(zoo_model, tmp_path):
    source = zoo_model("bert", "torchscript")
    calib = _calibration(tmp_path)
    result = compile_model(source, _options(tmp_path, prune="auto", accuracy_budget=0.99, calib=calib))
    assert result.passed, result.failures
    search = result.report["pruning"]["search"]
    chosen = (search["heads"], search["ffn"])
    estimates, cosines = _tried(search, "estimated_ms"), _tried(search, "cosine_mean")
    # The mixes estimated are those that keep the budget, each with its heads share's most FFN share:
    # one step more broke it at that heads share or a smaller one. The one chosen is the fastest.
    assert chosen in estimates and estimates[chosen] == min(estimates.values())
    for heads, ffn in estimates:
        assert cosines[heads, ffn] >= 0.99
        more = round(ffn + RATIO_STEP, 4)
        assert ffn == MAX_RATIO or any(c < 0.99 for (h, f), c in cosines.items() if f == more and h <= heads)
    # The heads shares were tried in turn until one broke the budget even with no FFN neuron removed.
    tried = sorted({heads for heads, _ in cosines})
    assert tried == list(HEAD_RATIOS[:len(tried)])
    assert len(tried) == len(HEAD_RATIOS) or cosines[tried[-1], 0.0] < 0.99
    # Checked on the compile's 8 held-out samples, which the search measured none of its candidates on.
    v = result.report["verification"]
    assert v["inputs"] == f"{calib} (8 samples held out from the refit and from --prune auto's choice)"
    assert v["cosine_mean"] >= 0.99


def test_the_search_measures_candidates_on_samples_it_did_not_refit_them_on():
    feeds = {"input_ids": np.arange(600 * 4).reshape(600, 4), "attention_mask": np.ones((600, 4), np.int64)}
    fit, held_out = split_for_search(feeds)
    assert len(fit["input_ids"]) == SEARCH_FIT and len(held_out["input_ids"]) == SEARCH_SAMPLES
    assert not set(fit["input_ids"][:, 0]) & set(held_out["input_ids"][:, 0])
    fit, held_out = split_for_search({k: v[:10] for k, v in feeds.items()})
    assert len(fit["input_ids"]) == len(held_out["input_ids"]) == 5
    assert not set(fit["input_ids"][:, 0]) & set(held_out["input_ids"][:, 0])
    one = {k: v[:1] for k, v in feeds.items()}
    fit, held_out = split_for_search(one)  # nothing to hold out: measured where it was refit
    assert held_out is one and all(np.array_equal(fit[k], one[k]) for k in one)
    # The compile holds out its check's samples (64, from the first to the last: data of several
    # sources in turn is checked on each); the search refits and measures on the others, so the
    # check sees none of the samples the choice was made on.
    rest, held = hold_out(feeds)
    assert len(rest["input_ids"]) == 600 - SEARCH_SAMPLES and (held["input_ids"][[0, -1], 0] == [0, 599 * 4]).all()
    assert np.diff(held["input_ids"][:, 0] // 4).max() <= 10  # no stretch of the data left out
    fit, measured = split_for_search(rest)
    assert len(fit["input_ids"]) == SEARCH_FIT and len(measured["input_ids"]) == SEARCH_SAMPLES
    where = np.searchsorted(rest["input_ids"][:, 0], fit["input_ids"][:, 0])  # the fit spans the rest
    assert where[0] <= 2 and where[-1] >= len(rest["input_ids"]) - 3 and np.diff(where).max() <= 3
    check = set(held["input_ids"][:, 0])
    assert not check & set(fit["input_ids"][:, 0]) and not check & set(measured["input_ids"][:, 0])
    # A batch the model fixes divides the search's parts too.
    fit, measured = split_for_search({k: v[:100] for k, v in feeds.items()}, multiple=12)
    assert (len(fit["input_ids"]), len(measured["input_ids"])) == (48, 48)
    # A batch the model fixes divides both parts; quantization keeps its least samples, else none is held out.
    rest, held = hold_out({k: v[:120] for k, v in feeds.items()}, multiple=8)
    assert (len(rest["input_ids"]), len(held["input_ids"])) == (64, 56)
    eight = {k: v[:8] for k, v in feeds.items()}
    assert hold_out(eight, keep=8) == (eight, eight) and len(hold_out(eight)[1]["input_ids"]) == 4


def test_a_pruned_compile_given_inputs_is_checked_on_them_and_refit_on_all_the_calibration(zoo_model, tmp_path):
    source = zoo_model("bert", "torchscript")
    calib = _calibration(tmp_path)
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, **{k: v[:4] for k, v in np.load(calib).items()})
    result = compile_model(source, _options(tmp_path, prune="ffn=0.5", calib=calib, inputs=inputs, precision="int8",
                                            accuracy_budget=NO_BUDGET))
    assert result.passed, result.failures
    assert result.report["verification"]["inputs"] == str(inputs)
    assert result.report["quantization"]["calibration"]["samples"] == 16


def test_pruning_beyond_the_budget_is_refused_and_nothing_is_written(zoo_model, tmp_path):
    source = zoo_model("bert", "torchscript")
    # Random-weight attention and FFNs add little to the residual stream: a tight budget still sees them go.
    result = compile_model(source, _options(tmp_path, prune="heads=1.0,ffn=1.0", calib=_calibration(tmp_path),
                                            accuracy_budget=0.99999))
    assert not result.passed and result.artifact is None
    assert not (tmp_path / "out" / "model.onnx").exists()
    assert "breaks the accuracy budget" in result.failures[0] and "mean cosine" in result.failures[0]
    assert result.report["pruning"]["heads"][0]["kept"] == 0  # every head gone: the layers pass through


def test_a_model_fused_by_onnxruntime_is_refused_where_it_cannot_be_pruned_or_lowered(zoo_model, tmp_path):
    """An onnxruntime-optimized model (its Attention and BiasGelu ops: what edgec's onnxruntime backend
    writes) has no blocks the passes recognise: --prune would pass having removed nothing, and the
    other backends cannot lower those ops. Both are one-line errors that say what to give instead."""
    source = zoo_model("bert", "torchscript")
    calib = _calibration(tmp_path)
    fused = compile_model(source, _options(tmp_path)).artifact.path
    ops = {(n.domain, n.op_type) for n in load_onnx(fused).graph}
    assert ("com.microsoft", "Attention") in ops
    for spec in ("heads=0.25", "heads=0.25,ffn=0.25"):
        with pytest.raises(UserError, match=r"no attention heads edgec can remove \(it holds onnxruntime's fused ops: "
                                            r"Attention x2") as error:
            compile_model(fused, _options(tmp_path / spec, prune=spec, calib=calib))
        assert "as exported, before onnxruntime's optimizer" in error.value.fix
        assert not (tmp_path / spec / "out").exists()
    with pytest.raises(UserError, match=r"fused ops \(Attention x2.*\), which the tflite backend cannot lower"):
        compile_model(fused, _options(tmp_path / "tflite", target="snapdragon-8"))
    # The near miss: FFN neurons the model still has (BiasGelu leaves the MatMuls) are found and cut,
    # and --prune auto searches their shares alone.
    result = compile_model(fused, _options(tmp_path / "ffn", prune="ffn=0.25", calib=calib, accuracy_budget=NO_BUDGET))
    assert result.report["pruning"]["neurons_removed"] == NEURONS // 4
    result = compile_model(fused, _options(tmp_path / "auto", prune="auto", calib=calib, accuracy_budget=0.99))
    tried = result.report["pruning"]["search"]["tried"]
    assert {t["heads"] for t in tried} == {0.0} and result.report["pruning"]["neurons_removed"] > 0


def test_pruned_compiles_are_checked_on_the_mean_cosine():
    from edgec.compiler import _prune_tolerance
    from edgec.pruning import DEFAULT_PRUNE_BUDGET
    from edgec.verify import parse_tolerance

    def tolerance(**kw):
        options = CompileOptions(target="x86-64", **kw)
        return _prune_tolerance(parse_tolerance(options.tolerance, options.precision), options)

    assert tolerance()["min_cosine_mean"] == DEFAULT_PRUNE_BUDGET and tolerance()["min_cosine"] < 0
    assert tolerance(accuracy_budget=0.97)["min_cosine_mean"] == 0.97
    # --tolerance keeps the per-sample floor it names.
    assert tolerance(tolerance="min_cosine=0.9")["min_cosine"] == 0.9
    # With mixed precision the budget is the assignment's (against the pruned float model).
    assert tolerance(precision="mixed", accuracy_budget=0.999)["min_cosine_mean"] == DEFAULT_PRUNE_BUDGET


@pytest.mark.parametrize("spec", ["heads=2", "heads=0.2,heads=0.3", "ffn", "neurons=0.5", "heads=0,ffn=0", "reconstruct=maybe,heads=0.1"])
def test_bad_prune_specs_are_user_errors(spec):
    with pytest.raises(UserError):
        parse_prune(spec)


@pytest.mark.parametrize("kw, message", [
    (dict(prune="heads=0.25"), "--calib"),
    (dict(latency_budget_ms=5.0), "--prune auto"),
    (dict(prune="auto", calib="x.npz"), "needs a budget"),
    (dict(prune="auto", latency_budget_ms=-1.0, calib="x.npz"), "positive"),
    (dict(prune="auto", accuracy_budget=0.99, precision="mixed", calib="x.npz"), "mixed"),
])
def test_bad_prune_options_fail_before_any_work(zoo_model, tmp_path, kw, message):
    with pytest.raises(UserError, match=message):
        compile_model(zoo_model("bert", "torchscript"), _options(tmp_path, **kw))


def test_cli_prune_prints_the_table_and_a_bad_spec_is_one_line(zoo_model, tmp_path, capsys):
    source = zoo_model("bert", "torchscript")
    calib = _calibration(tmp_path)
    code = main(["compile", str(source), "--target", "x86-64", "-o", str(tmp_path / "cli"), "--prune", "heads=0.5,ffn=0.5",
                 "--calib", str(calib), "--accuracy-budget", str(NO_BUDGET), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pruning"]["heads_removed"] == 4
    budget = report["pruning"]["estimated_latency_ms"]["before"] * 0.92
    code = main(["compile", str(source), "--target", "x86-64", "-o", str(tmp_path / "cli3"), "--prune", "auto",
                 "--latency-budget", f"{budget:.6f}", "--calib", str(calib), "--accuracy-budget", str(NO_BUDGET)])
    assert code == 0
    printed = "".join(capsys.readouterr().out.split())  # the title wraps at the console's width
    assert "chosenasthemostaccurateof" in printed and "mixesofheadsandFFNneurons" in printed
    # A pruned model that fails its check is told about the accuracy budget it broke, not --tolerance.
    code = main(["compile", str(source), "--target", "x86-64", "-o", str(tmp_path / "cli4"), "--prune", "heads=1.0,ffn=1.0",
                 "--calib", str(calib), "--accuracy-budget", "0.99999"])
    assert code == 1 and not (tmp_path / "cli4" / "model.onnx").exists()
    err = " ".join(capsys.readouterr().err.split())
    assert "breaks the accuracy budget" in err and "Prune less" in err and "lower --accuracy-budget" in err
    assert "--tolerance" not in err
    assert "--prune auto chose on calibration samples" in _failure_fix({"pruning": {"search": {"heads": 0.15}}})
    assert "--tolerance" in _failure_fix({"pruning": None})
    code = main(["compile", str(source), "--target", "x86-64", "-o", str(tmp_path / "cli2"), "--prune", "heads=lots",
                 "--calib", str(calib)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "heads" in err[0] and "Traceback" not in err[0]
    assert run_model(tmp_path / "cli" / "model.onnx", {k: v[:2] for k, v in np.load(calib).items()})

