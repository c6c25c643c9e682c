"""Caption tokenisation, compatible with the original SCAN code (the vocabulary: runtime/vocab.py).

The original SCAN data loader turns a caption into ids with::

    tokens = nltk.tokenize.word_tokenize(caption.lower())
    ids = [vocab('<start>')] + [vocab(t) for t in tokens] + [vocab('<end>')]

where ``vocab`` is loaded from ``{"word2idx": {...}, "idx2word": {"0": "<pad>", ...}, "idx": N}``,
ids 0..3 are ``<pad> <start> <end> <unk>`` and any word not in ``word2idx`` maps to ``<unk>``.

The runtime must work offline, so it cannot call ``word_tokenize``: that function first splits the
text into sentences with the punkt model (``sent_tokenize``), which needs downloaded NLTK data, and
then runs :class:`nltk.tokenize.destructive.NLTKWordTokenizer` (the improved Treebank tokenizer,
pure regular expressions, no data) on each sentence. Here ``NLTKWordTokenizer`` runs once on the
whole lower-cased caption, i.e. this equals ``word_tokenize(caption.lower(), preserve_line=True)``.

Difference from ``word_tokenize`` (verified against NLTK 3.10 with a punkt tokenizer): only the
tokenizer rules anchored at the *start* or *end* of the text behave differently, because without a
sentence split they only see the start and end of the whole caption, not of each sentence.

* A period that ends a sentence *inside* the caption stays attached to its word:
  ``"a dog runs. a cat sits."`` gives ``a dog runs. a cat sits .`` (token ``"runs."``, which is
  then almost certainly ``<unk>``) where ``word_tokenize`` gives ``a dog runs . a cat sits .``.
  The same holds before closing brackets/quotes (``"a dog.) a cat"`` -> ``dog.`` ``)``), and since
  the clitic rules need a following space, a clitic before such a period is not split either
  (``"the dog's. a cat"`` -> ``dog's.``, where ``word_tokenize`` gives ``dog 's .``).
* A double quote that opens an inner sentence directly after a newline or tab (not a space)
  becomes ``''`` instead of ````` (after a space both give `````).

Everything else is identical: single-sentence captions (the normal case for image-text matching),
a final period, ``!`` / ``?`` / ``...`` / ``,`` / ``;`` anywhere, and periods punkt does not treat
as sentence ends (abbreviations such as ``"mr."`` stay attached in both).

Lower-casing is ``str.lower()`` with no Unicode normalisation, as in the original (``"Café"`` ->
``"café"``; a decomposed ``e`` + combining accent stays a different string).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from runtime.vocab import END, END_ID, PAD_ID, START, START_ID, UNK, UNK_ID, Vocabulary, quote

__all__ = ["Tokenizer", "TokenizerError", "tokenize"]

logger = logging.getLogger(__name__)


def _word_tokenizer_class() -> type:
    """NLTK's ``NLTKWordTokenizer``, without running ``nltk/__init__.py``.

    Importing any ``nltk`` submodule the normal way first runs the package's ``__init__``, which imports
    nearly all of NLTK, scipy.stats among it: 0.9 s of every process's start (measured, python -X
    importtime), more than a search of 200 captions against 5K images spends on its candidates. The
    tokenizer needs one pure-regex module and its three small imports, so the two parent packages are put
    in ``sys.modules`` as bare namespace modules for the import and removed right after: a later ``import
    nltk`` (by the user or a test) runs the real ``__init__`` and reuses the loaded submodules. When nltk is
    already imported, or the layout is not what this expects, it is the normal import.
    """
    import importlib.util
    import sys
    import types

    if "nltk" not in sys.modules:
        spec = importlib.util.find_spec("nltk")
        if spec is not None and spec.submodule_search_locations:
            root = list(spec.submodule_search_locations)
            made = []
            try:
                for name, path in (("nltk", root), ("nltk.tokenize", [f"{r}/tokenize" for r in root])):
                    bare = types.ModuleType(name)
                    bare.__path__ = path
                    sys.modules[name] = bare
                    made.append(name)
                from nltk.tokenize.destructive import NLTKWordTokenizer

                return NLTKWordTokenizer
            except ImportError:
                logger.debug("nltk's tokenizer module did not load on its own; importing nltk", exc_info=True)
                for name in [n for n in sys.modules if n.startswith("nltk")]:
                    del sys.modules[name]
            finally:
                for name in made:
                    sys.modules.pop(name, None)
    from nltk.tokenize.destructive import NLTKWordTokenizer

    return NLTKWordTokenizer


# NLTKWordTokenizer keeps no state between calls (only compiled class-level regexes and locals),
# so one shared instance is safe to use from several threads.
_WORD_TOKENIZER = _word_tokenizer_class()()


class TokenizerError(ValueError):
    """A caption cannot be turned into ids (wrong type, not UTF-8, empty, too long)."""


def _as_text(caption: Any, name: str = "caption") -> str:
    """Accept str, or bytes/bytearray that are valid UTF-8 (e.g. straight off an HTTP body)."""
    if isinstance(caption, str):
        return caption
    if isinstance(caption, (bytes, bytearray)):
        try:
            return bytes(caption).decode("utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerError(
                f"{name} {quote(bytes(caption))}: expected UTF-8 text, received bytes that are "
                f"not UTF-8 ({e.reason} at byte {e.start})"
            ) from None
    raise TokenizerError(f"{name}: expected a str (or UTF-8 bytes), received {type(caption).__name__} {quote(caption)}")


def tokenize(caption: str) -> list[str]:
    """Lower-case and split into NLTK Treebank tokens, as the original SCAN (see module doc).

    Returns ``[]`` for an empty or whitespace-only caption; :meth:`Tokenizer.encode_batch` rejects that.
    """
    return _WORD_TOKENIZER.tokenize(_as_text(caption).lower())


class Tokenizer:
    """Captions -> id arrays for the text encoder, with input validation.

    ``max_words`` is the maximum number of ids per caption *including* ``<start>`` and ``<end>``
    (so the longest accepted caption has ``max_words - 2`` tokens); ``None`` means unlimited.
    """

    def __init__(self, vocab: Vocabulary, max_words: int | None = None) -> None:
        if not isinstance(vocab, Vocabulary):
            raise TypeError(f"expected a Vocabulary, received {type(vocab).__name__}")
        if max_words is not None and (isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 3):
            # 3 = <start> + one word + <end>: anything smaller would reject every caption.
            raise ValueError(
                f"max_words must be None or an integer >= 3 (ids incl. <start>/<end>), received {max_words!r}"
            )
        self.vocab = vocab
        self.max_words = max_words

    def _encode(self, caption: Any, name: str) -> np.ndarray:
        text = _as_text(caption, name)
        tokens = tokenize(text)
        if not tokens:
            raise TokenizerError(f"empty query: {name} {quote(text)} has no words (expected at least one)")
        n_ids = len(tokens) + 2
        if self.max_words is not None and n_ids > self.max_words:
            raise TokenizerError(
                f"{name} {quote(text)} is too long: received {n_ids} ids ({len(tokens)} tokens "
                f"+ <start>/<end>), the maximum is max_words={self.max_words}"
            )
        ids = np.empty(n_ids, dtype=np.int64)
        ids[0] = START_ID
        ids[-1] = END_ID
        ids[1:-1] = [self.vocab(t) for t in tokens]
        if np.all(ids[1:-1] == UNK_ID):
            # Still a valid query (the original would score it too), but its ranking carries
            # almost no information; make that visible to whoever runs the service.
            logger.warning(
                "%s %s has only unknown words (all %d tokens map to <unk>)",
                name,
                quote(text),
                len(tokens),
            )
        return ids

    def encode_batch(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encode several captions, in input order.

        Returns ``(ids, lengths)``: ``ids`` is (Q, Lmax) int64 padded with ``<pad>`` (0),
        ``lengths`` is (Q,) int64 with each caption's id count. An empty sequence gives
        shapes (0, 0) and (0,). Errors name the offending index.
        """
        # A bare str is a Sequence too; iterating it would encode one caption per character.
        if isinstance(captions, (str, bytes, bytearray)) or not isinstance(captions, Sequence):
            raise TokenizerError(
                f"captions: expected a sequence of captions (e.g. a list of str), received "
                f"{type(captions).__name__} {quote(captions)}"
            )
        encoded = [self._encode(c, f"captions[{i}]") for i, c in enumerate(captions)]
        lengths = np.array([len(e) for e in encoded], dtype=np.int64)
        width = int(lengths.max()) if len(encoded) else 0
        ids = np.full((len(encoded), width), PAD_ID, dtype=np.int64)
        for row, e in zip(ids, encoded):
            row[: len(e)] = e
        return ids, lengths

    def unknown_words(self, caption: str) -> list[str]:
        """Tokens of ``caption`` that map to ``<unk>``, each once, in order of first appearance."""
        tokens = tokenize(_as_text(caption))
        # dict keeps insertion order: an ordered de-duplication.
        return list(dict.fromkeys(t for t in tokens if t not in self.vocab))

    def tokens(self, caption: str) -> list[str]:
        """The tokens the text encoder sees for ``caption``, one per id: ``<start>``, each word (``<unk>`` for a
        word not in the vocabulary) and ``<end>``; what an explanation's rows are labelled with."""
        words = [t if t in self.vocab else UNK for t in tokenize(_as_text(caption))]
        return [START, *words, END]

    def __repr__(self) -> str:
        return f"Tokenizer({self.vocab!r}, max_words={self.max_words})"
