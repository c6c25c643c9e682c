"""Query latency end to end through ``Searcher.search`` (tokenise, encode, score, top-k), one cell per
(direction, gallery size, query batch).

Every cell has a time budget. A cell whose estimated single-batch cost exceeds the per-cell cap, the
run's remaining budget or the free memory is not run: it is recorded as skipped with the estimate and
the reason, never extrapolated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.machine import mem_available
from bench.plan import Plan
from bench.synthetic import ImageStore, VectorPool, caption_texts, rng_for, synthetic_caption_gallery
from bench.timing import stats, time_calls
from runtime.engine import ScanEngine
from runtime.gallery import CaptionGallery, ImageGallery
from runtime.searcher import Searcher

logger = logging.getLogger(__name__)


@dataclass
class Deadline:
    end: float

    def left(self) -> float:
        return self.end - time.monotonic()


def estimate_seconds(done: list[dict[str, Any]], gallery: int, batch: int, pairs_per_s: float) -> float:
    """Single-batch cost predicted from the nearest measured cell (cost ~ linear in gallery x batch)."""
    measured = [c for c in done if c["status"] == "measured"]
    same_batch = [c for c in measured if c["batch"] == batch and c["gallery_size"] <= gallery]
    if same_batch:
        c = max(same_batch, key=lambda c: c["gallery_size"])
        return c["p50_ms"] / 1e3 * gallery / c["gallery_size"]
    same_gallery = [c for c in measured if c["gallery_size"] == gallery and c["batch"] <= batch]
    if same_gallery:
        c = max(same_gallery, key=lambda c: c["batch"])
        return c["p50_ms"] / 1e3 * batch / c["batch"]
    return gallery * batch / pairs_per_s


def skip_reason(
    estimate_s: float, plan: Plan, deadline: Deadline, extra_bytes: int = 0, available_bytes: int | None = None
) -> str | None:
    """Why a cell must not run, or None. ``estimate_s`` is one batch; a cell runs warm-up + min repeats."""
    if estimate_s > plan.cell_cap_s:
        return (
            f"estimated single-batch cost {estimate_s:.3g} s exceeds the per-cell cap {plan.cell_cap_s:g} s "
            f"(a cell runs {plan.cell_warmup} warm-up + at least {plan.cell_min_repeats} timed batches)"
        )
    cost = estimate_s * (plan.cell_warmup + plan.cell_min_repeats)
    if cost > deadline.left():
        return (
            f"estimated cell cost {cost:.3g} s exceeds the {max(deadline.left(), 0):.0f} s left "
            f"of the run budget ({plan.run_budget_s:g} s)"
        )
    if available_bytes is not None and extra_bytes > 0.8 * available_bytes:
        return (
            f"the gallery needs {extra_bytes / 2**30:.1f} GiB more memory; only "
            f"{available_bytes / 2**30:.1f} GiB available"
        )
    return None


def measure_cell(search: Callable[[int], Any], batch: int, plan: Plan, deadline: Deadline) -> dict[str, Any]:
    calls = iter(range(1 << 30))
    budget = min(plan.cell_budget_s, max(deadline.left() / 4, 0.0))
    times = time_calls(
        lambda: search(next(calls)), plan.cell_warmup, plan.cell_min_repeats, plan.cell_max_repeats, budget
    )
    s = stats(times)
    return {
        "status": "measured",
        "n": s["n"],
        "p50_ms": s["median"] * 1e3,
        "p95_ms": s["p95"] * 1e3,
        "p99_ms": s["p99"] * 1e3,
        "mean_ms": s["mean"] * 1e3,
        "min_ms": s["min"] * 1e3,
        "max_ms": s["max"] * 1e3,
        "queries_per_s": batch / s["mean"],
    }


def run_cell(
    cells: list[dict[str, Any]],
    direction: str,
    gallery_size: int,
    batch: int,
    plan: Plan,
    deadline: Deadline,
    pairs_per_s: float,
    extra_bytes: int,
    make_gallery: Callable[[], Any],
    searcher_for: Callable[[Any], Callable[[int], Any]],
) -> None:
    """Estimate one cell; skip it with the reason, or make its gallery and time the ``i``-th search of
    ``searcher_for(gallery)``; append the cell to ``cells``."""
    cell = {"direction": direction, "gallery_size": gallery_size, "batch": batch}
    est = estimate_seconds(cells, gallery_size, batch, pairs_per_s)
    reason = skip_reason(est, plan, deadline, extra_bytes, mem_available())
    if reason:
        cells.append({**cell, "status": "skipped", "estimate_s": est, "reason": reason})
        logger.info("%s %d x %d: skipped (%s)", direction, gallery_size, batch, reason)
        return
    t0 = time.perf_counter()
    gallery = make_gallery()
    made = time.perf_counter() - t0
    result = measure_cell(searcher_for(gallery), batch, plan, deadline)
    cells.append({**cell, **result, "estimate_s": est, "gallery_seconds": made})
    logger.info("%s %d x %d: p50 %.1f ms", direction, gallery_size, batch, result["p50_ms"])


def bench_text_to_image(
    engine: ScanEngine, plan: Plan, seed: int, deadline: Deadline, pairs_per_s: float
) -> list[dict[str, Any]]:
    pool = caption_texts(rng_for(seed, 2), 4 * max(plan.batches), plan.vocab_size)
    store = ImageStore(seed, plan.regions, plan.embed_size)
    cells: list[dict[str, Any]] = []
    for g in plan.image_galleries:
        for batch in plan.batches:

            def searcher_for(gallery: ImageGallery, batch: int = batch) -> Callable[[int], Any]:
                searcher = Searcher(engine, images=gallery)
                return lambda i: searcher.search([pool[(i * batch + j) % len(pool)] for j in range(batch)], plan.k)

            # growing copies the rows drawn so far into a new array: both exist for a moment
            extra = store.bytes_for(g) if g > len(store.images) else 0
            run_cell(
                cells,
                "text_to_image",
                g,
                batch,
                plan,
                deadline,
                pairs_per_s,
                extra,
                lambda g=g: store.gallery(g),
                searcher_for,
            )
    return cells


def bench_image_to_text(
    engine: ScanEngine, plan: Plan, seed: int, deadline: Deadline, pairs_per_s: float
) -> list[dict[str, Any]]:
    rng = rng_for(seed, 3)
    pool = rng.standard_normal((max(2 * max(plan.batches), 16), plan.regions, plan.img_dim), dtype=np.float32)
    cells: list[dict[str, Any]] = []
    vectors: list[VectorPool] = []  # drawn once, on first use
    for g in plan.caption_galleries:
        made: list[CaptionGallery] = []  # one gallery per size, shared by its batch sizes

        def make_gallery(g: int = g, made: list[CaptionGallery] = made) -> CaptionGallery:
            if not made:
                vectors[:] = vectors or [VectorPool(seed, plan.embed_size)]
                made.append(synthetic_caption_gallery(rng_for(seed, 4, g), g, plan.embed_size, vectors[0]))
            return made[0]

        for batch in plan.batches:

            def searcher_for(gallery: CaptionGallery, batch: int = batch) -> Callable[[int], Any]:
                searcher = Searcher(engine, captions=gallery)
                return lambda i: searcher.search(pool[(i * batch + np.arange(batch)) % len(pool)], plan.k)

            need = 0 if made else int(g * 14 * plan.embed_size * 4)
            run_cell(cells, "image_to_text", g, batch, plan, deadline, pairs_per_s, need, make_gallery, searcher_for)
        made.clear()  # free one caption gallery before drawing the next
    return cells
