"""Running top-k over gallery blocks (faiss's contract).

Scores are float32 (n, k), descending; ids int64; ties go to the lower id; where the gallery holds
fewer than k items the tail is score -inf, id -1.
"""

from __future__ import annotations

import numpy as np

MISSING_ID = -1


def block_topk(scores: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of one block ``scores`` (n, B) whose column j is gallery id ``ids[j]`` (ids ascending)."""
    b = scores.shape[1]
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
    """Merge per-block top-k candidates into the best k seen so far, for n queries."""

    def __init__(self, n: int, k: int) -> None:
        self.k = k
        self.scores = np.full((n, k), -np.inf, dtype=np.float32)
        self.ids = np.full((n, k), MISSING_ID, dtype=np.int64)

    def add_block(self, scores: np.ndarray, ids: np.ndarray) -> None:
        """``scores`` (n, B) for the gallery items ``ids`` (B,), ascending within the block."""
        s, i = block_topk(scores, self.k, ids)
        self.merge(s, i)

    def merge(self, scores: np.ndarray, ids: np.ndarray) -> None:
        all_s = np.concatenate([self.scores, scores.astype(np.float32, copy=False)], axis=1)
        all_i = np.concatenate([self.ids, ids], axis=1)
        # Missing entries (id -1, -inf) must sort after real ones with -inf scores: use a large id key.
        id_key = np.where(all_i < 0, np.iinfo(np.int64).max, all_i)
        order = np.lexsort((id_key, -all_s), axis=1)[:, : self.k]
        self.scores = np.take_along_axis(all_s, order, axis=1)
        self.ids = np.take_along_axis(all_i, order, axis=1)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return self.scores, self.ids
