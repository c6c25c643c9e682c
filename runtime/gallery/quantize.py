"""int8 caches: region vectors stored as int8 codes with one float32 scale per vector (``WriteOptions(dtype="int8")``).

A vector ``x`` (d,) is stored as ``codes = round(x / s)`` with ``s = max|x| / 127``, so every code lies in
[-127, 127] and every component is off by at most ``s / 2 = max|x| / 254`` (0.4% of the vector's largest
component). The head scores the dequantized vectors ``x^ = codes * s`` exactly (``Dequantized``), and the
cache's Gram matrices are those of ``x^``, so an int8 search is exact SCAN on slightly moved vectors: an
approximation of the float search, opt-in, its top-10 agreement with exact measured (bench/formats.py).

The cache is a quarter of float32's bytes (36 KiB + 144 B of scales + the float32 Gram per image of 36 x 1024
regions, against 144 KiB), so more of a large gallery stays in the page cache and a rerank reads less.
"""

from __future__ import annotations

from typing import Any

import numpy as np

QUANTIZED = ("int8",)
# The largest code: symmetric, so -x quantizes to -codes (no asymmetric -128).
LEVELS = 127.0


def is_quantized(dtype: Any) -> bool:
    return np.dtype(dtype).name in QUANTIZED


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float (..., d) -> int8 codes (..., d) and float32 scales (...): one scale per vector (the last axis).

    A zero vector gets scale 1 and zero codes (dequantized it is still zero)."""
    x = np.asarray(x, np.float32)
    peak = np.abs(x).max(axis=-1)
    scales = np.where(peak > 0, peak / LEVELS, 1.0).astype(np.float32)
    codes = np.rint(x / scales[..., None])
    np.clip(codes, -LEVELS, LEVELS, out=codes)  # rounding at exactly the peak cannot pass 127; kept as a guard
    return codes.astype(np.int8), scales


def dequantize(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """int8 codes (..., d) and scales (...) -> float32 vectors (..., d)."""
    # One mixed-type multiply: twice as fast here as a cast followed by an in-place multiply.
    return np.multiply(codes, np.asarray(scales, np.float32)[..., None], dtype=np.float32)


def gram_of(x: np.ndarray) -> np.ndarray:
    """Per-item Gram matrices (B, T, d) -> (B, T, T) float32 (einsum: numpy's stacked matmul with a
    transposed operand falls off BLAS)."""
    x = np.asarray(x, np.float32)
    return np.einsum("btd,bsd->bts", x, x, optimize=True)


class Dequantized:
    """The float32 face of an int8 array and its scales: what ``gallery.images`` is for an int8 cache.

    Indexing along the first axis (ints, slices, index arrays) returns float32 rows; ``np.asarray`` the
    whole array. Every reader of a gallery (blocks, rerank, explanations, the candidate index, shard splits)
    sees float32 vectors; only the rows read are converted. ``codes`` and ``scales`` are the stored arrays.
    """

    def __init__(self, codes: np.ndarray, scales: np.ndarray) -> None:
        if codes.dtype != np.int8 or scales.shape != codes.shape[:-1]:
            raise ValueError(
                f"expected int8 codes (..., d) and scales of their leading shape, received "
                f"{codes.dtype.name}{list(codes.shape)} and {scales.dtype.name}{list(scales.shape)}"
            )
        self.codes = codes
        self.scales = scales

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape

    @property
    def ndim(self) -> int:
        return self.codes.ndim

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    @property
    def nbytes(self) -> int:
        """The bytes stored (codes and scales), not the float32 face's."""
        return int(self.codes.nbytes + self.scales.nbytes)

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):  # rows first, then the rest on the float32 rows
            return self[key[0]][(slice(None), *key[1:])] if not _is_int(key[0]) else self[key[0]][key[1:]]
        return dequantize(self.codes[key], self.scales[key])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)


def _is_int(key: Any) -> bool:
    return isinstance(key, (int, np.integer))
