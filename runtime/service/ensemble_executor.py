"""The service's executor for an ensemble (runtime/ensemble.py): several engines, one gallery folder.

Same contract as ``LocalExecutor`` (runtime/service/executor.py): the batcher calls ``search`` with a
batch of queries, which the ``Ensemble`` scores with every member and averages; appends go through
``runtime/ensemble_gallery.py`` (every member's cache extended, committed together) and then swap the
``Ensemble`` reference under a lock, so searches in flight keep the generation they started with.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runtime.engine import ScanEngine
from runtime.ensemble import Ensemble, check_weights
from runtime.ensemble_gallery import (
    build_member_caption_galleries,
    build_member_image_galleries,
    load_member_galleries,
    read_index,
)
from runtime.features import check_regions
from runtime.gallery import MANIFEST, GalleryError
from runtime.searcher import SearchError
from runtime.service.executor import KINDS, Appended, Hits, _labels
from runtime.tokenizer import TokenizerError


class EnsembleExecutor:
    def __init__(
        self,
        engines: Sequence[ScanEngine],
        gallery: str | Path,
        weights: Sequence[float] | str | None = None,
        engine_paths: Sequence[str | Path] | None = None,
        precision: str = "fp32",
        device: str = "cpu",
        candidates: int = 0,
        candidate_source: str = "union",
    ) -> None:
        """``candidates`` / ``candidate_source``: two-stage search, as ``Ensemble``'s; 0 is exact."""
        self.engines = list(engines)
        self.candidates, self.candidate_source = candidates, candidate_source
        self.weights = check_weights(weights, len(self.engines))
        self.engine_paths = [str(p) for p in engine_paths] if engine_paths is not None else None
        self.precision, self.device = precision, device
        self.folder = Path(gallery)
        if self.folder.exists() and not self.folder.is_dir():
            raise GalleryError(f"--gallery {self.folder}: expected a folder, received a file")
        index = read_index(self.folder) if self.folder.is_dir() else None
        loaded = {}
        for kind in ("images", "captions"):
            # A single model's gallery there is refused by load_member_galleries, naming the missing members.
            if (index or {}).get(kind) is not None or (self.folder / kind / MANIFEST).is_file():
                loaded[kind] = load_member_galleries(self.folder, self.engines, kind)
        self._ensemble = self._new(loaded.get("images"), loaded.get("captions"))
        self._swap = threading.Lock()  # guards the ensemble reference
        self._write = threading.Lock()  # one append at a time in this process

    def _new(self, images, captions) -> Ensemble:
        return Ensemble(
            self.engines,
            images=images,
            captions=captions,
            weights=self.weights,
            candidates=self.candidates,
            candidate_source=self.candidate_source,
        )

    @classmethod
    def open(
        cls,
        engines: Sequence[str | Path],
        gallery: str | Path,
        weights: Sequence[float] | str | None = None,
        backend: str = "auto",
        precision: str = "fp32",
        device: str = "cpu",
        threads: int | None = None,
        candidates: int = 0,
        candidate_source: str = "union",
    ) -> EnsembleExecutor:
        with contextlib.ExitStack() as stack:
            scans = [
                stack.enter_context(
                    ScanEngine.open(p, backend=backend, precision=precision, device=device, threads=threads)
                )
                for p in engines
            ]
            executor = cls(
                scans,
                gallery,
                weights=weights,
                engine_paths=engines,
                precision=precision,
                device=device,
                candidates=candidates,
                candidate_source=candidate_source,
            )
            stack.pop_all()  # the executor owns the engines now
            return executor

    def _current(self) -> Ensemble:
        with self._swap:
            return self._ensemble

    # ------------------------------------------------------------------ validation

    def check_text(self, queries: Sequence[str], field: str = "queries") -> None:
        try:
            for engine in self.engines:  # every member must take every caption
                engine.tokenizer.encode_batch(list(queries))
        except TokenizerError as e:  # the tokenizer says captions[i]; the client sent field[i]
            raise TokenizerError(str(e).replace("captions[", f"{field}[", 1)) from e

    def check_regions(self, regions: np.ndarray) -> np.ndarray:
        return check_regions(regions, self.engines[0].config.img_dim, name="queries")  # members agree on img_dim

    # ------------------------------------------------------------------ search

    def search(self, kind: str, queries: Sequence[str] | np.ndarray, k: int) -> Hits:
        ensemble = self._current()  # one gallery generation for the whole batch
        if kind == "text":
            scores, ids = ensemble.search_text(list(queries), k)
            labels = ensemble.images[0].names if ensemble.images is not None else None
        elif kind == "images":
            scores, ids = ensemble.search_images(np.asarray(queries), k)
            labels = ensemble.captions[0].texts if ensemble.captions is not None else None
        else:
            raise SearchError(f"kind must be one of {KINDS}, received {kind!r}")
        return Hits(scores, ids, _labels(ids, labels))

    # ------------------------------------------------------------------ appends

    def append_images(self, regions: np.ndarray, names: list[str] | None) -> Appended:
        with self._write:
            old = self._current().images
            if old is not None and (old[0].names is None) != (names is None):
                raise GalleryError(
                    f"names: the image gallery {'has' if old[0].names is not None else 'has no'} names; "
                    f"append {'one name per image' if old[0].names is not None else 'without names'}"
                )
            galleries = build_member_image_galleries(
                self.folder,
                self.engines,
                regions,
                names=names,
                dtype=old[0].dtype.name if old is not None else "float32",
                append=True,
                progress=False,
                index="auto" if self.candidates else None,  # the index follows the append, not the next search
            )
            with self._swap:
                self._ensemble = self._new(galleries, self._ensemble.captions)
            n_old = len(old[0]) if old is not None else 0
            return Appended(added=len(galleries[0]) - n_old, first_id=n_old, count=len(galleries[0]))

    def append_captions(self, captions: list[str]) -> Appended:
        with self._write:
            old = self._current().captions
            galleries = build_member_caption_galleries(
                self.folder,
                self.engines,
                captions,
                dtype=old[0].dtype.name if old is not None else "float32",
                append=True,
                progress=False,
                index="auto" if self.candidates else None,
            )
            with self._swap:
                self._ensemble = self._new(self._ensemble.images, galleries)
            n_old = len(old[0]) if old is not None else 0
            return Appended(added=len(galleries[0]) - n_old, first_id=n_old, count=len(galleries[0]))

    # ------------------------------------------------------------------ description

    def sizes(self) -> dict[str, int | None]:
        e = self._current()
        return {
            "images": len(e.images[0]) if e.images is not None else None,
            "captions": len(e.captions[0]) if e.captions is not None else None,
        }

    def describe(self) -> dict:
        e = self._current()
        index = read_index(self.folder) if self.folder.is_dir() else None
        galleries = {}
        for kind, g in (("images", e.images), ("captions", e.captions)):
            galleries[kind] = (
                None
                if g is None
                else {
                    "count": len(g[0]),
                    "dtype": g[0].dtype.name,
                    "generation": (index or {}).get("generation"),
                    **({"names": g[0].names is not None} if kind == "images" else {}),
                }
            )
        members = [
            {
                "engine": None if self.engine_paths is None else self.engine_paths[i],
                "weight": float(w),
                "model": {"name": s.manifest.name, "config": s.config.to_dict(), "max_words": s.manifest.max_words},
            }
            for i, (s, w) in enumerate(zip(self.engines, self.weights))
        ]
        return {
            "engine": self.engine_paths,
            "ensemble": members,
            "model": members[0]["model"],
            "backend": ",".join(sorted({s.backend_name for s in self.engines})),
            "precision": self.precision,
            "device": self.device,
            "gallery": str(self.folder),
            "galleries": galleries,
            "candidates": self.candidates,
            "candidate_source": self.candidate_source,
        }

    def close(self) -> None:
        for engine in self.engines:
            engine.close()
