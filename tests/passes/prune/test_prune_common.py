"""What the pruning passes share: the even allocation of units over layers, calibration batches that
come shortest first, cut to their longest sample, with the same statistics as padded ones, the
unpruned model's values kept for the refits, and the units a compile finds to prune."""

import numpy as np
import onnx_ir as ir
import pytest
import zoo
from prune_helpers import attention_feeds, attention_layer, cleaned, ffn_layer

from edgec.compiler import _check_prunable
from edgec.errors import UserError
from edgec.passes.core import PassContext
from edgec.passes.manager import PassManager
from edgec.passes.prune import common
from edgec.pruning import parse_prune


def test_even_shares_round_down_then_give_the_rest_to_the_largest_remainders():
    assert common.even_shares([1536] * 6, 2304) == [384] * 6
    assert common.even_shares([2, 6], 4) == [1, 3]  # in proportion to size
    assert common.even_shares([4, 4, 4], 4) == [1, 1, 2]  # a tie goes to the later layer
    assert common.even_shares([7, 1, 1, 1], 5) == [3, 0, 1, 1]  # never more than the share rounded up
    assert common.even_shares([3, 5], 8) == [3, 5] and common.even_shares([0, 0], 2) == [0, 0]


def test_allocate_even_or_by_least_marginal_cost():
    orders, costs = [[3, 1, 0, 2], [0, 1, 2, 3]], [[0.1, 0.2, 0.9, 1.0], [0.15, 0.3, 0.4, 0.5]]
    assert common.allocate("even", orders, costs, [2, 1], 3) == [[1, 3], [0]]
    assert common.allocate("global", orders, costs, [2, 1], 3) == [[1, 3], [0]]
    assert common.allocate("global", orders, costs, [2, 1], 4) == [[1, 3], [0, 1]]
    assert common.allocate("even", orders, costs, [2, 2], 4) == [[1, 3], [0, 1]]
    scores = [np.array([0.5, 0.1, 0.3]), np.array([0.2, 0.05])]
    assert common.score_orders(scores) == ([[1, 2, 0], [1, 0]], [[0.1, 0.3, 0.5], [0.05, 0.2]])
    assert common.allocate("global", *common.score_orders(scores), [2, 1], 3) == [[1], [0, 1]]


def padded_feeds(lengths, width, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 100, size=(len(lengths), width)).astype(np.int64)
    mask = (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def dynamic(names=("input_ids", "attention_mask", "token_type_ids"), length="S", batch="B") -> ir.Model:
    """A model with those inputs, [`batch`, `length`] (a number fixes that dim); it computes nothing."""
    inputs = [ir.Value(name=name, shape=ir.Shape([batch, length]), type=ir.TensorType(ir.DataType.INT64)) for name in names]
    return ir.Model(ir.Graph(inputs, [], nodes=[]), ir_version=10)


def test_batches_come_shortest_first_cut_to_their_longest():
    feeds = padded_feeds([9, 2, 5, 3, 7, 1, 4, 8, 6, 2], width=12)
    data = common._Batches(feeds, dynamic())
    spans = data.spans()
    seen = []
    for start, end in spans:
        chunk, mask = data.chunk(start, end)
        lengths = mask.sum(axis=1)
        assert mask.shape[1] == lengths.max() and all(v.shape[1] == mask.shape[1] for v in chunk.values())
        seen += list(lengths)
    assert seen == sorted(seen) and sorted(seen) == sorted([9, 2, 5, 3, 7, 1, 4, 8, 6, 2])


def test_short_samples_share_a_batch_up_to_the_token_budget():
    lengths = [5] * 900 + [40] * 100
    data = common._Batches(padded_feeds(lengths, width=40), dynamic())
    spans = data.spans()
    sizes = [end - start for start, end in spans]
    assert sum(sizes) == 1000 and max(sizes) == common.BATCH_TOKENS // 5
    for start, end in spans:
        chunk, mask = data.chunk(start, end)
        assert chunk["input_ids"].size <= common.BATCH_TOKENS or end - start == common.BATCH


def test_a_fixed_batch_size_is_kept_and_cut():
    data = common._Batches(padded_feeds([6, 1, 4, 2], width=8), dynamic(batch=2))
    assert data.spans() == [(0, 2), (2, 4)]
    assert [data.chunk(*span)[1].shape for span in data.spans()] == [(2, 2), (2, 6)]


@pytest.mark.parametrize("model", [dynamic(length=12), dynamic(names=("input_ids",), length=12)], ids=["fixed", "fixed-ids"])
def test_fixed_sequence_length_is_not_cut(model):
    data = common._Batches(padded_feeds([3, 5, 2], width=12), model)
    (start, end), = data.spans()
    chunk, mask = data.chunk(start, end)
    assert mask.shape == (3, 12) and chunk["input_ids"].shape == (3, 12)


def test_an_input_with_the_tokens_on_another_axis_is_not_cut():
    feeds = padded_feeds([3, 5, 2], width=6)
    feeds["bias"] = np.zeros((3, 1, 6, 6), np.float32)  # an additive mask [batch, 1, tokens, tokens]
    model = dynamic()
    model.graph.inputs.append(ir.Value(name="bias", shape=ir.Shape(["B", 1, "S", "S"]), type=ir.TensorType(ir.DataType.FLOAT)))
    data = common._Batches(feeds, model)
    (start, end), = data.spans()
    chunk, mask = data.chunk(start, end)
    assert mask.shape == (3, 6) and chunk["bias"].shape == (3, 1, 6, 6)


def test_padding_at_the_start_is_not_cut():
    feeds = padded_feeds([3, 5, 2], width=6)
    feeds = {k: v[:, ::-1].copy() for k, v in feeds.items()}  # left padding
    data = common._Batches(feeds, dynamic())
    (start, end), = data.spans()
    chunk, mask = data.chunk(start, end)
    assert mask.shape == (3, 6) and np.array_equal(mask, feeds["attention_mask"] != 0)


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_cut_batches_measure_what_padded_ones_do(zoo_model, exporter, monkeypatch):
    """The Gram matrices over real tokens are those of one run at full width: cutting the padding changes nothing."""
    path = zoo_model("bert", exporter)
    model = cleaned(path)
    base = zoo.zoo_inputs("bert", path, batch=10, seed=1)
    width = base["input_ids"].shape[1]
    lengths = [width, 2, width - 1, 3, 4, width, 5, 2, width - 2, 6]
    mask = (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(base["attention_mask"].dtype)
    feeds = {**base, "attention_mask": mask}
    monkeypatch.setattr(common, "BATCH", 2)  # several batches, most of them cut
    monkeypatch.setattr(common, "BATCH_TOKENS", 12)
    data = common._Batches(feeds, model)
    widths = [data.chunk(*span)[1].shape[1] for span in data.spans()]
    assert len(widths) > 3 and min(widths) < width  # the exports take any sequence length
    blocks = list(PassContext().analyses.get("ffn", model))
    inputs = [block.down.input for block in blocks]
    residuals = [common.residual_of(model, block.output) for block in blocks]
    got = common.measure(model, feeds, inputs, residuals, lambda m: None, "test")
    # The same statistics from one run over every row at full width, padding and all.
    fetch = list(dict.fromkeys(inputs + residuals))
    full = dict(zip(fetch, common.run_fetch(common.session(model, fetch), fetch, feeds)))
    real = mask != 0
    for name, r_name, measured in zip(inputs, residuals, got):
        x = common.rows(full[name], real)
        assert measured.count == sum(lengths) == len(x)
        expected = common.augmented_gram(x)
        np.testing.assert_allclose(measured.gram, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
        energy = float((common.rows(full[r_name], real) ** 2).sum()) / len(x)
        assert measured.residual_energy == pytest.approx(energy, rel=1e-5)


def _pruned_both_ways(model, feeds, monkeypatch, limit: int) -> ir.Model:
    from edgec import ir as eir

    monkeypatch.setattr(common, "REFERENCE_BYTES", limit)
    copy = eir.clone(model)
    PassManager("remove-attention-heads{ratio=0.3},remove-ffn-neurons{ratio=0.4}",
                PassContext(options={common.CALIBRATION_FEEDS_KEY: feeds})).run(copy)
    return copy


def test_refits_on_the_kept_unpruned_values_equal_those_that_run_the_model_again(zoo_model, monkeypatch):
    """Kept (float32, as computed) or computed again by a session cut to each refit's layer (which
    onnxruntime may fuse otherwise: the last bits differ), the unpruned model's values are the same,
    and so is the pruned model."""
    from edgec.verify import run_model

    path = zoo_model("bert", "torchscript")
    model = cleaned(path)
    feeds = zoo.zoo_inputs("bert", path, batch=12, seed=3)
    monkeypatch.setattr(common, "BATCH", 4)
    kept_runs = []
    keep = common.Reference._keep
    monkeypatch.setattr(common.Reference, "_keep", lambda self, progress: kept_runs.append(keep(self, progress)) or kept_runs[-1])
    kept = _pruned_both_ways(model, feeds, monkeypatch, 1 << 30)
    assert len(kept_runs) == 2 and all(run is not None for run in kept_runs)  # one run of the unpruned model per pass
    kept_runs.clear()
    again = _pruned_both_ways(model, feeds, monkeypatch, 1000)  # too little room: every refit runs its own
    assert len(kept_runs) == 2 and all(run is None for run in kept_runs)
    got = run_model(again, feeds)
    for name, value in run_model(kept, feeds).items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5)


def test_a_shared_reference_is_reused_for_the_same_model_data_and_values_only(zoo_model):
    """A budget search refits many candidates against one unpruned model on one data set: the values
    are computed once; another model, other data or other values get their own."""
    from edgec import ir as eir

    path = zoo_model("bert", "torchscript")
    model = cleaned(path)
    feeds = zoo.zoo_inputs("bert", path, batch=4, seed=3)
    blocks = list(PassContext().analyses.get("ffn", model))
    fetch = [block.down.input for block in blocks]
    shared: dict = {}

    def reference(owner, original, data, names):
        ctx = PassContext(options={common.CALIBRATION_FEEDS_KEY: data, common.REFERENCE_KEY: (owner, original),
                                   common.REFERENCE_VALUES_KEY: shared})
        return common.reference(owner, ctx, names)

    first = reference(eir.clone(model), model, feeds, fetch)
    assert reference(eir.clone(model), model, feeds, fetch) is first
    assert reference(eir.clone(model), model, dict(feeds), fetch) is not first
    assert reference(eir.clone(model), model, feeds, fetch[:1]) is not first
    other = eir.clone(model)
    assert reference(eir.clone(model), other, feeds, fetch).model is other


def test_a_share_of_units_the_model_lacks_is_refused():
    """`--prune` asks for shares of units the compile finds first: none of a kind asked for (or, for
    auto, of either) is an error, where the compile would pass having removed nothing."""
    def check(model, spec):
        _check_prunable(model, PassContext(), parse_prune(spec), spec)

    attention, ffn = attention_layer(), ffn_layer()
    for spec in ("heads=0.25", "auto"):
        check(attention, spec)
    for spec in ("ffn=0.25", "auto"):
        check(ffn, spec)
    with pytest.raises(UserError, match=r"^--prune heads=0.1,ffn=0.25: the model has no FFN neurons edgec can remove: "
                                        r"prune what the model has"):
        check(attention, "heads=0.1,ffn=0.25")
    with pytest.raises(UserError, match="^--prune heads=0.25: the model has no attention heads edgec can remove"):
        check(ffn, "heads=0.25")
    nothing = ffn_layer(activation="Relu")
    PassManager("remove-ffn-neurons{neurons=0.0:0.1:0.2:0.3:0.4:0.5,reconstruct=false}", PassContext()).run(nothing)
    with pytest.raises(UserError, match="no attention heads or FFN neurons edgec can remove"):
        check(nothing, "auto")


def test_a_model_without_ffn_is_searched_over_its_heads_alone():
    """--prune auto on attention alone: the heads shares are tried without FFN shares, and a budget
    the first of them breaks says so."""
    from edgec.pruning import HEAD_RATIOS, search
    from edgec.targets import get_target

    model = attention_layer()
    feeds = attention_feeds(batch=16, sequence=6, seed=2)

    def run(budget):
        return search(model, feeds, get_target("x86-64"), "fp32", latency_budget_ms=None, accuracy_budget=budget,
                      reconstruct=True, bindings=None, step=lambda m: None, has_ffn=False)

    found = run(0.0)
    assert (found.heads, found.ffn) == (HEAD_RATIOS[-1], 0.0)
    assert {t["ffn"] for t in found.tried} == {0.0}
    with pytest.raises(UserError, match=rf"allows no pruning: removing {HEAD_RATIOS[1]:.0%} of the heads already gives "
                                        r"mean output cosine 0\.\d{4}: lower the budget"):
        run(0.999999)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_each_refit_starts_from_the_residual_stream_the_last_one_computed(zoo_model, arch, monkeypatch):
    """A refit runs the pruned model from the skip value the previous refit of its pass kept, not from
    the inputs: the pruned model is the one that runs it whole."""
    from edgec import ir as eir
    from edgec.verify import run_model

    path = zoo_model(arch, "dynamo")
    model = cleaned(path)
    feeds = zoo.zoo_inputs(arch, path, batch=12, seed=3)
    monkeypatch.setattr(common, "BATCH", 4)
    starts = []
    start = common.Carry.start
    monkeypatch.setattr(common.Carry, "start", lambda self, *a: starts.append(start(self, *a)) or starts[-1])

    def pruned():
        copy = eir.clone(model)
        PassManager("remove-attention-heads{ratio=0.5},remove-ffn-neurons{ratio=0.5}",
                    PassContext(options={common.CALIBRATION_FEEDS_KEY: feeds})).run(copy)
        return run_model(copy, feeds)

    carried = pruned()
    layers = len(list(PassContext().analyses.get("ffn", model)))
    assert len(starts) == 2 * layers and starts[0] is None and starts[layers] is None
    assert all(name is not None for name in starts[1:layers] + starts[layers + 1:])
    monkeypatch.setattr(common.Carry, "start", lambda self, *a: None)
    for name, value in pruned().items():
        np.testing.assert_allclose(carried[name], value, rtol=1e-4, atol=1e-5)
