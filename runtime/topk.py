"""Running top-k over gallery blocks (faiss's contract).

Scores are float32 (n, k), descending; ids int64; ties go to the lower id; where the gallery holds
fewer than k items the tail is score -inf, id -1. Scores must be finite: a NaN would sort nowhere
(silently dropping its item), so a non-finite score raises ``NonFiniteScore`` naming the item.
"""

from __future__ import annotations

import numpy as np

MISSING_ID = -1


class NonFiniteScore(ValueError):
    """A score is NaN or infinite: the data behind gallery item ``item_id`` is corrupted."""

    def __init__(self, item_id: int, value: float) -> None:
        super().__init__(f"gallery item {item_id} scored {value}")
        self.item_id, self.value = item_id, value


def check_finite(scores: np.ndarray, ids: np.ndarray) -> None:
    """Raise ``NonFiniteScore`` for the first candidate in ``scores``/``ids`` (n, c) whose score is not finite,
    except -inf with id -1 (a missing result)."""
    ok = np.isfinite(scores) | ((scores == -np.inf) & (ids == MISSING_ID))
    if not ok.all():
        row, col = (int(x[0]) for x in np.nonzero(~ok))
        raise NonFiniteScore(int(ids[row, col]), float(scores[row, col]))


def block_topk(scores: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of one block ``scores`` (n, B) whose column j is gallery id ``ids[j]`` (ids ascending).

    A non-finite score is ranked first, so that ``RunningTopK.merge`` sees it and names its item.
    """
    b = scores.shape[1]
    finite = np.isfinite(scores)
    if not finite.all():
        order = np.argsort(-np.where(finite, scores, np.inf), axis=1, kind="stable")[:, :k]
        picked = np.take_along_axis(scores, order, axis=1).astype(np.float32, copy=False)
        return picked, np.asarray(ids, np.int64)[order]
    if b <= k:
        order = np.argsort(-scores, axis=1, kind="stable")  # stable: equal scores keep id order
    else:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (n, k), unordered
        picked = np.take_along_axis(scores, part, axis=1)
        kth = picked.min(axis=1, keepdims=True)
        # argpartition picks arbitrarily among scores equal to the k-th; redo those rows stably.
        ambiguous = (scores >= kth).sum(axis=1) > k
        sub = np.argsort(-picked, axis=1, kind="stable")
        order = np.take_along_axis(part, sub, axis=1)
        if ambiguous.any():
            rows = np.flatnonzero(ambiguous)
            order[rows] = np.argsort(-scores[rows], axis=1, kind="stable")[:, :k]
        # equal scores inside the partition are sorted by id below, in merge()
    order = order[:, :k]
    return np.take_along_axis(scores, order, axis=1).astype(np.float32, copy=False), np.asarray(ids, np.int64)[order]


class RunningTopK:
    """Merge per-block top-k candidates into the best k seen so far, for n queries.

    ``size``: how many items the gallery holds, when known. Only min(k, size) candidates are kept, so a
    huge k costs nothing until ``result()`` pads to k.
    """

    def __init__(self, n: int, k: int, size: int | None = None) -> None:
        self.k = k
        self.width = k if size is None else max(0, min(k, size))
        self.scores = np.full((n, self.width), -np.inf, dtype=np.float32)
        self.ids = np.full((n, self.width), MISSING_ID, dtype=np.int64)

    def add_block(self, scores: np.ndarray, ids: np.ndarray) -> None:
        """``scores`` (n, B) for the gallery items ``ids`` (B,), ascending within the block."""
        s, i = block_topk(scores, self.width, ids)
        self.merge(s, i)

    def merge(self, scores: np.ndarray, ids: np.ndarray) -> None:
        """Merge candidates ``scores``/``ids`` (n, c): a block's top-k (see ``block_topk``); non-finite raises."""
        check_finite(scores, ids)
        all_s = np.concatenate([self.scores, scores.astype(np.float32, copy=False)], axis=1)
        all_i = np.concatenate([self.ids, ids], axis=1)
        # Missing entries (id -1, -inf) must sort after real ones with -inf scores: use a large id key.
        id_key = np.where(all_i < 0, np.iinfo(np.int64).max, all_i)
        order = np.lexsort((id_key, -all_s), axis=1)[:, : self.width]
        self.scores = np.take_along_axis(all_s, order, axis=1)
        self.ids = np.take_along_axis(all_i, order, axis=1)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n, k): past the gallery's items, -inf and -1."""
        pad = self.k - self.width
        if pad <= 0:
            return self.scores, self.ids
        return (
            np.pad(self.scores, ((0, 0), (0, pad)), constant_values=-np.inf),
            np.pad(self.ids, ((0, 0), (0, pad)), constant_values=MISSING_ID),
        )
