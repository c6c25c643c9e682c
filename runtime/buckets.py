"""Length bucketing: captions are encoded in batches of similar length, so each batch pads only to its own max.

One helper for every place that encodes many captions (search, caption gallery build, evaluation).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def length_batches(lengths: np.ndarray, batch: int) -> Iterator[np.ndarray]:
    """Yield index arrays of at most ``batch`` queries, in ascending length (stable: ties keep input order)."""
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive integer, received {batch!r}")
    order = np.argsort(np.asarray(lengths), kind="stable")
    for a in range(0, len(order), int(batch)):
        yield order[a : a + int(batch)]


# What one more head call costs, in padded words of one query: the gallery is read once per call, and each
# query's words are scored against every region of it. Measured on the demo model (1K images, 2 cores): a
# call's fixed part ~1.7 ms, a query-word ~0.75 ms, so ~2.3 words; and 16 queries of 6-19 words padded to
# the longest cost 1.6x as much as the same queries one at a time.
PAD_WORDS_PER_CALL = 4


def length_groups(lengths: np.ndarray, batch: int, pad_words: int = PAD_WORDS_PER_CALL) -> Iterator[np.ndarray]:
    """Like :func:`length_batches` (ascending length, at most ``batch`` per group), but a group also ends where
    the next caption would pad its batch-mates by more than ``pad_words`` words in all: a group of g captions
    whose longest has Lmax words takes the next, of L words, while g * (L - Lmax) <= pad_words. So a batch of
    mixed lengths is scored in a few calls of similar lengths, not in one padded to its longest caption."""
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive integer, received {batch!r}")
    lengths = np.asarray(lengths)
    group: list[int] = []
    longest = 0
    for i in np.argsort(lengths, kind="stable").tolist():
        length = int(lengths[i])
        if group and (len(group) >= batch or len(group) * (length - longest) > pad_words):
            yield np.asarray(group, np.int64)
            group = []
        group.append(i)
        longest = length
    if group:
        yield np.asarray(group, np.int64)


def encode_by_length(
    engine, ids: np.ndarray, lengths: np.ndarray, batch: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(idx, words)``: caption rows ``idx`` (see :func:`length_batches`) encoded by ``engine.encode_ids``,
    ``words`` (len(idx), width, d) padded to the batch's longest caption."""
    lengths = np.asarray(lengths)
    for idx in length_batches(lengths, batch):
        width = int(lengths[idx].max())
        yield idx, engine.encode_ids(ids[idx, :width], lengths[idx])
