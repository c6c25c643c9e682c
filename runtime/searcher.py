"""Batched top-k search against a cached gallery, in both directions (faiss's ``search`` contract).

* text -> image: ``Searcher(engine, images=ImageGallery).search(["a dog on a beach"], k)``
* image -> text: ``Searcher(engine, captions=CaptionGallery).search(regions (n, R, img_dim), k)``

Both work whatever the model's ``cross_attn`` (that names the attention, not the search direction).
Queries are grouped by length (little padding), the gallery is scored block by block with a running
top-k merge, so memory is bounded by the block size for any gallery. Where the galleries live and how
a block is scored is the head backend's choice (``Backend.upload`` / ``Backend.block_topk``). The
galleries are uploaded once, under a lock, on the first search; the backends are thread-safe, so one
Searcher serves several threads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Self

import numpy as np

from runtime.backends.base import GalleryBlocks
from runtime.buckets import encode_by_length
from runtime.engine import ScanEngine
from runtime.gallery import CaptionGallery, ImageGallery
from runtime.topk import NonFiniteScore, RunningTopK

logger = logging.getLogger(__name__)

# How the errors for a missing gallery say to build one.
_BUILD_IMAGES = "build one with runtime/search.py --engine ENGINE --gallery DIR --images FEATS.npy"
_BUILD_CAPTIONS = "build one with runtime/search.py --engine ENGINE --gallery DIR --captions CAPTIONS.txt"

DEFAULT_IMAGE_BLOCK = 512
DEFAULT_CAPTION_BLOCK = 2048
DEFAULT_QUERY_BATCH = 32
# Results are (n, k) arrays whatever the gallery holds (faiss's contract), so k is bounded: 10^5 results of
# 12 bytes are 1.2 MB per query. The running top-k itself keeps only min(k, gallery) candidates.
MAX_K = 100_000


class SearchError(ValueError):
    """Bad search input (k, queries) or a missing gallery."""


class SearcherContract:
    """What every searcher (one engine, an ensemble, shards) shares: ``search`` picks the direction from the
    queries' type, and a searcher is a context manager that calls its ``close``."""

    def search(self, queries: Sequence[str] | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Captions (list of str) search the image gallery; region features (n, R, img_dim) the caption gallery."""
        if isinstance(queries, np.ndarray):
            return self.search_images(queries, k)
        if isinstance(queries, (str, bytes)):
            queries = [queries]
        return self.search_text(list(queries), k)

    def search_text(self, captions: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def search_images(self, regions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _check_text_search(k: object, captions: Sequence[str], has_images: bool, remedy: str) -> int:
        """``k`` checked; an image gallery and at least one caption required (``remedy``: how to get the gallery)."""
        k = _check_k(k)
        if not has_images:
            raise SearchError(f"text -> image search needs an image gallery; {remedy}")
        if len(captions) == 0:
            raise SearchError("queries: expected at least one caption, received none")
        return k

    @staticmethod
    def _check_image_search(k: object, has_captions: bool, remedy: str) -> int:
        """``k`` checked; a caption gallery required (``remedy``: how to get it)."""
        k = _check_k(k)
        if not has_captions:
            raise SearchError(f"image -> text search needs a caption gallery; {remedy}")
        return k


class Searcher(SearcherContract):
    def __init__(
        self,
        engine: ScanEngine,
        images: ImageGallery | None = None,
        captions: CaptionGallery | None = None,
        image_block: int = DEFAULT_IMAGE_BLOCK,
        caption_block: int = DEFAULT_CAPTION_BLOCK,
        query_batch: int = DEFAULT_QUERY_BATCH,
        resident: bool | None = None,
        candidates: int = 0,
        neighbors: int | None = None,
        nprobe: int | None = None,
    ) -> None:
        """``resident``: keep the galleries in the head backend's memory (None: the backend's choice, e.g.
        on the GPU with ONNX Runtime CUDA and TensorRT); ``False`` reads blocks from the cache per search.

        ``candidates``: two-stage search (runtime/candidates.py, docs/two_stage.md): the gallery's candidate
        index proposes this many items per query and only those are scored exactly; 0 (the default) scores
        every item. ``neighbors`` / ``nprobe`` tune the index search (defaults there)."""
        for name, v in (("image_block", image_block), ("caption_block", caption_block), ("query_batch", query_batch)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SearchError(f"{name} must be a positive integer, received {v!r}")
        for name, v in (("candidates", candidates), ("neighbors", neighbors or 0), ("nprobe", nprobe or 0)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
                raise SearchError(f"{name} must be a non-negative integer, received {v!r}")
        self.candidates = int(candidates)
        self.neighbors, self.nprobe = neighbors, nprobe
        self._indexes: dict[str, object] = {}
        self._index_lock = threading.Lock()
        self.engine = engine
        self.images = images
        self.captions = captions
        # A backend may only serve bounded shapes (a TensorRT profile): blocks and batches fit in them.
        limits = engine.head.limits
        unlimited = max(image_block, caption_block, query_batch)
        max_images, max_captions = limits.get("images", unlimited), limits.get("captions", unlimited)
        self.image_block = min(image_block, max_images)
        self.caption_block = min(caption_block, max_captions)
        self.query_batch = min(query_batch, max_images, max_captions)
        self.resident = resident
        self._uploaded: dict[str, GalleryBlocks] = {}
        self._upload_lock = threading.Lock()

    def _gallery(self, kind: str) -> GalleryBlocks:
        """The ``images`` or ``captions`` gallery as the head backend holds it, uploaded on first use."""
        with self._upload_lock:  # upload once, even when the first searches arrive from several threads
            if kind not in self._uploaded:
                self._uploaded[kind] = self.engine.head.upload(
                    self._image_blocks if kind == "images" else self._caption_blocks, self.resident
                )
            return self._uploaded[kind]

    def _image_blocks(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        for offset, imgs, gram in self.images.blocks(self.image_block):
            feeds = {"images": imgs}
            if self.engine.needs_image_gram:
                feeds["image_gram"] = gram
            yield offset, feeds

    def _caption_blocks(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        for position, words, lengths in self.captions.blocks(self.caption_block):
            yield position, {"captions": words, "lengths": lengths}

    def close(self) -> None:
        """Free the galleries uploaded to the backend, if any."""
        with self._upload_lock:
            uploaded, self._uploaded = self._uploaded, {}
        for gallery in uploaded.values():
            gallery.close()

    # ------------------------------------------------------------------ public

    def search_text(self, captions: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        k = self._check_text_search(k, captions, self.images is not None, _BUILD_IMAGES)
        ids, lengths = self.engine.tokenizer.encode_batch(list(captions))  # validates every query first
        _warn_if_empty(self.images)
        scores = np.empty((len(captions), k), np.float32)
        out_ids = np.empty((len(captions), k), np.int64)
        for idx, words in encode_by_length(self.engine, ids, lengths, self.query_batch):  # words (q, L, d)
            if self._two_stage("images"):
                scores[idx], out_ids[idx] = self._two_stage_text(words, lengths[idx], k)
                continue
            query = {"captions": words, "lengths": lengths[idx]}
            scores[idx], out_ids[idx] = self._score("images", self.images.ids, query, k, axis=0)
        return scores, out_ids

    def search_images(self, regions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = self._check_image_search(k, self.captions is not None, _BUILD_CAPTIONS)
        images, gram = self.engine.encode_images(regions, name="query regions")
        _warn_if_empty(self.captions)
        scores = np.empty((len(images), k), np.float32)
        out_ids = np.empty((len(images), k), np.int64)
        for a in range(0, len(images), self.query_batch):
            sl = slice(a, a + self.query_batch)
            if self._two_stage("captions"):
                scores[sl], out_ids[sl] = self._two_stage_images(images[sl], gram[sl], k)
                continue
            query = {"images": images[sl]}
            if self.engine.needs_image_gram:
                query["image_gram"] = gram[sl]
            scores[sl], out_ids[sl] = self._score("captions", self.captions.ids, query, k, axis=1)
        return scores, out_ids

    # ------------------------------------------------------------------ scoring

    def _score(
        self, kind: str, gallery_ids: np.ndarray, query: dict[str, np.ndarray], k: int, axis: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The one scoring loop: per-block top-k from the backend, merged into a running top-k.

        ``axis``: the gallery's axis of the head's (N images, Q captions) similarities.
        """
        ids = np.asarray(gallery_ids)
        top = RunningTopK(len(next(iter(query.values()))), k, len(ids))
        try:
            for scores, rows in self.engine.head.block_topk(self._gallery(kind), query, k, axis):
                top.merge(scores, ids[rows])
        except NonFiniteScore as e:  # never a silent drop: name the item
            raise self._corrupted(kind, e) from e
        return top.result()

    def _corrupted(self, kind: str, e: NonFiniteScore) -> SearchError:
        gallery = self.images if kind == "images" else self.captions
        return SearchError(
            f"{gallery.label(e.item_id)} scored {e.value}: its cached arrays are corrupted; "
            f"check the gallery with runtime/search.py --verify and rebuild it"
        )

    # ------------------------------------------------------------------ two-stage (runtime/candidates.py)

    def _two_stage(self, kind: str) -> bool:
        # With every item a candidate the exact path runs: identical results on every backend. Without an
        # index of this generation (open_index says why) too.
        gallery = self.images if kind == "images" else self.captions
        return 0 < self.candidates < len(gallery) and self.candidate_index(kind) is not None

    def candidate_index(self, kind: str):
        """The gallery's candidate index, opened once (None: search exactly; see ``open_index``)."""
        from runtime.gallery.index import open_index

        with self._index_lock:
            if kind not in self._indexes:
                gallery = self.images if kind == "images" else self.captions
                encoder = (
                    self.engine.manifest.image_encoder_id if kind == "images" else self.engine.manifest.text_encoder_id
                )
                self._indexes[kind] = open_index(gallery, encoder)
            return self._indexes[kind]

    def _two_stage_text(self, words: np.ndarray, lengths: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from runtime.candidates import rescore_images

        index = self.candidate_index("images")
        proposals = index.search(
            [w[:n] for w, n in zip(words, lengths)], self.engine.config, self.candidates, self.neighbors, self.nprobe
        )
        top = []
        for q, positions in enumerate(proposals):
            s, i = rescore_images(
                self.engine, self.images, positions, words[q : q + 1, : lengths[q]], int(lengths[q]), self.image_block
            )
            top.append(self._top_of("images", s, i, k))
        return np.concatenate([t[0] for t in top]), np.concatenate([t[1] for t in top])

    def _two_stage_images(self, images: np.ndarray, gram: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from runtime.candidates import rescore_captions

        index = self.candidate_index("captions")
        proposals = index.search(list(images), self.engine.config, self.candidates, self.neighbors, self.nprobe)
        top = []
        for q, positions in enumerate(proposals):
            s, i = rescore_captions(
                self.engine, self.captions, positions, images[q : q + 1], gram[q : q + 1], self.caption_block
            )
            top.append(self._top_of("captions", s, i, k))
        return np.concatenate([t[0] for t in top]), np.concatenate([t[1] for t in top])

    def _top_of(self, kind: str, scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(1, k) top-k of one query's rescored candidates, in the contract of the exact path."""
        order = np.argsort(ids, kind="stable")
        top = RunningTopK(1, k, len(self.images if kind == "images" else self.captions))
        try:
            top.add_block(scores[order][None, :], ids[order])
        except NonFiniteScore as e:  # as in _score: name the item
            raise self._corrupted(kind, e) from e
        return top.result()


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise SearchError(f"k must be a positive integer, received {k!r}")
    if k > MAX_K:
        raise SearchError(f"k must be at most {MAX_K}, received {k}")
    return int(k)


def _warn_if_empty(gallery: ImageGallery | CaptionGallery) -> None:
    if gallery is not None and len(gallery) == 0:
        logger.warning("the gallery %s is empty: every result is -1", gallery.folder)
