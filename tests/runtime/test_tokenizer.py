"""Tests for runtime.tokenizer: SCAN-compatible tokenisation and caption ids.

Expected token lists are hard-coded: punkt data (needed by nltk.word_tokenize) is not available
offline, and these lists follow NLTKWordTokenizer's rules (contractions split before n't / 's,
final period split off, ``"`` -> `` / '', commas split, brackets padded).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from runtime.tokenizer import Tokenizer, TokenizerError, tokenize
from runtime.vocab import UNK_ID, Vocabulary
from tests.conftest import GOLDEN
from tests.helpers import vocab_dict

WORDS = ["a", "dog", "cat", ",", ".", "running", "the", "'s", "ball", "do", "n't", "café"]


@pytest.fixture
def vocab() -> Vocabulary:
    return Vocabulary.from_dict(vocab_dict(WORDS))


@pytest.fixture
def tok(vocab: Vocabulary) -> Tokenizer:
    return Tokenizer(vocab)


def encode(tok: Tokenizer, caption: object) -> np.ndarray:
    """The ids of one caption, unpadded."""
    ids, lengths = tok.encode_batch([caption])  # type: ignore[list-item]
    return ids[0, : lengths[0]]


# ---------------------------------------------------------------- tokenize


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a dog, running.", ["a", "dog", ",", "running", "."]),
        ("the dog's ball", ["the", "dog", "'s", "ball"]),
        ("don't", ["do", "n't"]),
        ("won't stop", ["wo", "n't", "stop"]),
        ("A Dog RUNNING", ["a", "dog", "running"]),
        ("Café au lait", ["café", "au", "lait"]),
        ("ÉCOLE", ["école"]),
        ('a "big" dog.', ["a", "``", "big", "''", "dog", "."]),
        ("a ‘dog’ and “cat”", ["a", "‘", "dog", "’", "and", "“", "cat", "”"]),
        ("dogs' toys", ["dogs", "'", "toys"]),
        ("a (big) dog!", ["a", "(", "big", ")", "dog", "!"]),
        ("is it a dog?", ["is", "it", "a", "dog", "?"]),
        ("a dog...", ["a", "dog", "..."]),
        ("1,000 dogs; 3.5 m", ["1,000", "dogs", ";", "3.5", "m"]),
        ("  two\tdogs\n", ["two", "dogs"]),
        ("A dog .", ["a", "dog", "."]),  # the golden captions' " ." ending
    ],
)
def test_tokenize_single_sentence(caption: str, expected: list[str]) -> None:
    assert tokenize(caption) == expected


def test_tokenize_multi_sentence_keeps_inner_period() -> None:
    # Documented difference from word_tokenize (which gives "runs", "." via punkt).
    assert tokenize("A dog runs. A cat sits.") == ["a", "dog", "runs.", "a", "cat", "sits", "."]
    # "!" and "?" are split wherever they are, so these match word_tokenize.
    assert tokenize("a dog! a cat?") == ["a", "dog", "!", "a", "cat", "?"]


def test_tokenize_empty_and_bytes() -> None:
    assert tokenize("   ") == []
    assert tokenize("Café".encode()) == ["café"]


def test_special_tokens_cannot_be_injected(tok: Tokenizer) -> None:
    # "<" and ">" are split off, so a caption can never produce the special ids 0..3 as words.
    assert tokenize("<pad> <unk>") == ["<", "pad", ">", "<", "unk", ">"]
    ids = encode(tok, "<start> a")
    assert ids[0] == 1 and ids[-1] == 2
    assert 1 not in ids[1:-1].tolist() and 0 not in ids.tolist()


# ---------------------------------------------------------------- Tokenizer


def test_encode_one(tok: Tokenizer, vocab: Vocabulary) -> None:
    ids = encode(tok, "The dog's ball, Café!")
    assert ids.dtype == np.int64
    words = ["<start>", "the", "dog", "'s", "ball", ",", "café", "<unk>", "<end>"]  # "!" unknown
    assert ids.tolist() == [vocab.word2idx[w] for w in words]


def test_encode_batch(tok: Tokenizer) -> None:
    ids, lengths = tok.encode_batch(["a dog running.", "cat", b"don't"])
    assert ids.dtype == np.int64 and lengths.dtype == np.int64
    assert ids.shape == (3, 6)
    assert lengths.tolist() == [6, 3, 4]
    assert ids[0].tolist() == encode(tok, "a dog running.").tolist()
    assert ids[1].tolist() == [*encode(tok, "cat").tolist(), 0, 0, 0]
    assert ids[2].tolist() == [*encode(tok, "don't").tolist(), 0, 0]


def test_encode_batch_empty_and_bare_str(tok: Tokenizer) -> None:
    ids, lengths = tok.encode_batch([])
    assert ids.shape == (0, 0) and lengths.shape == (0,)
    with pytest.raises(TokenizerError, match="sequence of captions"):
        tok.encode_batch("a dog")


def test_encode_batch_names_bad_index(tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match=r"empty query: captions\[1\]"):
        tok.encode_batch(["a dog", "  "])


def test_unknown_words(tok: Tokenizer) -> None:
    assert tok.unknown_words("A zebra and a Zebra, quokka") == ["zebra", "and", "quokka"]
    assert tok.unknown_words("a dog") == []


def test_only_unknown_words_warns(tok: Tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="runtime.tokenizer"):
        ids = encode(tok, "zebra quokka")
    assert ids.tolist() == [1, UNK_ID, UNK_ID, 2]
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("unknown" in m and "zebra quokka" in m for m in messages)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="runtime.tokenizer"):
        encode(tok, "a zebra")
    assert not caplog.records


@pytest.mark.parametrize("bad", [None, 42, ["a dog"]])
def test_non_str_caption(tok: Tokenizer, bad: object) -> None:
    with pytest.raises(TokenizerError, match=f"expected a str.*received {type(bad).__name__}"):
        encode(tok, bad)  # type: ignore[arg-type]


def test_invalid_utf8_bytes(tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="not UTF-8"):
        encode(tok, b"caf\xe9")


@pytest.mark.parametrize("empty", ["", "   ", "\n\t"])
def test_empty_query(tok: Tokenizer, empty: str) -> None:
    with pytest.raises(TokenizerError, match="empty query"):
        encode(tok, empty)


def test_max_words(vocab: Vocabulary) -> None:
    tok = Tokenizer(vocab, max_words=5)
    assert len(encode(tok, "a dog running")) == 5  # 3 words + <start>/<end> fits exactly
    with pytest.raises(TokenizerError, match=r"received 6 ids.*max_words=5"):
        encode(tok, "a dog running .")
    with pytest.raises(ValueError, match="max_words"):
        Tokenizer(vocab, max_words=2)


# ---------------------------------------------------------------- golden case


def test_golden_captions() -> None:
    golden = GOLDEN / "t2i_lse_f30k"
    vocab = Vocabulary.from_json(golden / "vocab.json")
    assert vocab.to_json_dict() == json.loads((golden / "vocab.json").read_text(encoding="utf-8"))
    tok = Tokenizer(vocab)
    captions = (golden / "test_caps.txt").read_text(encoding="utf-8").splitlines()
    assert captions
    for cap in captions:
        words = cap.lower().split()
        assert tokenize(cap) == words, cap
        expected = [1] + [vocab.word2idx.get(w, UNK_ID) for w in words] + [2]
        assert encode(tok, cap).tolist() == expected, cap
    ids, lengths = tok.encode_batch(captions)
    assert lengths.tolist() == [len(c.split()) + 2 for c in captions]
    assert ids.shape == (len(captions), max(lengths))
    # tests/golden/README.md promises some out-of-vocabulary words; check the path is exercised.
    assert any(tok.unknown_words(c) for c in captions)
