"""The exact rerank of two-stage search: SCAN scores of the candidates the index proposed
(``runtime/gallery/index.py``; docs/two_stage.md)."""

from __future__ import annotations

import numpy as np

from runtime.gallery import CaptionGallery, ImageGallery


def rescore_images(
    engine, gallery: ImageGallery, positions: np.ndarray, words: np.ndarray, length: int, block: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact SCAN scores of one caption (``words`` (1, L, d)) against the images at ``positions``
    (ascending): (scores (B,), gallery ids (B,))."""
    scores = []
    for a in range(0, len(positions), block):
        pos = positions[a : a + block]
        gram = np.asarray(gallery.image_gram[pos]) if engine.needs_image_gram else None
        scores.append(engine.sims(np.asarray(gallery.images[pos]), gram, words, np.asarray([length]))[:, 0])
    return _cat(scores), np.asarray(gallery.ids)[positions]


def rescore_captions(
    engine, gallery: CaptionGallery, positions: np.ndarray, image: np.ndarray, gram: np.ndarray, block: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact SCAN scores of one image (``image`` (1, R, d), ``gram`` (1, R, R)) against the captions at
    ``positions`` (ascending, so grouped by length: each run is one padding-free batch)."""
    lengths = np.asarray(gallery.lengths)[positions]
    offsets = np.asarray(gallery.offsets)
    scores = []
    for run in np.split(np.arange(len(positions)), np.flatnonzero(np.diff(lengths)) + 1):
        length = int(lengths[run[0]]) if len(run) else 0
        for a in range(0, len(run), block):
            pos = positions[run[a : a + block]]
            caps = np.asarray(gallery.words[offsets[pos][:, None] + np.arange(length)[None, :]])  # (B, L, d)
            scores.append(engine.sims(image, gram, caps, np.full(len(pos), length, np.int64))[0])
    return _cat(scores), np.asarray(gallery.ids)[positions]


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros(0, np.float32)
