"""The service's executor over a sharded gallery: batches fan out to Ray shard actors (runtime/cluster.py).

``runtime/serve.py --shards S`` serves a folder made by ``runtime/shards.py split`` (or splits an
unsharded ``--gallery`` into S shards beside it on first start). The batcher, limits and responses
are those of the single-node service; a request that meets a dead or restarting shard fails whole with
503 (``ShardUnavailableError``), never with a partial top-k.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runtime.cluster import ShardedSearcher
from runtime.features import check_regions
from runtime.searcher import SearchError
from runtime.service.executor import KINDS, Appended, Hits, check_text_queries


class ShardedExecutor:
    """Implements ``runtime.service.executor.Executor`` with a ``ShardedSearcher``."""

    def __init__(
        self,
        searcher: ShardedSearcher,
        engine_path: str | Path,
        folder: str | Path,
        backend: str,
        precision: str,
        device: str,
        ray_address: str | None,
    ) -> None:
        self.searcher = searcher
        self.engine_path = str(engine_path)
        self.folder = Path(folder)
        self.backend, self.precision, self.device = backend, precision, device
        self.ray_address = ray_address

    @classmethod
    def open(
        cls,
        engine: str | Path,
        shards: str | Path,
        backend: str = "auto",
        precision: str = "fp32",
        device: str = "cpu",
        threads: int | None = None,
        ray_address: str | None = None,
        timeout_s: float = 30.0,
    ) -> ShardedExecutor:
        searcher = ShardedSearcher(
            engine,
            shards,
            address=ray_address,
            timeout_s=timeout_s,
            backend=backend,
            precision=precision,
            device=device,
            threads=threads,
        )
        return cls(searcher, engine, shards, backend, precision, device, ray_address)

    # ------------------------------------------------------------------ validation

    def check_text(self, queries: Sequence[str], field: str = "queries") -> None:
        check_text_queries([self.searcher.tokenizer], queries, field)

    def check_regions(self, regions: np.ndarray) -> np.ndarray:
        return check_regions(regions, self.searcher.config.img_dim, name="queries")

    # ------------------------------------------------------------------ search and appends

    def search(self, kind: str, queries: Sequence[str] | np.ndarray, k: int) -> Hits:
        if kind == "text":
            scores, ids, names = self.searcher.search_text(list(queries), k, labels=True)
        elif kind == "images":
            scores, ids, names = self.searcher.search_images(np.asarray(queries), k, labels=True)
        else:
            raise SearchError(f"kind must be one of {KINDS}, received {kind!r}")
        return Hits(scores, ids, names)

    def append_images(self, regions: np.ndarray, names: list[str] | None) -> Appended:
        before = self.searcher.num_images
        count = self.searcher.add_images(regions, names)
        return Appended(added=count - before, first_id=before, count=count)

    def append_captions(self, captions: list[str]) -> Appended:
        before = self.searcher.num_captions
        count = self.searcher.add_captions(captions)
        return Appended(added=count - before, first_id=before, count=count)

    # ------------------------------------------------------------------ description

    def sizes(self) -> dict[str, int | None]:
        return {"images": self.searcher.num_images or None, "captions": self.searcher.num_captions or None}

    def describe(self) -> dict:
        shards = self.searcher.info()
        galleries = {}
        for kind in ("images", "captions"):
            count = sum(s[kind]["size"] for s in shards)
            galleries[kind] = {"count": count, "dtype": shards[-1][kind].get("dtype")} if count else None
        m = self.searcher.manifest
        return {
            "engine": self.engine_path,
            "model": {"name": m.name, "config": m.config.to_dict(), "max_words": m.max_words},
            "backend": shards[0]["backend"],
            "precision": shards[0]["precision"],
            "device": self.device,
            "gallery": str(self.folder),
            "galleries": galleries,
            "ray_address": self.ray_address,
            "shards": [
                {
                    "index": s["index"],
                    "node": s["node"],
                    "pid": s["pid"],
                    "images": s["images"]["size"],
                    "captions": s["captions"]["size"],
                    "images_offset": s["images"]["offset"],
                    "captions_offset": s["captions"]["offset"],
                    "folder": s["folder"],
                }
                for s in shards
            ],
        }

    def close(self) -> None:
        self.searcher.close()
