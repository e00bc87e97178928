"""tools/prepare_data.py: the review sentences it tokenizes to calibrate on."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import prepare_data  # noqa: E402

from edgec.errors import UserError  # noqa: E402


def test_reviews_are_the_sentences_of_each_tagged_review(tmp_path):
    (tmp_path / "alldata-id-10.txt").write_text(
        "_*0 a fine film ,  really . too short. i would watch it again !  the cast was great\n"
        "_*1 what a waste of two hours .\n")
    assert prepare_data.reviews(tmp_path) == ["a fine film ,  really .", "i would watch it again !",
                                              "the cast was great", "what a waste of two hours ."]


def test_malformed_gensim_files_are_user_errors_that_say_to_reinstall(tmp_path):
    (tmp_path / "alldata-id-10.txt").write_text("_*0 a fine film indeed .\nno tag on this review line .\n")
    (tmp_path / "pang_lee_polarity.cor").write_text("__label__pos a fine film .\n__label__meh so so .\n")
    (tmp_path / "wordsim353.tsv").write_text("# Word 1\tWord 2\tHuman (mean)\ntiger\tcat\t7.35\nking queen 8.5\n")
    for read, what in [(prepare_data.reviews, "unexpected review tag 'no'"),
                       (prepare_data.polarity, "unexpected label '__label__meh'"),
                       (prepare_data.wordsim, "not WORD<tab>WORD<tab>SCORE")]:
        with pytest.raises(UserError, match=f"is not gensim's test data as shipped \\({what}") as error:
            read(tmp_path)
        assert error.value.fix == "reinstall gensim from its wheel"


def test_reviews_npz_holds_the_imdb_sentences_none_of_them_a_polarity_sentence(polarity_npz):
    with np.load(polarity_npz.with_name("reviews.npz")) as reviews, np.load(polarity_npz) as polarity:
        ids, mask = reviews["input_ids"], reviews["attention_mask"]
        lengths = mask.sum(axis=1)
        assert ids.shape[0] == 135 and lengths.min() >= 6  # [CLS], at least 4 words, [SEP]
        assert (ids[:, 0] == 101).all() and (ids[np.arange(len(ids)), lengths - 1] == 102).all()
        known = {tuple(row[m.astype(bool)]) for row, m in zip(polarity["input_ids"], polarity["attention_mask"])}
        assert not known & {tuple(row[m.astype(bool)]) for row, m in zip(ids, mask)}
