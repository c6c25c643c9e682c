"""What executes a batch of searches and the gallery appends: the ``Executor`` interface and its local form.

The batcher and the HTTP layer only see ``Executor``; ``LocalExecutor`` runs everything in this process
with one ``ScanEngine`` and the galleries of one folder (``images/`` and ``captions/``, as
``runtime/search.py`` lays them out). A sharded executor (fan-out to several gallery shards, merge of
their top-k) implements the same methods.

Appends while serving: the gallery cache commits a new generation atomically (``build_*_gallery`` with
``append=True``), then the executor swaps its ``Searcher`` reference under a lock. A search takes the
reference once, at its start, so searches in flight finish on the generation they started with (its
memory maps stay valid after the commit) and every search that starts after an append has returned sees
the appended items.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from runtime.engine import ScanEngine
from runtime.features import check_regions
from runtime.gallery import GalleryError, GalleryFolder, ImageGallery
from runtime.options import WriteOptions
from runtime.searcher import Searcher, SearchError
from runtime.tokenizer import TokenizerError

logger = logging.getLogger(__name__)

KINDS = ("text", "images")  # search directions: text queries -> image gallery, image queries -> caption gallery


@dataclass(frozen=True)
class Hits:
    """Top-k of n queries: faiss's contract plus each hit's label (image name or caption text, or None)."""

    scores: np.ndarray  # (n, k) float32, descending; -inf past the gallery
    ids: np.ndarray  # (n, k) int64; -1 past the gallery
    names: list[list[str | None]]  # (n, k)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def rows(self, start: int, stop: int, k: int) -> Hits:
        """Queries ``start:stop``, cut to their first ``k`` results (a top-k of a larger k is exact for k)."""
        return Hits(self.scores[start:stop, :k], self.ids[start:stop, :k], [r[:k] for r in self.names[start:stop]])


@dataclass(frozen=True)
class Appended:
    added: int
    first_id: int
    count: int  # gallery size after the append


class Executor(Protocol):
    """Runs searches and appends; thread-safe (the batcher may call from several worker threads)."""

    def check_text(self, queries: Sequence[str], field: str = "queries") -> None:
        """Raise ``TokenizerError`` naming the first caption the model cannot take (as ``field[i]``)."""

    def check_regions(self, regions: np.ndarray) -> np.ndarray:
        """Return the query regions as float32 (n, R, img_dim), or raise ``FeatureError``."""

    def search(self, kind: str, queries: Sequence[str] | np.ndarray, k: int) -> Hits:
        """``kind`` 'text': captions against the image gallery; 'images': regions against the caption gallery."""

    def append_images(self, regions: np.ndarray, names: list[str] | None) -> Appended: ...

    def append_captions(self, captions: list[str]) -> Appended: ...

    def sizes(self) -> dict[str, int | None]:
        """Gallery sizes: {'images': N or None, 'captions': M or None} (None: no such gallery)."""

    def describe(self) -> dict:
        """Model, backend and galleries, for ``GET /v1/info``."""

    def close(self) -> None: ...


class SwappingExecutor:
    """What the in-process executors share: a searcher (a ``Searcher``, or an ``Ensemble`` of the members in
    ``engines``) replaced whole by an append under ``_swap``; a search takes the current one."""

    engines: list[ScanEngine]
    _searcher: Any
    _swap: threading.Lock

    def _current(self) -> Any:
        with self._swap:
            return self._searcher

    # ------------------------------------------------------------------ validation

    def check_text(self, queries: Sequence[str], field: str = "queries") -> None:
        check_text_queries([engine.tokenizer for engine in self.engines], queries, field)  # every member, every caption

    def check_regions(self, regions: np.ndarray) -> np.ndarray:
        return check_regions(regions, self.engines[0].config.img_dim, name="queries")  # members agree on img_dim

    # ------------------------------------------------------------------ search

    def search(self, kind: str, queries: Sequence[str] | np.ndarray, k: int) -> Hits:
        return search_hits(self._current(), kind, queries, k)  # one gallery generation for the whole batch

    def sizes(self) -> dict[str, int | None]:
        return {kind: len(_first(g)) if g is not None else None for kind, g in by_kind(self._current())}


class LocalExecutor(SwappingExecutor):
    def __init__(
        self,
        engine: ScanEngine,
        gallery: str | Path,
        engine_path: str | Path | None = None,
        precision: str = "fp32",
        device: str = "cpu",
        candidates: int = 0,
    ) -> None:
        """``candidates``: two-stage search (``Searcher(candidates=M)``, docs/two_stage.md); 0 is exact."""
        self.engine = engine
        self.engines = [engine]
        self.candidates = candidates
        self.precision = precision
        self.folder = Path(gallery)
        self.engine_path = str(engine_path) if engine_path is not None else None
        self.device = device
        if self.folder.exists() and not self.folder.is_dir():
            raise GalleryError(
                f"--gallery {self.folder}: expected a folder (holding images/ and captions/), received a file"
            )
        self.gallery = GalleryFolder(self.folder, engine)
        loaded = self.gallery.load()
        images, captions = (None if g is None else g[0] for g in (loaded.images, loaded.captions))
        self._searcher = Searcher(engine, images=images, captions=captions, candidates=candidates)
        self._swap = threading.Lock()  # guards the searcher reference
        self._write = threading.Lock()  # one append at a time in this process

    @classmethod
    def open(
        cls,
        engine: str | Path,
        gallery: str | Path,
        backend: str = "auto",
        precision: str = "fp32",
        device: str = "cpu",
        threads: int | None = None,
        candidates: int = 0,
    ) -> LocalExecutor:
        scan = ScanEngine.open(engine, backend=backend, precision=precision, device=device, threads=threads)
        try:
            return cls(scan, gallery, engine_path=engine, precision=precision, device=device, candidates=candidates)
        except Exception:
            scan.close()
            raise

    # ------------------------------------------------------------------ appends

    def append_images(self, regions: np.ndarray, names: list[str] | None) -> Appended:
        with self._write:
            old = self._current().images
            check_append_names(old, names)
            gallery = self.gallery.write_images(regions, names, append_options(old, self.candidates)).images[0]
            with self._swap:
                self._searcher = Searcher(
                    self.engine, images=gallery, captions=self._searcher.captions, candidates=self.candidates
                )
            return appended(old, gallery)

    def append_captions(self, captions: list[str]) -> Appended:
        with self._write:
            old = self._current().captions
            gallery = self.gallery.write_captions(captions, append_options(old, self.candidates)).captions[0]
            with self._swap:
                self._searcher = Searcher(
                    self.engine, images=self._searcher.images, captions=gallery, candidates=self.candidates
                )
            return appended(old, gallery)

    # ------------------------------------------------------------------ description

    def describe(self) -> dict:
        s = self._current()
        galleries = {
            kind: describe_gallery(g, g.manifest.get("generation") if g is not None else None) for kind, g in by_kind(s)
        }
        m = self.engine.manifest
        return {
            "engine": self.engine_path,
            "model": {"name": m.name, "config": self.engine.config.to_dict(), "max_words": m.max_words},
            "backend": self.engine.backend_name,
            "precision": self.precision,
            "device": self.device,
            "gallery": str(self.folder),
            "galleries": galleries,
            "candidates": self.candidates,
        }

    def close(self) -> None:
        self.engine.close()


# ---------------------------------------------------------------------------------------------- shared by executors
# A gallery here is one cache (LocalExecutor) or the members' caches, all alike (EnsembleExecutor): the first
# member's names, texts, dtype and size are the ensemble's.


def _first(gallery: Any) -> Any:
    return gallery[0] if isinstance(gallery, (list, tuple)) else gallery


def by_kind(searcher: Any) -> tuple[tuple[str, Any], tuple[str, Any]]:
    return (("images", searcher.images), ("captions", searcher.captions))


def describe_gallery(gallery: Any, generation: int | None) -> dict[str, Any] | None:
    """How ``describe()`` reports a gallery (None: there is none)."""
    if gallery is None:
        return None
    g = _first(gallery)
    out = {"count": len(g), "dtype": g.dtype.name, "generation": generation}
    if isinstance(g, ImageGallery):
        out["names"] = g.names is not None
    return out


def check_text_queries(tokenizers: Sequence[Any], queries: Sequence[str], field: str) -> None:
    """Every tokenizer (an ensemble's members each have one) takes every query; errors name the request's field."""
    try:
        for tokenizer in tokenizers:
            tokenizer.encode_batch(list(queries))
    except TokenizerError as e:  # the tokenizer says captions[i]; the client sent field[i]
        raise TokenizerError(str(e).replace("captions[", f"{field}[", 1)) from e


def search_hits(searcher: Any, kind: str, queries: Sequence[str] | np.ndarray, k: int) -> Hits:
    """``searcher``'s (a Searcher's or an Ensemble's) top-k in direction ``kind``, labelled by names or texts."""
    if kind == "text":
        scores, ids = searcher.search_text(list(queries), k)
        labels = _first(searcher.images).names if searcher.images is not None else None
    elif kind == "images":
        scores, ids = searcher.search_images(np.asarray(queries), k)
        labels = _first(searcher.captions).texts if searcher.captions is not None else None
    else:
        raise SearchError(f"kind must be one of {KINDS}, received {kind!r}")
    return Hits(scores, ids, _labels(ids, labels))


def check_append_names(old: Any, names: list[str] | None) -> None:
    """Images appended to a gallery with names need names, and none to one without."""
    has = old is not None and _first(old).names is not None
    if old is not None and has != (names is not None):
        raise GalleryError(
            f"names: the image gallery {'has' if has else 'has no'} names; "
            f"append {'one name per image' if has else 'without names'}"
        )


def append_options(old: Any, candidates: int) -> WriteOptions:
    """The gallery writers' options for an append through the service."""
    return WriteOptions(
        dtype=_first(old).dtype.name if old is not None else "float32",
        append=True,
        progress=False,
        index="auto" if candidates else None,  # the index follows the append, not the next search
    )


def appended(old: Any, new: Any) -> Appended:
    n_old = len(_first(old)) if old is not None else 0
    return Appended(added=len(_first(new)) - n_old, first_id=n_old, count=len(_first(new)))


def _labels(ids: np.ndarray, labels: list[str] | None) -> list[list[str | None]]:
    if labels is None:
        return [[None] * ids.shape[1] for _ in range(ids.shape[0])]
    return [[labels[i] if i >= 0 else None for i in row] for row in ids.tolist()]
