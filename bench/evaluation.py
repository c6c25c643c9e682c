"""The full (n_images, n_captions) similarity matrix of a precomp split, for the recall protocol.

Reads the original data layout ``<data>/{split}_ims.npy`` and ``{split}_caps.txt`` (5 captions per
image; an .npy with 5N rows repeats each image 5 times and is de-duplicated as the original does).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.metrics import dedupe_repeated_images
from runtime.buckets import encode_by_length
from runtime.captions import DataError, read_captions
from runtime.engine import ScanEngine
from runtime.features import load_regions


def load_split(data: str | Path, split: str, img_dim: int) -> tuple[np.ndarray, list[str]]:
    """(regions (N, R, img_dim) memory-mapped, 5N captions), checking the counts match."""
    data = Path(data)
    ims_path, caps_path = data / f"{split}_ims.npy", data / f"{split}_caps.txt"
    for p in (ims_path, caps_path):
        if not p.is_file():
            raise DataError(
                f"{p}: missing; expected the original precomp layout {data}/{split}_ims.npy and {data}/{split}_caps.txt"
            )
    regions = load_regions(ims_path, img_dim)
    captions = read_captions(caps_path)
    try:
        step = dedupe_repeated_images(len(regions), len(captions))
    except ValueError as e:
        raise DataError(
            f"{data} ({split}): {len(captions)} captions for {len(regions)} image rows; expected "
            f"5 captions per image ({5 * len(regions)} lines), or one per row of a 5x-repeated .npy"
        ) from e
    return (regions[::step] if step > 1 else regions), captions


def full_sims(
    engine: ScanEngine,
    regions: np.ndarray,
    captions: Sequence[str],
    image_block: int = 256,
    caption_batch: int = 128,
    progress: bool = True,
    store_dtype: str = "float32",
) -> np.ndarray:
    """Similarities (n_images, n_captions), float32, scored in blocks with captions grouped by length.

    ``store_dtype="float16"`` keeps the encoded images as a float16 gallery cache would, to measure what
    such a cache does to recall.
    """
    from tqdm import tqdm

    n = len(regions)
    images = np.empty((n, regions.shape[1], engine.config.embed_size), store_dtype)
    grams = np.empty((n, regions.shape[1], regions.shape[1]), store_dtype)
    for a in tqdm(range(0, n, 128), desc="encoding images", disable=not progress, leave=False):
        images[a : a + 128], grams[a : a + 128] = engine.encode_images(
            np.asarray(regions[a : a + 128]), name=f"images[{a}:{a + 128}]"
        )
    ids, lengths = engine.tokenizer.encode_batch(list(captions))
    sims = np.empty((n, len(captions)), np.float32)
    with tqdm(total=len(captions), desc="scoring captions", disable=not progress, leave=False) as bar:
        for idx, words in encode_by_length(engine, ids, lengths, caption_batch):
            for b in range(0, n, image_block):
                sims[b : b + image_block, idx] = engine.sims(
                    images[b : b + image_block], grams[b : b + image_block], words, lengths[idx]
                )
            bar.update(len(idx))
    return sims
