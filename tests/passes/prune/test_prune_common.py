"""What the pruning passes share: the even allocation of units over layers, and calibration batches
that come shortest first, cut to their longest sample, with the same statistics as padded ones."""

import numpy as np
import onnx_ir as ir
import pytest
import zoo
from prune_helpers import cleaned

from edgec.passes.core import PassContext
from edgec.passes.prune import common


def test_evenly_gives_every_block_its_share_in_its_own_order():
    assert common.evenly([[3, 1, 0, 2], [0, 1, 2, 3]], [4, 4], 3) == [[1, 3], [0]]
    assert common.evenly([[1, 0], [5, 4, 3, 2, 1, 0]], [2, 6], 4) == [[1], [3, 4, 5]]  # in proportion to size
    assert common.evenly([[0], [0, 1, 2]], [4, 4], 3) == [[0], [0, 1]]  # a block's order may end early
    assert common.evenly([[], []], [0, 0], 2) == [[], []]


def padded_feeds(lengths, width, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 100, size=(len(lengths), width)).astype(np.int64)
    mask = (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def dynamic(names=("input_ids", "attention_mask", "token_type_ids"), length="S") -> ir.Model:
    """A model with those inputs, [batch, `length`] (a number fixes the sequence length); it computes nothing."""
    inputs = [ir.Value(name=name, shape=ir.Shape(["B", length]), type=ir.TensorType(ir.DataType.INT64)) for name in names]
    return ir.Model(ir.Graph(inputs, [], nodes=[]), ir_version=10)


def test_batches_come_shortest_first_cut_to_their_longest():
    feeds = padded_feeds([9, 2, 5, 3, 7, 1, 4, 8, 6, 2], width=12)
    data = common._Batches(feeds)
    spans = data.spans(dynamic())
    seen = []
    for start, end in spans:
        chunk, mask = data.chunk(start, end)
        lengths = mask.sum(axis=1)
        assert mask.shape[1] == lengths.max() and all(v.shape[1] == mask.shape[1] for v in chunk.values())
        seen += list(lengths)
    assert seen == sorted(seen) and sorted(seen) == sorted([9, 2, 5, 3, 7, 1, 4, 8, 6, 2])


@pytest.mark.parametrize("model", [dynamic(length=12), dynamic(names=("input_ids",), length=12)], ids=["fixed", "fixed-ids"])
def test_fixed_sequence_length_is_not_cut(model):
    data = common._Batches(padded_feeds([3, 5, 2], width=12))
    (start, end), = data.spans(model)
    chunk, mask = data.chunk(start, end)
    assert mask.shape == (3, 12) and chunk["input_ids"].shape == (3, 12)


def test_padding_at_the_start_is_not_cut():
    feeds = padded_feeds([3, 5, 2], width=6)
    feeds = {k: v[:, ::-1].copy() for k, v in feeds.items()}  # left padding
    data = common._Batches(feeds)
    (start, end), = data.spans(dynamic())
    chunk, mask = data.chunk(start, end)
    assert mask.shape == (3, 6) and np.array_equal(mask, feeds["attention_mask"] != 0)


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_cut_batches_measure_what_padded_ones_do(zoo_model, exporter):
    """The Gram matrices over real tokens are those of one run at full width: cutting the padding changes nothing."""
    path = zoo_model("bert", exporter)
    model = cleaned(path)
    base = zoo.zoo_inputs("bert", path, batch=10, seed=1)
    width = base["input_ids"].shape[1]
    lengths = [width, 2, width - 1, 3, 4, width, 5, 2, width - 2, 6]
    mask = (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(base["attention_mask"].dtype)
    feeds = {**base, "attention_mask": mask}
    data = common._Batches(feeds)
    data.spans(model)
    assert data.trim  # the exports take any sequence length
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
