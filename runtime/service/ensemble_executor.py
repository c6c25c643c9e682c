"""The service's executor for an ensemble (runtime/ensemble.py): several engines, one gallery folder.

Same contract as ``LocalExecutor`` (runtime/service/executor.py): the batcher calls ``search`` with a
batch of queries, which the ``Ensemble`` scores with every member and averages; appends go through
``runtime/gallery/members.py`` (every member's cache extended, committed together) and then swap the
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
from runtime.gallery import GalleryError, GalleryFolder
from runtime.service.executor import (
    Appended,
    SwappingExecutor,
    append_options,
    appended,
    by_kind,
    check_append_names,
    describe_gallery,
)


class EnsembleExecutor(SwappingExecutor):
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
        self.gallery = GalleryFolder(self.folder, self.engines)
        loaded = self.gallery.load()  # a single model's gallery there is refused, naming the missing members
        self._generation = loaded.generation
        self._searcher = self._new(loaded.images, loaded.captions)
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

    # ------------------------------------------------------------------ appends

    def append_images(self, regions: np.ndarray, names: list[str] | None) -> Appended:
        with self._write:
            old = self._current().images
            check_append_names(old, names)
            written = self.gallery.write_images(regions, names, append_options(old, self.candidates))
            galleries = written.images
            with self._swap:
                self._searcher = self._new(galleries, self._searcher.captions)
                self._generation = written.generation
            return appended(old, galleries)

    def append_captions(self, captions: list[str]) -> Appended:
        with self._write:
            old = self._current().captions
            written = self.gallery.write_captions(captions, append_options(old, self.candidates))
            galleries = written.captions
            with self._swap:
                self._searcher = self._new(self._searcher.images, galleries)
                self._generation = written.generation
            return appended(old, galleries)

    # ------------------------------------------------------------------ description

    def describe(self) -> dict:
        with self._swap:
            e, generation = self._searcher, self._generation
        galleries = {kind: describe_gallery(g, generation) for kind, g in by_kind(e)}
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
