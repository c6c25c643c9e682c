"""Timing: seconds per call after a warm-up, repeated within a budget, summarised as median and spread."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def stats(samples: Sequence[float]) -> dict[str, Any]:
    """Count, percentiles (p10..p99, median), mean, min and max of ``samples``."""
    x = np.asarray(samples, dtype=np.float64)
    p = np.percentile(x, [10, 25, 50, 75, 90, 95, 99])
    keys = ("p10", "p25", "median", "p75", "p90", "p95", "p99")
    out: dict[str, Any] = {"n": int(x.size), **{k: float(v) for k, v in zip(keys, p)}}
    out.update(mean=float(x.mean()), min=float(x.min()), max=float(x.max()))
    return out


def time_calls(
    fn: Callable[[], Any],
    warmup: int,
    min_repeats: int,
    max_repeats: int,
    budget_s: float,
    sync: Callable[[], None] | None = None,
) -> list[float]:
    """Seconds per call after ``warmup`` calls: at least ``min_repeats``, then until ``budget_s`` or ``max_repeats``.

    ``sync`` waits for asynchronous work (a GPU stream) inside each timed call.
    """
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_repeats and (len(samples) < min_repeats or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append(time.perf_counter() - t0)
    return samples


def throughput(times: list[float], pairs: int) -> dict[str, Any]:
    """A measured contender: ``pairs`` scored per call, pairs/s at the median and at the p10..p90 spread."""
    s = stats(times)
    return {
        "status": "measured",
        "pairs": pairs,
        "seconds": s,
        "pairs_per_s": pairs / s["median"],
        "pairs_per_s_p10": pairs / s["p90"],
        "pairs_per_s_p90": pairs / s["p10"],
    }


def skipped(reason: str, **extra: Any) -> dict[str, Any]:
    """A figure not measured, and why (never an invented number)."""
    return {"status": "skipped", "reason": reason, **extra}
