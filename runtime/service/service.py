"""One search service: an executor (loaded in the background), the batcher in front of it, metrics.

The HTTP layer calls ``search`` / ``append_*`` and reads ``ready``; it never touches the executor's
internals, so an executor that fans batches out to shards drops in through ``open_executor``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from runtime.pictures import ImageFolder
from runtime.searcher import DIRECTIONS, Queries
from runtime.service.batcher import Batcher
from runtime.service.executor import Executor
from runtime.service.monitoring import Monitoring
from runtime.service.settings import Settings
from runtime.service.types import Appended, Hits

logger = logging.getLogger(__name__)

# Each direction's search endpoint (/v1/search/<endpoint>): its errors and the metrics' labels name it so.
ENDPOINT = {"text_to_image": "text", "image_to_text": "images"}


class NotReady(RuntimeError):
    """The engine and galleries are still loading (or failed to load)."""


class NoGallery(RuntimeError):
    """A search direction whose gallery does not exist yet."""


class Service:
    def __init__(
        self,
        open_executor: Callable[[], Executor],
        settings: Settings | None = None,
        token: str | None = None,
        pictures: ImageFolder | None = None,
    ) -> None:
        self.open_executor = open_executor
        self.settings = settings or Settings()
        self.token = token
        self.pictures = pictures  # the image gallery's pictures (--image-dir), for the search page
        self.executor: Executor | None = None
        self.batcher: Batcher | None = None
        self.load_error: BaseException | None = None
        self.on_loaded: list[Callable[[Service], None]] = []
        self.on_load_failed: list[Callable[[BaseException], None]] = []
        self.monitoring = Monitoring(self.settings.batching.max_batch)
        self._loaded = threading.Event()
        self._loader: threading.Thread | None = None
        self._closed = False
        self._writes = threading.Condition()  # appends in progress; close() waits for them
        self._writing = 0
        self._closing = False

    @property
    def ready(self) -> bool:
        return self._loaded.is_set() and self.executor is not None and not self._closed

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> threading.Thread:
        """Load the executor in a thread (idempotent); the thread is returned for whoever waits on it."""
        if self._loader is None:
            self._loader = threading.Thread(target=self._load, name="service-loader", daemon=True)
            self._loader.start()
        return self._loader

    def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            executor = self.open_executor()
        except BaseException as e:  # reported by whoever started the service (the CLI exits 2)
            self.load_error = e
            logger.error("loading failed: %s", e)
            for cb in self.on_load_failed:
                cb(e)
            return
        self.executor = executor
        self.batcher = Batcher(
            executor.search,
            self.settings.batching,
            on_batch=lambda direction, n, s: self.monitoring.record_batch(ENDPOINT[direction], n, s),
        )
        self.batcher.start()
        self.monitoring.watch(lambda: self.batcher.depth, lambda kind: self.executor.sizes().get(kind) or 0)
        self._loaded.set()
        logger.info("loaded in %.1f s", time.perf_counter() - t0)
        for cb in self.on_loaded:
            cb(self)

    def close(self, timeout: float = 30.0) -> None:
        """Finish queued searches, then release the engine."""
        if self._closed:
            return
        with self._writes:  # an append that has started finishes (commits and answers); none starts after
            self._closing = True
            if self._writing:
                logger.warning("shutting down: waiting for %d append(s) in progress to finish", self._writing)
            self._writes.wait_for(lambda: self._writing == 0)
        if self._loader is not None:
            self._loader.join(timeout)
        if self.batcher is not None:
            self.batcher.close(timeout)
        self._closed = True
        if self.executor is not None:
            self.executor.close()

    # ------------------------------------------------------------------ requests

    def require_ready(self) -> Executor:
        if not self.ready:
            raise NotReady(
                "the engine and galleries are still loading"
                if self.load_error is None
                else f"loading failed: {self.load_error}"
            )
        return self.executor

    def _require_gallery(self, direction: str) -> Executor:
        gallery = DIRECTIONS[direction]
        executor = self.require_ready()
        if executor.sizes().get(gallery) is None:
            executor.refresh()  # another writer may have made it since (rare: a gallery appears once)
        if executor.sizes().get(gallery) is None:
            raise NoGallery(
                f"no {gallery[:-1]} gallery to search yet: {ENDPOINT[direction]} queries search the {gallery} "
                f"gallery; add items with POST /v1/gallery/{gallery}"
            )
        return executor

    async def search_text(self, queries: Sequence[str], k: int) -> Hits:
        """The hits, with the seconds of their stages from tokenise to labels (``Hits.seconds``)."""
        # Tokenised once, here: a bad caption fails alone, not inside a batch.
        t0 = time.perf_counter()
        prepared = self._require_gallery("text_to_image").prepare("text_to_image", queries)
        return await self._search("text_to_image", prepared, k, time.perf_counter() - t0)

    async def search_images(self, regions: np.ndarray | None, k: int, ids: Sequence[int] | None = None) -> Hits:
        """Image queries: region features, or (``ids``) images of the image gallery."""
        t0 = time.perf_counter()
        executor = self._require_gallery("image_to_text")
        if ids is not None:
            self._require_gallery("text_to_image")
            prepared = executor.image_queries(ids)
        else:
            prepared = executor.prepare("image_to_text", regions)
        # the features' checks: this direction's "tokenise"
        return await self._search("image_to_text", prepared, k, time.perf_counter() - t0)

    async def _search(self, direction: str, prepared: Queries, k: int, tokenise: float) -> Hits:
        """Run prepared queries through the batcher (bench/plain_server.py overrides this, and only this)."""
        # Only queries of one form with the same number of regions can be stacked into one batch.
        hits = await asyncio.wrap_future(self.batcher.submit(direction, prepared, k, key=prepared.batch_key))
        hits.seconds["tokenise"] = tokenise
        return hits

    def explain(
        self, item: int, caption: str | None = None, image_id: int | None = None, regions: np.ndarray | None = None
    ) -> dict:
        """One pair's explanation (``Executor.explain``); not batched: one pair is one small head call."""
        executor = self._require_gallery("text_to_image" if caption is not None else "image_to_text")
        if image_id is not None:
            self._require_gallery("text_to_image")
        return executor.explain(item, caption, image_id, regions)

    def images(self, offset: int, limit: int) -> tuple[int, list[int], list[str | None] | None]:
        return self._require_gallery("text_to_image").images(offset, limit)

    def append_images(self, regions: np.ndarray, names: list[str] | None, key: str | None = None) -> Appended:
        with self._write():
            out = self.require_ready().append_images(regions, names, key)
        self.monitoring.appended.labels("images").inc(0 if out.repeated else out.added)
        return out

    def append_captions(self, captions: list[str], key: str | None = None) -> Appended:
        with self._write():
            out = self.require_ready().append_captions(captions, key)
        self.monitoring.appended.labels("captions").inc(0 if out.repeated else out.added)
        return out

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """An append in progress: refused once shutdown began, waited for by ``close``."""
        with self._writes:
            if self._closing:
                raise NotReady("shutting down; the write was not started")
            self._writing += 1
        try:
            yield
        finally:
            with self._writes:
                self._writing -= 1
                self._writes.notify_all()
