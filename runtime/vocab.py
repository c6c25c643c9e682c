"""The vocabulary of a SCAN model: word <-> id in the original layout, validated on load.

The original ``vocab.py`` (kuanghuei/SCAN) writes ``{"word2idx": {...}, "idx2word": {"0": "<pad>", ...},
"idx": N}``; ids 0..3 are ``<pad> <start> <end> <unk>`` and any word not in ``word2idx`` maps to ``<unk>``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "END",
    "END_ID",
    "PAD",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "START",
    "START_ID",
    "UNK",
    "UNK_ID",
    "Vocabulary",
    "VocabularyError",
    "quote",
]

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
PAD_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3
# The original vocab.py adds these four first, so every SCAN vocabulary has them at ids 0..3 and
# the trained embedding rows are laid out that way; a file without them cannot match a checkpoint.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, START, END, UNK)

# How much of a user-supplied caption to quote in errors and logs: enough to recognise it without
# flooding logs with a pathological multi-megabyte input.
_QUOTE_CHARS = 80


class VocabularyError(ValueError):
    """A vocabulary file or dict does not have the original SCAN layout."""


def quote(value: Any) -> str:
    """Short repr of a user-supplied value for error messages."""
    text = repr(value)
    if len(text) > _QUOTE_CHARS:
        text = text[: _QUOTE_CHARS - 3] + "..."
    return text


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but true/false in a vocab file is a corrupt file, not an id.
    return isinstance(value, int) and not isinstance(value, bool)


class Vocabulary:
    """Word <-> id mapping in the original SCAN layout.

    Build it with :meth:`from_json` or :meth:`from_dict`; both validate the layout. Attributes
    ``word2idx`` (dict) and ``idx2word`` (list, position = id) are private copies of the input and
    cannot be re-bound; treat them as read-only.
    """

    __slots__ = ("idx2word", "source", "word2idx")

    word2idx: dict[str, int]
    idx2word: list[str]
    source: str

    def __init__(self, idx2word: Sequence[str], source: str = "<list>") -> None:
        """Build from the id-ordered word list; prefer :meth:`from_dict` / :meth:`from_json`."""
        words = list(idx2word)
        bad = [i for i, w in enumerate(words) if not isinstance(w, str)]
        if bad:
            raise VocabularyError(
                f"{source}: expected every word to be a str, received "
                f"{type(words[bad[0]]).__name__} {quote(words[bad[0]])} at id {bad[0]}"
            )
        _check_specials(words, source)
        word2idx: dict[str, int] = {}
        for i, w in enumerate(words):
            if w in word2idx:
                raise VocabularyError(
                    f"{source}: expected each word once, received {quote(w)} at ids {word2idx[w]} and {i}"
                )
            word2idx[w] = i
        object.__setattr__(self, "idx2word", words)
        object.__setattr__(self, "word2idx", word2idx)
        object.__setattr__(self, "source", source)

    def __setattr__(self, name: str, value: Any) -> None:
        # Tokenizers and exported models assume the mapping never changes after loading.
        raise AttributeError(f"Vocabulary is read-only (cannot set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Vocabulary is read-only (cannot delete {name!r})")

    def __reduce__(self) -> tuple[Any, ...]:
        # Default slot pickling restores state with setattr, which __setattr__ forbids; rebuild
        # through __init__ instead so worker processes can receive a Vocabulary.
        return (Vocabulary, (self.idx2word, self.source))

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Vocabulary:
        """Load ``vocab/<data_name>_vocab.json`` as written by the original SCAN ``vocab.py``.

        Raises VocabularyError if the file is not UTF-8 JSON or not in the original layout;
        OSError (e.g. FileNotFoundError) if it cannot be read at all.
        """
        source = os.fspath(path)
        with open(source, "rb") as f:
            raw = f.read()
        try:
            # utf-8-sig: accept a BOM, which some editors add, rather than fail on it.
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise VocabularyError(
                f"{source}: expected a UTF-8 JSON file, received bytes that are not UTF-8 "
                f"({e.reason} at byte {e.start})"
            ) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise VocabularyError(
                f"{source}: expected a JSON file, received invalid JSON ({e.msg} at line {e.lineno} column {e.colno})"
            ) from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<dict>") -> Vocabulary:
        """Build from ``{"word2idx": {...}, "idx2word": {...}, "idx": N}``.

        ``idx2word`` keys may be decimal strings (as in JSON) or ints (as in the pickled original
        object); a list indexed by id is accepted too. Extra top-level keys are ignored.
        """
        if not isinstance(d, Mapping):
            raise VocabularyError(
                f"{source}: expected a JSON object with keys word2idx, idx2word, idx, received {type(d).__name__}"
            )
        missing = [k for k in ("word2idx", "idx2word", "idx") if k not in d]
        if missing:
            raise VocabularyError(
                f"{source}: expected keys word2idx, idx2word, idx, missing {', '.join(missing)} "
                f"(received keys: {', '.join(map(str, d.keys())) or 'none'})"
            )
        size = d["idx"]
        if not _is_int(size) or size < 0:
            raise VocabularyError(
                f"{source}: expected 'idx' to be a non-negative integer (the number of words), received {quote(size)}"
            )
        words = _idx2word_list(d["idx2word"], size, source)
        vocab = cls(words, source=source)
        _check_word2idx(d["word2idx"], vocab.idx2word, source)
        return vocab

    def to_json_dict(self) -> dict[str, Any]:
        """The original JSON layout; ``from_dict(v.to_json_dict())`` gives an equal vocabulary."""
        return {
            "word2idx": dict(self.word2idx),
            "idx2word": {str(i): w for i, w in enumerate(self.idx2word)},
            "idx": len(self.idx2word),
        }

    def __len__(self) -> int:
        return len(self.idx2word)

    def __call__(self, word: str) -> int:
        """Id of ``word``; ``<unk>`` (3) for a word not in the vocabulary, like the original."""
        if not isinstance(word, str):
            raise TypeError(f"expected a str word, received {type(word).__name__} {quote(word)}")
        return self.word2idx.get(word, UNK_ID)

    def __contains__(self, word: object) -> bool:
        return word in self.word2idx

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocabulary):
            return NotImplemented
        # idx2word determines word2idx, so comparing it is enough.
        return self.idx2word == other.idx2word

    __hash__ = None  # type: ignore[assignment]  # mutable containers inside; not hashable

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words from {self.source})"


def _idx2word_list(raw: Any, size: int, source: str) -> list[str]:
    """Turn idx2word (dict with str/int keys, or list) into a list, checking ids are 0..size-1."""
    if isinstance(raw, list):
        words = raw
    elif isinstance(raw, Mapping):
        by_id: dict[int, Any] = {}
        for key, word in raw.items():
            if _is_int(key):
                i = key
            elif isinstance(key, str) and key.isdigit() and key.isascii():
                i = int(key)
            else:
                raise VocabularyError(
                    f'{source}: expected idx2word keys to be ids ("0", "1", ...), received key {quote(key)}'
                )
            if i in by_id:
                raise VocabularyError(f"{source}: idx2word has id {i} more than once")
            by_id[i] = word
        expected = set(range(size))
        if set(by_id) != expected:
            extra = sorted(set(by_id) - expected)
            absent = sorted(expected - set(by_id))
            raise VocabularyError(
                f"{source}: expected idx2word to have ids 0..{size - 1} ('idx' is {size}), "
                f"received {len(by_id)} ids"
                + (f"; missing {absent[:5]}" if absent else "")
                + (f"; unexpected {extra[:5]}" if extra else "")
            )
        words = [by_id[i] for i in range(size)]
    else:
        raise VocabularyError(
            f"{source}: expected idx2word to be an object mapping ids to words, received {type(raw).__name__}"
        )
    if len(words) != size:
        raise VocabularyError(f"{source}: expected {size} words in idx2word ('idx' is {size}), received {len(words)}")
    return list(words)


def _check_specials(words: list[str], source: str) -> None:
    for i, token in enumerate(SPECIAL_TOKENS):
        got = words[i] if i < len(words) else None
        if got != token:
            raise VocabularyError(
                f"{source}: expected special token {token!r} at id {i}, received "
                + ("no word (vocabulary too small)" if got is None else quote(got))
            )


def _check_word2idx(raw: Any, words: list[str], source: str) -> None:
    """word2idx must be exactly the inverse of idx2word."""
    if not isinstance(raw, Mapping):
        raise VocabularyError(
            f"{source}: expected word2idx to be an object mapping words to ids, received {type(raw).__name__}"
        )
    if len(raw) != len(words):
        raise VocabularyError(
            f"{source}: word2idx and idx2word are inconsistent: expected {len(words)} entries in "
            f"word2idx (as in idx2word), received {len(raw)}"
        )
    for word, i in raw.items():
        if not _is_int(i) or not 0 <= i < len(words) or words[i] != word:
            got = words[i] if _is_int(i) and 0 <= i < len(words) else None
            raise VocabularyError(
                f"{source}: word2idx and idx2word are inconsistent: word2idx maps {quote(word)} "
                f"to {quote(i)}, but idx2word" + (f"[{i}] is {quote(got)}" if got is not None else " has no such id")
            )
