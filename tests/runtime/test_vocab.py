"""Tests for runtime.vocab: loading and validating vocabularies in the original SCAN layout."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from runtime.vocab import SPECIAL_TOKENS, UNK_ID, Vocabulary, VocabularyError
from tests.helpers import vocab_dict

WORDS = ["a", "dog", "cat", ",", ".", "running", "the", "'s", "ball", "do", "n't", "café"]


def _vocab_dict(words: list[str] = WORDS) -> dict:
    return vocab_dict(words)


@pytest.fixture
def vocab() -> Vocabulary:
    return Vocabulary.from_dict(_vocab_dict())


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
    with pytest.raises(VocabularyError, match=r"inconsistent.*'dog'"):
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
