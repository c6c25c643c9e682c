"""Tests for runtime.tokenizer: SCAN-compatible tokenisation, vocabulary loading and validation.

Expected token lists are hard-coded: punkt data (needed by nltk.word_tokenize) is not available
offline, and these lists follow NLTKWordTokenizer's rules (contractions split before n't / 's,
final period split off, ``"`` -> `` / '', commas split, brackets padded).
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest

from runtime.tokenizer import (
    SPECIAL_TOKENS,
    UNK_ID,
    Tokenizer,
    TokenizerError,
    Vocabulary,
    VocabularyError,
    tokenize,
)
from tests.conftest import GOLDEN

WORDS = ["a", "dog", "cat", ",", ".", "running", "the", "'s", "ball", "do", "n't", "café"]


def _vocab_dict(words: list[str] = WORDS) -> dict:
    all_words = list(SPECIAL_TOKENS) + words
    return {
        "word2idx": {w: i for i, w in enumerate(all_words)},
        "idx2word": {str(i): w for i, w in enumerate(all_words)},
        "idx": len(all_words),
    }


@pytest.fixture
def vocab() -> Vocabulary:
    return Vocabulary.from_dict(_vocab_dict())


@pytest.fixture
def tok(vocab: Vocabulary) -> Tokenizer:
    return Tokenizer(vocab)


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
    ids = tok.encode("<start> a")
    assert ids[0] == 1 and ids[-1] == 2
    assert 1 not in ids[1:-1].tolist() and 0 not in ids.tolist()


# ---------------------------------------------------------------- Tokenizer


def test_encode(tok: Tokenizer, vocab: Vocabulary) -> None:
    ids = tok.encode("The dog's ball, Café!")
    assert ids.dtype == np.int64
    words = ["<start>", "the", "dog", "'s", "ball", ",", "café", "<unk>", "<end>"]  # "!" unknown
    assert ids.tolist() == [vocab.word2idx[w] for w in words]


def test_encode_batch(tok: Tokenizer) -> None:
    ids, lengths = tok.encode_batch(["a dog running.", "cat", b"don't"])
    assert ids.dtype == np.int64 and lengths.dtype == np.int64
    assert ids.shape == (3, 6)
    assert lengths.tolist() == [6, 3, 4]
    assert ids[0].tolist() == tok.encode("a dog running.").tolist()
    assert ids[1].tolist() == tok.encode("cat").tolist() + [0, 0, 0]
    assert ids[2].tolist() == tok.encode("don't").tolist() + [0, 0]


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
        ids = tok.encode("zebra quokka")
    assert ids.tolist() == [1, UNK_ID, UNK_ID, 2]
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("unknown" in m and "zebra quokka" in m for m in messages)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="runtime.tokenizer"):
        tok.encode("a zebra")
    assert not caplog.records


@pytest.mark.parametrize("bad", [None, 42, ["a dog"]])
def test_non_str_caption(tok: Tokenizer, bad: object) -> None:
    with pytest.raises(TokenizerError, match=f"expected a str.*received {type(bad).__name__}"):
        tok.encode(bad)  # type: ignore[arg-type]


def test_invalid_utf8_bytes(tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="not UTF-8"):
        tok.encode(b"caf\xe9")


@pytest.mark.parametrize("empty", ["", "   ", "\n\t"])
def test_empty_query(tok: Tokenizer, empty: str) -> None:
    with pytest.raises(TokenizerError, match="empty query"):
        tok.encode(empty)


def test_max_words(vocab: Vocabulary) -> None:
    tok = Tokenizer(vocab, max_words=5)
    assert len(tok.encode("a dog running")) == 5  # 3 words + <start>/<end> fits exactly
    with pytest.raises(TokenizerError, match=r"received 6 ids.*max_words=5"):
        tok.encode("a dog running .")
    with pytest.raises(ValueError, match="max_words"):
        Tokenizer(vocab, max_words=2)


# ---------------------------------------------------------------- Vocabulary


def test_vocabulary_basics(vocab: Vocabulary) -> None:
    assert len(vocab) == 4 + len(WORDS)
    assert vocab("dog") == vocab.word2idx["dog"] == vocab.idx2word.index("dog")
    assert vocab("zebra") == UNK_ID
    assert vocab.idx2word[:4] == list(SPECIAL_TOKENS)
    with pytest.raises(AttributeError):
        vocab.word2idx = {}  # type: ignore[misc]


def test_vocabulary_pickles(vocab: Vocabulary) -> None:
    # Worker processes receive the vocabulary by pickle; the read-only guard must not break it.
    copy = pickle.loads(pickle.dumps(vocab))
    assert copy == vocab and copy.word2idx == vocab.word2idx


def test_vocabulary_json_round_trip(tmp_path: Path, vocab: Vocabulary) -> None:
    d = vocab.to_json_dict()
    assert d == _vocab_dict()
    path = tmp_path / "v.json"
    path.write_text(json.dumps(d), encoding="utf-8")
    assert Vocabulary.from_json(path) == vocab
    assert Vocabulary.from_json(path).to_json_dict() == d


def test_vocabulary_int_keys_accepted() -> None:
    d = _vocab_dict()
    d["idx2word"] = {int(k): w for k, w in d["idx2word"].items()}
    assert Vocabulary.from_dict(d) == Vocabulary.from_dict(_vocab_dict())


def test_vocabulary_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes(json.dumps(_vocab_dict(["café"]), ensure_ascii=False).encode("latin-1"))
    with pytest.raises(VocabularyError, match=r"latin1\.json.*not UTF-8"):
        Vocabulary.from_json(path)


def test_vocabulary_not_json(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(VocabularyError, match=r"broken\.json.*invalid JSON"):
        Vocabulary.from_json(path)


def test_vocabulary_missing_key() -> None:
    d = _vocab_dict()
    del d["idx"]
    with pytest.raises(VocabularyError, match=r"vocab\.json.*missing idx"):
        Vocabulary.from_dict(d, source="vocab.json")


def test_vocabulary_not_an_object() -> None:
    with pytest.raises(VocabularyError, match="received list"):
        Vocabulary.from_dict([1, 2], source="v.json")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "words, message",
    [
        (["<pad>", "<start>", "<unk>", "<end>"], r"'<end>' at id 2, received '<unk>'"),
        (["<pad>", "<start>", "<end>"], r"'<unk>' at id 3, received no word"),
    ],
)
def test_vocabulary_special_tokens(words: list[str], message: str) -> None:
    d = {
        "word2idx": {w: i for i, w in enumerate(words)},
        "idx2word": {str(i): w for i, w in enumerate(words)},
        "idx": len(words),
    }
    with pytest.raises(VocabularyError, match=message):
        Vocabulary.from_dict(d)


def test_vocabulary_inconsistent_maps() -> None:
    d = _vocab_dict()
    d["word2idx"]["dog"], d["word2idx"]["cat"] = d["word2idx"]["cat"], d["word2idx"]["dog"]
    with pytest.raises(VocabularyError, match="inconsistent.*'dog'"):
        Vocabulary.from_dict(d)
    d = _vocab_dict()
    d["word2idx"]["zebra"] = 99
    with pytest.raises(VocabularyError, match="inconsistent"):
        Vocabulary.from_dict(d)


def test_vocabulary_idx_mismatch() -> None:
    d = _vocab_dict()
    d["idx"] += 1
    with pytest.raises(VocabularyError, match=r"missing \[16\]"):
        Vocabulary.from_dict(d)
    d = _vocab_dict()
    d["idx2word"]["1"] = d["idx2word"].pop("5")
    d["idx2word"]["1"] = "<start>"
    with pytest.raises(VocabularyError, match="ids 0"):
        Vocabulary.from_dict(d)


def test_vocabulary_duplicate_word() -> None:
    d = _vocab_dict(["a", "a"])
    with pytest.raises(VocabularyError, match="'a' at ids 4 and 5"):
        Vocabulary.from_dict(d)


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
        assert tok.encode(cap).tolist() == expected, cap
    ids, lengths = tok.encode_batch(captions)
    assert lengths.tolist() == [len(c.split()) + 2 for c in captions]
    assert ids.shape == (len(captions), max(lengths))
    # The README promises some out-of-vocabulary words; check the path is exercised.
    assert any(tok.unknown_words(c) for c in captions)
