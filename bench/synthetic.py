"""Seeded synthetic data at full size: caption texts, vocabularies, and galleries of random unit-norm embeddings.

Large galleries are not encoded (far too slow on a CPU): their arrays are random unit-norm embeddings,
and the galleries are made by the gallery module (``ImageGallery.from_arrays`` /
``CaptionGallery.from_arrays``) in the layout it stores.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from bench.machine import optional_torch
from runtime.gallery import CaptionGallery, ImageGallery


def rng_for(seed: int, *stream: int) -> np.random.Generator:
    """Independent, reproducible streams per phase, so adding a phase does not change another's data."""
    return np.random.default_rng([seed, *stream])


def caption_words(rng: np.random.Generator, n: int) -> np.ndarray:
    """Words per caption, Flickr30K-like: ~12 words, clipped to 3..40 (ids add <start>/<end>)."""
    return np.clip(np.rint(rng.normal(12.0, 4.0, n)), 3, 40).astype(np.int64)


def vocab_json(size: int) -> dict[str, Any]:
    """A vocabulary of ``size`` words in the original layout: the four specials, then ``w0``, ``w1``, ..."""
    words = ["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(size - 4)]
    return {
        "word2idx": {w: i for i, w in enumerate(words)},
        "idx2word": {str(i): w for i, w in enumerate(words)},
        "idx": len(words),
    }


def caption_texts(rng: np.random.Generator, n: int, vocab_size: int) -> list[str]:
    """Query strings of in-vocabulary words (``w17 w4051 ...``) with Flickr30K-like lengths."""
    lengths = caption_words(rng, n)
    return [" ".join(f"w{i}" for i in rng.integers(0, vocab_size - 4, int(m))) for m in lengths]


def unit_rows(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.standard_normal(shape, dtype=np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x


class VectorPool:
    """Random unit-norm vectors drawn from a fixed pool of Gaussian directions.

    Drawing 1.8G fresh normals for a 50K-image gallery takes about a minute here; gathering rows of a
    64K-vector pool is a memory copy. Every gallery row is still its own memory (a copy, not a view),
    so the search reads the same bytes as it would from a real cache; only the values repeat.
    """

    SIZE = 65536

    def __init__(self, seed: int, dim: int) -> None:
        self.vectors = unit_rows(rng_for(seed, 9), (self.SIZE, dim))

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...], out: np.ndarray | None = None) -> np.ndarray:
        idx = rng.integers(0, self.SIZE, shape)
        return np.take(self.vectors, idx, axis=0, out=out)


def gram_into(x: np.ndarray, out: np.ndarray) -> None:
    """Per-image Gram matrices (B, R, d) -> (B, R, R) into ``out``.

    numpy's stacked matmul with a transposed operand falls off BLAS (about 100x slower than a loop);
    PyTorch's bmm is the fast path when it is installed, einsum the fallback.
    """
    torch = optional_torch()
    if torch is not None:
        t = torch.from_numpy(x)
        torch.bmm(t, t.transpose(1, 2), out=torch.from_numpy(out))
    else:
        np.einsum("nrd,nsd->nrs", x, x, out=out, optimize=True)


class ImageStore:
    """Random unit-norm region embeddings and their Grams, grown on demand; galleries are prefix views.

    Rows are drawn in fixed chunks with per-chunk seeds, so row i is the same whatever the final size.
    """

    CHUNK = 1024

    def __init__(self, seed: int, regions: int, dim: int) -> None:
        self.seed, self.regions, self.dim = seed, regions, dim
        self.pool: VectorPool | None = None
        self.images = np.zeros((0, regions, dim), np.float32)
        self.gram = np.zeros((0, regions, regions), np.float32)

    def bytes_for(self, n: int) -> int:
        return n * self.regions * (self.dim + self.regions) * 4

    def ensure(self, n: int) -> None:
        have = len(self.images)
        if n <= have:
            return
        if self.pool is None:
            self.pool = VectorPool(self.seed, self.dim)
        images = np.empty((n, self.regions, self.dim), np.float32)
        gram = np.empty((n, self.regions, self.regions), np.float32)
        images[:have], gram[:have] = self.images, self.gram
        self.images, self.gram = images, gram  # the old arrays are freed here, before the new rows are drawn
        for c in range(have // self.CHUNK, math.ceil(n / self.CHUNK)):
            a, b = max(c * self.CHUNK, have), min((c + 1) * self.CHUNK, n)
            rng = rng_for(self.seed, 10, c)
            idx = rng.integers(0, VectorPool.SIZE, (self.CHUNK, self.regions))[a - c * self.CHUNK : b - c * self.CHUNK]
            np.take(self.pool.vectors, idx, axis=0, out=images[a:b])
            gram_into(images[a:b], gram[a:b])

    def gallery(self, n: int) -> ImageGallery:
        """The first ``n`` images as an in-memory gallery (views, no copy)."""
        self.ensure(n)
        return ImageGallery.from_arrays(self.images[:n], self.gram[:n], folder="<synthetic>")


def synthetic_caption_gallery(
    rng: np.random.Generator, n: int, dim: int, pool: VectorPool | None = None
) -> CaptionGallery:
    """``n`` captions of Flickr30K-like lengths with random unit-norm word embeddings, in the stored layout."""
    lengths = caption_words(rng, n) + 2  # ids per caption, <start>/<end> included, as the encoder sees them
    order = np.argsort(lengths, kind="stable")  # the stored order: by length
    sorted_lengths = lengths[order]
    total = int(sorted_lengths.sum())
    words = pool.draw(rng, (total,)) if pool is not None else unit_rows(rng, (total, dim))
    texts = [f"synthetic caption {i}" for i in range(n)]
    return CaptionGallery.from_arrays(words, sorted_lengths, texts, ids=order, folder="<synthetic>")
