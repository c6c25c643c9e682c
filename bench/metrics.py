"""Retrieval metrics for SCAN, bit-for-bit compatible with the original protocol.

Reference: kuanghuei/SCAN ``evaluation.py`` (``i2t``, ``t2i``, ``evalrank``).

``sims`` is an ``(n_images, n_captions)`` similarity matrix where caption ``j``
belongs to image ``j // captions_per_image`` (5 captions per image in the
original).

* i2t: for image ``i`` the row is ordered with ``np.argsort(row)[::-1]``; the
  rank is the smallest position (0-based) of any of its own captions.
* t2i: for caption ``j`` the column is ordered the same way; the rank is the
  position of image ``j // captions_per_image``.
* R@K = 100 * fraction of ranks < K; medr = floor(median) + 1; meanr = mean + 1.

Tie handling is exactly the original's.  Ranks are computed vectorised as
"number of strictly greater scores", which is exact whenever the target score
is unique in its row/column; any row/column where a target score ties with
another score is re-ranked with the original call ``np.argsort(x)[::-1]`` on
the very same values (and dtype), so results are identical to the original
loops, whatever numpy's sort does with ties.

This module depends on numpy only (never torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "DirectionMetrics",
    "MetricsError",
    "RecallMetrics",
    "dedupe_repeated_images",
    "evaluate",
    "evaluate_fold5",
    "evaluate_folds",
    "format_table",
    "i2t_ranks",
    "metrics_from_ranks",
    "t2i_ranks",
    "validate_sims",
]

CAPTIONS_PER_IMAGE = 5
N_FOLDS = 5

# Rows processed per block in the vectorised counting (bounds temp memory).
_BLOCK_ELEMS = 1 << 24


class MetricsError(ValueError):
    """Invalid input to the retrieval metrics (shape, values, layout)."""


# ---------------------------------------------------------------------------
# Result containers
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DirectionMetrics:
    """Recall@1/5/10 (percent), median rank and mean rank (1-based)."""

    r1: float
    r5: float
    r10: float
    medr: float
    meanr: float

    @property
    def rsum(self) -> float:
        """r1 + r5 + r10 for this direction."""
        return float(self.r1 + self.r5 + self.r10)

    def as_tuple(self) -> tuple:
        return (self.r1, self.r5, self.r10, self.medr, self.meanr)

    def to_dict(self) -> dict[str, float]:
        return {
            "r1": float(self.r1),
            "r5": float(self.r5),
            "r10": float(self.r10),
            "medr": float(self.medr),
            "meanr": float(self.meanr),
        }


@dataclass(frozen=True)
class RecallMetrics:
    """Both retrieval directions; ``rsum`` is the sum of the six recalls."""

    i2t: DirectionMetrics
    t2i: DirectionMetrics

    @property
    def rsum(self) -> float:
        return float(self.i2t.r1 + self.i2t.r5 + self.i2t.r10 + self.t2i.r1 + self.t2i.r5 + self.t2i.r10)

    def to_dict(self) -> dict[str, Any]:
        return {
            "i2t": self.i2t.to_dict(),
            "t2i": self.t2i.to_dict(),
            "rsum": self.rsum,
        }


# ---------------------------------------------------------------------------
# Validation / layout helpers
# ---------------------------------------------------------------------------


def validate_sims(sims: Any, captions_per_image: int = CAPTIONS_PER_IMAGE) -> np.ndarray:
    """Return ``sims`` as an ndarray (dtype unchanged) or raise MetricsError.

    Requires a finite, real-valued 2-D array of shape ``(n, captions_per_image * n)``
    with ``n >= 1``.
    """
    if (
        isinstance(captions_per_image, bool)
        or not isinstance(captions_per_image, (int, np.integer))
        or captions_per_image < 1
    ):
        raise MetricsError(f"captions_per_image must be a positive integer, got {captions_per_image!r}")
    k = int(captions_per_image)
    try:
        arr = np.asarray(sims)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise MetricsError(f"sims could not be converted to an array: {exc}") from exc
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise MetricsError(f"sims must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise MetricsError(
            f"sims must be 2-D (n_images, n_captions); received shape {tuple(arr.shape)} "
            f"({arr.ndim}-D); expected (n, {k}*n)"
        )
    n_img, n_cap = arr.shape
    if n_img < 1 or n_cap != k * n_img:
        exp_n = n_cap // k if n_cap % k == 0 and n_cap > 0 else None
        hint = f" (for {n_cap} captions: ({exp_n}, {n_cap}))" if exp_n else ""
        raise MetricsError(
            f"sims has shape {tuple(arr.shape)}; expected (n_images, {k} * n_images) "
            f"= ({n_img}, {k * n_img}) with n_images >= 1{hint}. "
            f"If images are repeated {k}x per caption, deduplicate them first "
            f"(see dedupe_repeated_images)."
        )
    if not np.all(np.isfinite(arr)):
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise MetricsError(f"sims of shape {tuple(arr.shape)} contains {bad} non-finite value(s) (NaN/inf)")
    return arr


def dedupe_repeated_images(n_image_rows: int, n_captions: int, captions_per_image: int = CAPTIONS_PER_IMAGE) -> int:
    """Return the stride to take over image rows so that there is one row per image.

    * ``n_image_rows == n_captions`` -> ``captions_per_image`` (5): each image is
      repeated once per caption, the original keeps every 5th row
      (``img_embs[::5]``).
    * ``n_image_rows * captions_per_image == n_captions`` -> ``1`` (already unique).
    * anything else -> :class:`MetricsError` naming both counts.
    """
    k = int(captions_per_image)
    r, c = int(n_image_rows), int(n_captions)
    if k < 1:
        raise MetricsError(f"captions_per_image must be >= 1, got {captions_per_image}")
    if r < 1 or c < 1:
        raise MetricsError(f"cannot infer image layout from {r} image row(s) and {c} caption(s): both must be >= 1")
    if k == 1:
        if r == c:
            return 1
    else:
        if r == c:
            if r % k != 0:
                raise MetricsError(
                    f"{r} image rows == {c} captions looks like the {k}x repeated-image "
                    f"layout, but {r} is not divisible by {k}"
                )
            return k
        if r * k == c:
            return 1
    raise MetricsError(
        f"image/caption count mismatch: {r} image row(s) and {c} caption(s); expected "
        f"either {c} image rows ({k}x repeated images) or {c / k:g} image rows "
        f"(one row per image, {k} captions per image)"
    )


# ---------------------------------------------------------------------------
# Ranking
# ---------------------------------------------------------------------------


def _block_rows(n_rows: int, row_len: int) -> int:
    return max(1, min(n_rows, _BLOCK_ELEMS // max(1, row_len * 2)))


def i2t_ranks(sims: Any, captions_per_image: int = CAPTIONS_PER_IMAGE) -> np.ndarray:
    """Per-image rank (0-based) of its best-ranked own caption; int64, shape (n,).

    Identical to the original loop::

        inds = np.argsort(sims[i])[::-1]
        rank = min(np.where(inds == c)[0][0] for c in range(k*i, k*i + k))
    """
    arr = validate_sims(sims, captions_per_image)
    k = int(captions_per_image)
    n_img, n_cap = arr.shape
    ranks = np.empty(n_img, dtype=np.int64)
    needs_sort = np.zeros(n_img, dtype=bool)

    cols = np.arange(n_img)[:, None] * k + np.arange(k)[None, :]  # (n, k)
    step = _block_rows(n_img, n_cap * k)
    for s in range(0, n_img, step):
        e = min(n_img, s + step)
        block = arr[s:e]  # (b, n_cap)
        targets = np.take_along_axis(block, cols[s:e], axis=1)  # (b, k)
        greater = np.empty((e - s, k), dtype=np.int64)
        equal = np.empty((e - s, k), dtype=np.int64)
        for t in range(k):
            tv = targets[:, t : t + 1]
            greater[:, t] = np.count_nonzero(block > tv, axis=1)
            equal[:, t] = np.count_nonzero(block == tv, axis=1)
        # A unique target score sits at position "#strictly greater" in the
        # descending order; any tie -> fall back to the original argsort.
        needs_sort[s:e] = np.any(equal > 1, axis=1)
        ranks[s:e] = greater.min(axis=1)

    for index in np.flatnonzero(needs_sort):
        inds = np.argsort(arr[index])[::-1]
        rank = n_cap
        for i in range(k * index, k * index + k, 1):
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
    return ranks


def t2i_ranks(sims: Any, captions_per_image: int = CAPTIONS_PER_IMAGE) -> np.ndarray:
    """Per-caption rank (0-based) of its own image; int64, shape (k*n,).

    Identical to the original loop over ``sims.T``::

        inds = np.argsort(sims.T[j])[::-1]
        rank = np.where(inds == j // k)[0][0]
    """
    arr = validate_sims(sims, captions_per_image)
    k = int(captions_per_image)
    n_img, n_cap = arr.shape
    owner = np.arange(n_cap) // k
    targets = arr[owner, np.arange(n_cap)]  # (n_cap,)
    greater = np.zeros(n_cap, dtype=np.int64)
    equal = np.zeros(n_cap, dtype=np.int64)
    step = _block_rows(n_img, n_cap)
    for s in range(0, n_img, step):
        block = arr[s : s + step]
        greater += np.count_nonzero(block > targets, axis=0)
        equal += np.count_nonzero(block == targets, axis=0)
    ranks = greater
    simsT = arr.T
    for j in np.flatnonzero(equal > 1):
        inds = np.argsort(simsT[j])[::-1]
        ranks[j] = np.where(inds == j // k)[0][0]
    return ranks


def metrics_from_ranks(ranks: Any) -> DirectionMetrics:
    """R@1/5/10, medr, meanr exactly as the original computes them."""
    r = np.asarray(ranks, dtype=np.float64)
    if r.ndim != 1 or r.size == 0:
        raise MetricsError(f"ranks must be a non-empty 1-D array, got shape {r.shape}")
    r1 = 100.0 * len(np.where(r < 1)[0]) / len(r)
    r5 = 100.0 * len(np.where(r < 5)[0]) / len(r)
    r10 = 100.0 * len(np.where(r < 10)[0]) / len(r)
    medr = np.floor(np.median(r)) + 1
    meanr = r.mean() + 1
    return DirectionMetrics(float(r1), float(r5), float(r10), float(medr), float(meanr))


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def evaluate(sims: Any, captions_per_image: int = CAPTIONS_PER_IMAGE) -> RecallMetrics:
    """i2t and t2i metrics over the whole matrix (the 5-fold protocol: :func:`evaluate_fold5`)."""
    arr = validate_sims(sims, captions_per_image)
    return RecallMetrics(
        i2t=metrics_from_ranks(i2t_ranks(arr, captions_per_image)),
        t2i=metrics_from_ranks(t2i_ranks(arr, captions_per_image)),
    )


def evaluate_folds(
    sims: Any, captions_per_image: int = CAPTIONS_PER_IMAGE, n_folds: int = N_FOLDS
) -> list[RecallMetrics]:
    """Per-fold metrics: fold i = images [i*f, (i+1)*f), captions [k*i*f, k*(i+1)*f)."""
    arr = validate_sims(sims, captions_per_image)
    k = int(captions_per_image)
    n_img = arr.shape[0]
    if n_folds < 1 or n_img % n_folds != 0:
        raise MetricsError(
            f"{n_folds}-fold evaluation needs n_images divisible by {n_folds}; "
            f"sims has shape {tuple(arr.shape)} ({n_img} images)"
        )
    f = n_img // n_folds
    out = []
    for i in range(n_folds):
        sub = np.ascontiguousarray(arr[i * f : (i + 1) * f, k * i * f : k * (i + 1) * f])
        out.append(evaluate(sub, k))
    return out


def _mean_direction(ds: Sequence[DirectionMetrics]) -> DirectionMetrics:
    m = np.array([d.as_tuple() for d in ds], dtype=np.float64).mean(axis=0)
    return DirectionMetrics(*(float(x) for x in m))


def evaluate_fold5(sims: Any, captions_per_image: int = CAPTIONS_PER_IMAGE) -> RecallMetrics:
    """Mean of each metric over 5 folds (COCO 5-fold 1K protocol, generalised).

    ``rsum`` of the result is the sum of the six mean recalls (the original
    printed ``mean(ar) * 6`` instead, which is wrong).
    """
    folds = evaluate_folds(sims, captions_per_image, N_FOLDS)
    return RecallMetrics(
        i2t=_mean_direction([m.i2t for m in folds]),
        t2i=_mean_direction([m.t2i for m in folds]),
    )


# ---------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------


def format_table(metrics: RecallMetrics, title: str | None = None) -> str:
    """Human-readable table of both directions and rsum."""
    header = f"{'':<15}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'medr':>8}{'meanr':>9}"
    lines = []
    if title:
        lines.append(title)
    lines.append(header)
    lines.append("-" * len(header))
    for name, d in (("Image to text", metrics.i2t), ("Text to image", metrics.t2i)):
        lines.append(f"{name:<15}{d.r1:>8.1f}{d.r5:>8.1f}{d.r10:>8.1f}{d.medr:>8.1f}{d.meanr:>9.1f}")
    lines.append("-" * len(header))
    lines.append(f"rsum: {metrics.rsum:.1f}")
    return "\n".join(lines)
