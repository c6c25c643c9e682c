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


def encode_by_length(
    engine, ids: np.ndarray, lengths: np.ndarray, batch: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(idx, words)``: caption rows ``idx`` (see :func:`length_batches`) encoded by ``engine.encode_ids``,
    ``words`` (len(idx), width, d) padded to the batch's longest caption."""
    lengths = np.asarray(lengths)
    for idx in length_batches(lengths, batch):
        width = int(lengths[idx].max())
        yield idx, engine.encode_ids(ids[idx, :width], lengths[idx])
