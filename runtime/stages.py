"""The seconds one search spends in each of its stages (encode, score, top-k, ...): what the service's
``scan_stage_seconds`` metrics and bench/load.py's breakdown report. Two clock reads per stage: cheap
enough to stay on in production."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

# The stages of a search request, in order (runtime/service/app.py times them; docs/serving.md explains them).
STAGES = ("parse", "tokenise", "queue", "encode", "score", "topk", "labels", "serialise")


class Stages:
    """Seconds per stage, accumulated: a stage that runs several times (per length batch, per gallery block)
    adds up."""

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)
