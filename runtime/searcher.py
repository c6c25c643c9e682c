"""Batched top-k search against a cached gallery, in both directions (faiss's ``search`` contract).

* text -> image: ``Searcher(engine, images=ImageGallery).search(["a dog on a beach"], k)``
* image -> text: ``Searcher(engine, captions=CaptionGallery).search(regions (n, R, img_dim), k)``

Both work whatever the model's ``cross_attn`` (that names the attention, not the search direction).
Queries are grouped by length (little padding), the gallery is scored block by block with a running
top-k merge, so memory is bounded by the block size for any gallery. ``search`` keeps no mutable
state and the backends are thread-safe, so one Searcher serves several threads.
"""
from __future__ import annotations

import logging
import threading
from typing import Sequence

import numpy as np

from runtime.buckets import encode_by_length
from runtime.engine import ScanEngine
from runtime.gallery import CaptionGallery, ImageGallery
from runtime.topk import RunningTopK

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_BLOCK = 512
DEFAULT_CAPTION_BLOCK = 2048
DEFAULT_QUERY_BATCH = 32


class SearchError(ValueError):
    """Bad search input (k, queries) or a missing gallery."""


class Searcher:
    def __init__(self, engine: ScanEngine, images: ImageGallery | None = None, captions: CaptionGallery | None = None,
                 image_block: int = DEFAULT_IMAGE_BLOCK, caption_block: int = DEFAULT_CAPTION_BLOCK,
                 query_batch: int = DEFAULT_QUERY_BATCH, resident: bool | None = None) -> None:
        """``resident``: keep the image gallery's blocks uploaded in the backend's memory (the default
        with ONNX Runtime on CUDA and with TensorRT); ``False`` reads blocks from the cache per search."""
        for name, v in (("image_block", image_block), ("caption_block", caption_block), ("query_batch", query_batch)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SearchError(f"{name} must be a positive integer, received {v!r}")
        self.engine = engine
        self.images = images
        self.captions = captions
        self.image_block = image_block
        self.caption_block = caption_block
        self.query_batch = query_batch
        profile = getattr(engine.head, "profile", None)  # TensorRT engines only serve their profile's shapes
        if profile:
            max_n, max_q = profile["images"]["max"][0], profile["captions"]["max"][0]
            self.image_block, self.caption_block = min(image_block, max_n), min(caption_block, max_q)
            self.query_batch = min(query_batch, max_q, max_n)
        self._device: tuple | None = None
        self._device_lock = threading.Lock()
        head_device = getattr(engine.head, "device", "cpu")
        self._resident = head_device == "cuda" if resident is None else resident
        self._blocks: list[tuple[int, dict]] | None = None

    def _resident_blocks(self) -> list[tuple[int, dict]]:
        """Image gallery blocks uploaded once as ONNX Runtime OrtValues (IOBinding inputs)."""
        with self._device_lock:
            if self._blocks is None:
                head = self.engine.head
                blocks = []
                for offset, imgs, gram in self.images.blocks(self.image_block):
                    feeds = {"images": head.to_device(imgs, "images")}
                    if self.engine.needs_image_gram:
                        feeds["image_gram"] = head.to_device(gram, "image_gram")
                    blocks.append((offset, feeds))
                self._blocks = blocks
            return self._blocks

    def _device_gallery(self, k: int):
        """(top-k engine, resident gallery) when serving with TensorRT and a top-k engine exists, else None."""
        engine = self.engine
        engines = engine.manifest.data.get("engines") or {}
        if engine.backend_name != "tensorrt" or "topk" not in engines or k > int(engines["topk"].get("topk_max", 0)):
            return None
        with self._device_lock:  # upload once, even when the first searches arrive from several threads
            if self._device is None:
                from runtime.backends.tensorrt import ResidentGallery, TensorRTBackend

                topk = TensorRTBackend.from_manifest(engine.manifest, "topk")
                arrays = {"images": self.images.images}
                if engine.needs_image_gram:
                    arrays["image_gram"] = self.images.image_gram
                self._device = (topk, ResidentGallery(topk, arrays))
            return self._device

    def close(self) -> None:
        """Free the device-resident gallery, if one was uploaded."""
        self._blocks = None
        if self._device is not None:
            topk, resident = self._device
            resident.close()
            topk.close()
            self._device = None

    def __enter__(self) -> "Searcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ public

    def search(self, queries: Sequence[str] | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Captions (list of str) search the image gallery; region features (n, R, img_dim) the caption gallery."""
        if isinstance(queries, np.ndarray):
            return self.search_images(queries, k)
        if isinstance(queries, (str, bytes)):
            queries = [queries]
        return self.search_text(list(queries), k)

    def search_text(self, captions: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        k = _check_k(k)
        if self.images is None:
            raise SearchError("text -> image search needs an image gallery; build one with "
                              "runtime/search.py --engine ENGINE --gallery DIR --images FEATS.npy")
        if len(captions) == 0:
            raise SearchError("queries: expected at least one caption, received none")
        ids, lengths = self.engine.tokenizer.encode_batch(list(captions))  # validates every query first
        scores = np.empty((len(captions), k), np.float32)
        out_ids = np.empty((len(captions), k), np.int64)
        for idx, words in encode_by_length(self.engine, ids, lengths, self.query_batch):  # words (q, L, d)
            s, i = self._text_to_images(words, lengths[idx], k)
            scores[idx], out_ids[idx] = s, i
        return scores, out_ids

    def search_images(self, regions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = _check_k(k)
        if self.captions is None:
            raise SearchError("image -> text search needs a caption gallery; build one with "
                              "runtime/search.py --engine ENGINE --gallery DIR --captions CAPTIONS.txt")
        images, gram = self.engine.encode_images(regions, name="query regions")
        scores = np.empty((len(images), k), np.float32)
        out_ids = np.empty((len(images), k), np.int64)
        for a in range(0, len(images), self.query_batch):
            sl = slice(a, a + self.query_batch)
            scores[sl], out_ids[sl] = self._images_to_text(images[sl], gram[sl], k)
        return scores, out_ids

    # ------------------------------------------------------------------ scoring

    def _text_to_images(self, words: np.ndarray, lengths: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        gallery = self.images
        top = RunningTopK(len(words), k)
        device = self._device_gallery(k)
        if device is not None:
            # TensorRT: the gallery stays on the GPU, blocks are pointer offsets and the top-k runs in
            # the engine, so only (k, q) results per block come back to the host.
            topk_backend, resident = device
            feeds = {"captions": words, "lengths": lengths}
            for start in range(0, len(gallery), self.image_block):
                stop = min(start + self.image_block, len(gallery))
                out = topk_backend.run_device({**resident.block_feeds(start, stop), **feeds})
                idx = out["topk_index"].T[:, :k]  # (q, k) rows within the block
                top.merge(out["topk_scores"].T[:, :k].astype(np.float32), np.asarray(gallery.ids)[start + idx])
            return top.result()
        if self._resident and hasattr(self.engine.head, "to_device"):
            query = {"captions": words.astype(self.engine.head_dtype, copy=False), "lengths": lengths}
            for offset, feeds in self._resident_blocks():
                sims = self.engine.head.run({**feeds, **query})["sims"]  # (block, q)
                top.add_block(sims.T.astype(np.float32, copy=False), gallery.ids[offset:offset + len(sims)])
            return top.result()
        for offset, imgs, gram in gallery.blocks(self.image_block):
            sims = self.engine.sims(imgs, gram, words, lengths)  # (block, q)
            top.add_block(sims.T, gallery.ids[offset:offset + len(imgs)])
        return top.result()

    def _images_to_text(self, images: np.ndarray, gram: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        gallery = self.captions
        top = RunningTopK(len(images), k)
        for position, words, lengths in gallery.blocks(self.caption_block):
            sims = self.engine.sims(images, gram, words, lengths)  # (n, block)
            top.add_block(sims, gallery.ids[position:position + len(words)])
        return top.result()


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise SearchError(f"k must be a positive integer, received {k!r}")
    return int(k)
