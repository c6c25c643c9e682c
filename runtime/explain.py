"""Why a caption and an image matched: the model's own word-region attention for one pair.

SCAN scores a pair by attending, for each query item, over the other side (docs/design.md section 1):
with ``t2i`` each word attends over the image's regions, with ``i2t`` each region over the caption's
words. ``explain`` returns that attention, each row's cosine with its attended context (its
*relevance*) and the score, the model's aggregation of the relevances (``agg_func``, ``lambda_lse``).

It runs the head's own code (``runtime/array_model.py``'s ``cross_attention`` and ``aggregate_pairs``,
numpy, one pair), so the score is the search score of the pair (to 1e-5: another summation order than
a batched block) and the attention is what the head weighed the context with, not a re-derivation.
Its input is what a search already has: the text encoder's word vectors of the caption and the image
encoder's region vectors (and Gram matrix, the t2i head's per-image term) of the image, whichever
side is the query and whichever the gallery.

An ensemble explains each member with its own encoders and combines the scores with the members'
weights (``combine``), as its search does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime import array_model as am
from runtime.config import SCANConfig


class ExplainError(ValueError):
    """A pair to explain does not fit the model: wrong shapes, a length out of range, bad weights."""


@dataclass(frozen=True)
class Explanation:
    """One (caption, image) pair as one model saw it.

    ``attention``: float32, rows sum to 1. ``t2i``: (words, regions), each word's softmax over the regions;
    ``i2t``: (regions, words), each region's softmax over the words. ``relevance``: one cosine per row,
    between the row's item and its attended context; ``score`` aggregates them with the model's ``agg_func``.
    ``words``: the caption's tokens as the model saw them (``Tokenizer.tokens``), when known.
    """

    score: float
    attention: np.ndarray
    relevance: np.ndarray
    cross_attn: str
    words: tuple[str, ...] = ()

    @property
    def n_words(self) -> int:
        return self.attention.shape[0 if self.cross_attn == "t2i" else 1]

    @property
    def n_regions(self) -> int:
        return self.attention.shape[1 if self.cross_attn == "t2i" else 0]

    def top(self, k: int) -> np.ndarray:
        """Each row's ``k`` most attended context items (t2i: regions of each word; i2t: words of each region),
        by falling weight, ties to the lower index: int64 (rows, min(k, context))."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ExplainError(f"k must be a positive integer, received {k!r}")
        return np.argsort(-self.attention, axis=1, kind="stable")[:, :k]

    def to_json(self) -> dict[str, Any]:
        """The JSON body's explanation fields (floats as Python floats)."""
        return {
            "score": self.score,
            "words": list(self.words),
            "attention": self.attention.astype(float).tolist(),
            "relevance": self.relevance.astype(float).tolist(),
            "cross_attn": self.cross_attn,
        }


@dataclass(frozen=True)
class EnsembleExplanation:
    """Each member's explanation and the ensemble's score: the members' scores' weighted mean."""

    score: float
    members: tuple[Explanation, ...]
    weights: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "weights": list(self.weights),
            "members": [m.to_json() for m in self.members],
        }


def _matrix(name: str, a: Any, d: int) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[1] != d or a.shape[0] < 1 or a.dtype.kind != "f":
        raise ExplainError(f"{name}: expected a float array (n >= 1, {d}), received {a.dtype} {a.shape}")
    return a


def explain(
    cfg: SCANConfig,
    words: Any,
    length: int,
    regions: Any,
    image_gram: Any = None,
    gemm_dtype: Any = np.float32,
) -> Explanation:
    """Explain one pair: ``words`` (L, d) the caption's word vectors, zero past ``length`` (a gallery row's
    padding may follow), ``regions`` (R, d) the image's region vectors, ``image_gram`` (R, R) their Gram
    matrix (t2i; None: computed here). Arrays in their storage dtype (float32 or float16), as the head.
    """
    d = cfg.embed_size
    words = _matrix("words", words, d)
    regions = _matrix("regions", regions, d)
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or not 1 <= length <= len(words):
        raise ExplainError(f"length: expected an integer in [1, {len(words)}], received {length!r}")
    r = len(regions)
    if image_gram is not None:
        image_gram = np.asarray(image_gram)
        if image_gram.shape != (r, r):
            raise ExplainError(f"image_gram: expected shape ({r}, {r}), received {image_gram.shape}")
        image_gram = image_gram[None]
    lengths = np.array([length], np.int64)
    e, z, cos = am.cross_attention(np, regions[None], image_gram, words[None], lengths, cfg, np.dtype(gemm_dtype))
    score = float(am.aggregate_pairs(np, cos, lengths, cfg)[0, 0])
    e = e[0, :length, 0]  # (words, regions)
    if cfg.cross_attn == "t2i":
        attention = e / z[0, :length, 0, None]  # each word over the regions
        relevance = cos[0, :length, 0]
    else:
        attention = (e / z[0, 0][None, :]).T  # each region over the words
        relevance = cos[0, 0]
    return Explanation(
        score=score,
        attention=np.ascontiguousarray(attention, np.float32),
        relevance=np.ascontiguousarray(relevance, np.float32),
        cross_attn=cfg.cross_attn,
    )


def combine(members: Sequence[Explanation], weights: Sequence[float] | None = None) -> EnsembleExplanation:
    """An ensemble's explanation: the members' (in the members' order) and the weighted mean of their scores.

    ``weights``: one positive weight per member (None: equal), normalised to sum to 1; summed in float32 in
    the members' order, as the ensemble's search sums its members' similarities.
    """
    members = tuple(members)
    if not members:
        raise ExplainError("combine: expected at least one member's explanation, received none")
    values = [1.0] * len(members) if weights is None else [float(w) for w in weights]
    if len(values) != len(members) or not all(math.isfinite(w) and w > 0 for w in values):
        raise ExplainError(f"weights: expected {len(members)} positive finite numbers, received {values}")
    total = math.fsum(values)
    normalised = tuple(w / total for w in values)
    score = None
    for w, m in zip(np.array(normalised, np.float32), members):
        part = w * np.float32(m.score)
        score = part if score is None else score + part
    return EnsembleExplanation(score=float(score), members=members, weights=normalised)


def pair_json(
    explanation: Explanation | EnsembleExplanation,
    *,
    id: int,
    image_id: int | None,
    boxes: np.ndarray | None,
    picture: str | None,
) -> dict[str, Any]:
    """One pair's explanation as the service answers it (runtime/service/static/API.md) and ``search.py
    --explain --json`` prints it: ``id`` the gallery item asked for, ``image_id`` the image's gallery id (None
    for an uploaded one), ``boxes`` its (R, 4) region boxes (None: the gallery has none), ``picture`` where
    its picture is (a URL or a file; None: nowhere)."""
    first = explanation.members[0] if isinstance(explanation, EnsembleExplanation) else explanation
    return {
        "id": int(id),
        "image_id": None if image_id is None else int(image_id),
        **explanation.to_json(),
        "regions": first.n_regions,
        "boxes": None if boxes is None else np.asarray(boxes, np.float32).astype(float).tolist(),
        "picture": picture,
    }
