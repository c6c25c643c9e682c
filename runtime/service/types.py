"""What the service's executor answers: the hits of a batch of searches, and what an append added."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Hits:
    """Top-k of n queries: faiss's contract plus each hit's label (image name or caption text, or None)."""

    scores: np.ndarray  # (n, k) float32, descending; -inf past the gallery
    ids: np.ndarray  # (n, k) int64; -1 past the gallery
    names: list[list[str | None]]  # (n, k)
    seconds: dict[str, float] = field(default_factory=dict)  # per stage (runtime/stages.py), for the metrics

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def rows(self, start: int, stop: int, k: int) -> Hits:
        """Queries ``start:stop``, cut to their first ``k`` results (a top-k of a larger k is exact for k)."""
        rows = [r[:k] for r in self.names[start:stop]]
        return Hits(self.scores[start:stop, :k], self.ids[start:stop, :k], rows, dict(self.seconds))


@dataclass(frozen=True)
class Appended:
    added: int
    first_id: int
    count: int  # gallery size after the append
    repeated: bool = False  # an idempotency key already committed: the first answer, nothing written
