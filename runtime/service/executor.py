"""What executes the service's batches and appends: one ``Executor`` around one ``Searcher``.

A single model, an ensemble and a sharded gallery differ only in the searcher the executor holds
(``Executor.open``). The searcher appends through its gallery folder and swaps the new generation in
atomically: searches in flight finish on the generation they started with (its memory maps stay valid after
the commit), and every search that starts after an append has returned sees the appended items.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.engine import ScanEngine
from runtime.explain import pair_json
from runtime.gallery.store import Repeated
from runtime.options import EngineOptions, SearchOptions
from runtime.searcher import DIRECTIONS, Queries, Searcher
from runtime.service.types import Appended, Hits
from runtime.stages import Stages


class Executor:
    """Runs searches and appends with ``searcher``; thread-safe (the batcher calls it from several worker
    threads). ``engine_paths``, ``folder``, ``engine_options`` and ``ray_address`` are what ``describe`` reports."""

    def __init__(
        self,
        searcher: Searcher,
        engine_paths: Sequence[str | Path],
        folder: str | Path,
        engine_options: EngineOptions = EngineOptions(),
        ray_address: str | None = None,
    ) -> None:
        self.searcher = searcher
        self.engine_paths = [str(p) for p in engine_paths]
        self.folder = Path(folder)
        self.engine_options = engine_options
        self.ray_address = ray_address

    @classmethod
    def open(
        cls,
        engines: Sequence[str | Path],
        gallery: str | Path,
        engine_options: EngineOptions = EngineOptions(),
        options: SearchOptions = SearchOptions(),
        weights: Sequence[float] | str | None = None,
        shards: dict[str, Any] | None = None,
    ) -> Executor:
        """The engines at ``engines`` (several: an ensemble, ``weights``) over the gallery folder ``gallery``;
        with ``shards`` (``address``, ``timeout_s``, ... of ``runtime.cluster.Shards``), ``gallery`` is a
        sharded folder served by Ray shard actors."""
        if shards is not None:
            from runtime.cluster import open_shards

            searcher = open_shards(engines[0], gallery, engine_options, options, **shards)
            return cls(searcher, engines, gallery, engine_options, shards.get("address"))
        with contextlib.ExitStack() as stack:
            scans = [stack.enter_context(ScanEngine.open(p, engine_options)) for p in engines]
            searcher = Searcher.open(scans, gallery, weights=weights, options=options)
            stack.pop_all()  # the executor owns the engines now
        return cls(searcher, engines, gallery, engine_options)

    def prepare(self, direction: str, queries: Sequence[str] | np.ndarray, field: str = "queries") -> Queries:
        """Queries checked and tokenised once, before they are queued (errors name ``field``)."""
        return self.searcher.prepare(direction, queries, field)

    def image_queries(self, ids: Sequence[int]) -> Queries:
        """Gallery images as image -> text queries (``POST /v1/search/images {"ids": [...]}``)."""
        return self.searcher.image_queries(ids)

    def explain(
        self, item: int, caption: str | None = None, image_id: int | None = None, regions: np.ndarray | None = None
    ) -> dict[str, Any]:
        """The explanation of one pair as ``POST /v1/explain`` answers it (``picture`` left None): a ``caption``
        and image ``item``, or gallery image ``image_id`` / uploaded ``regions`` (1, R, img_dim) and caption
        ``item``."""
        if caption is not None:
            explanation, image_id = self.searcher.explain(caption, item), item
        elif image_id is not None:
            explanation = self.searcher.explain(self.searcher.image_queries([image_id]), item)
        else:
            explanation = self.searcher.explain(regions, item)
        boxes = None if image_id is None else self.searcher.boxes(image_id)
        return pair_json(explanation, id=item, image_id=image_id, boxes=boxes, picture=None)

    def images(self, offset: int, limit: int) -> tuple[int, list[int], list[str | None] | None]:
        """A page of the image gallery: (its size, the ids from ``offset``, their names or None)."""
        count = self.searcher.sizes()["images"] or 0
        ids = list(range(min(offset, count), min(offset + limit, count)))
        names = self.searcher.labels("text_to_image", np.asarray([ids], np.int64))[0] if ids else []
        return count, ids, None if ids and all(n is None for n in names) else names

    def image_name(self, image_id: int) -> str | None:
        """Image ``image_id``'s name (None without names); a SearchError for an id outside the gallery."""
        image_id = self.searcher.item("images", image_id, "id")
        return self.searcher.labels("text_to_image", np.asarray([[image_id]], np.int64))[0][0]

    def search(self, direction: str, queries: Queries, k: int) -> Hits:
        """The batch's hits, with the seconds of its stages (encode, score, topk, labels)."""
        self.refresh()  # another writer's commit is searched as soon as it is on disk
        stages = Stages()
        scores, ids = self.searcher.search_prepared(queries, k, stages)
        with stages.timed("labels"):
            names = self.searcher.labels(direction, ids)
        return Hits(scores, ids, names, stages.seconds)

    # An append's ids are the last ones of the size the searcher read under the writer lock: new items get
    # the next ids in order, so they are exactly this write's, whoever else writes to the gallery.

    def append_images(self, regions: np.ndarray, names: list[str] | None, key: str | None = None) -> Appended:
        try:
            count = self.searcher.add_images(regions, names, key=key)
        except Repeated as e:
            return Appended(**e.answer, repeated=True)
        return Appended(added=len(regions), first_id=count - len(regions), count=count)

    def append_captions(self, captions: list[str], key: str | None = None) -> Appended:
        try:
            count = self.searcher.add_captions(captions, key=key)
        except Repeated as e:
            return Appended(**e.answer, repeated=True)
        return Appended(added=len(captions), first_id=count - len(captions), count=count)

    def refresh(self) -> None:
        """Swap in what other writers committed (a stat per gallery; a load when one changed): a thread's work,
        never the event loop's."""
        self.searcher.refresh()

    def sizes(self) -> dict[str, int | None]:
        """Gallery sizes: {'images': N or None, 'captions': M or None} (None: no such gallery), as served."""
        return self.searcher.sizes()

    def describe(self) -> dict[str, Any]:
        """Model, backend and galleries, for ``GET /v1/info``."""
        s = self.searcher
        models = [
            {"name": e.manifest.name, "config": e.config.to_dict(), "max_words": e.manifest.max_words}
            for e in s.engines
        ]
        out: dict[str, Any] = {"engine": self.engine_paths[0] if len(s.engines) == 1 else self.engine_paths}
        if len(s.engines) > 1:
            out["ensemble"] = [
                {"engine": p, "weight": float(w), "model": m} for p, w, m in zip(self.engine_paths, s.weights, models)
            ]
        shards = s.shards.info() if s.shards is not None else None
        backends = {shards[0]["backend"]} if shards else {e.options.backend for e in s.engines}
        out.update(
            model=models[0],
            backend=",".join(sorted(backends)),
            precision=self.engine_options.precision,
            device=self.engine_options.device,
            gallery=str(self.folder),
            galleries={kind: self._describe_gallery(kind, shards) for kind in DIRECTIONS.values()},
        )
        if shards is None:
            out["candidates"] = s.options.candidates
            if len(s.engines) > 1:
                out["candidate_source"] = s.options.candidate_source
            return out
        out["ray_address"] = self.ray_address
        out["shards"] = [
            {
                "index": i["index"],
                "node": i["node"],
                "pid": i["pid"],
                "images": i["images"]["size"],
                "captions": i["captions"]["size"],
                "images_offset": i["images"]["offset"],
                "captions_offset": i["captions"]["offset"],
                "folder": i["folder"],
            }
            for i in shards
        ]
        return out

    def _describe_gallery(self, kind: str, shards: list[dict[str, Any]] | None) -> dict[str, Any] | None:
        if shards is not None:
            count = sum(i[kind]["size"] for i in shards)
            return {"count": count, "dtype": shards[-1][kind].get("dtype")} if count else None
        galleries = self.searcher.galleries(kind)
        if galleries is None:
            return None
        g = galleries[0]
        out = {"count": len(g), "dtype": g.dtype.name, "generation": self.searcher.generation(kind)}
        if kind == "images":
            out["names"] = g.names is not None
        return out

    def close(self) -> None:
        self.searcher.close()
        for engine in self.searcher.engines:
            engine.close()
