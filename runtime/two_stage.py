"""Two-stage search (docs/two_stage.md), the collaborator a ``Searcher`` hands its candidate generation to.

Each member's candidate index (faiss, runtime/candidates.py) proposes ``M`` gallery items per query; the
searcher scores the *union* of the members' proposals exactly (``candidate_source="union"``: up to
members x M items) or the first member's only (``"first"``: cheaper, lower recall), with ``rescore``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np

from runtime.candidates import CandidateIndex, ensure_index, rescore_captions, rescore_images
from runtime.options import SearchOptions


class TwoStage:
    def __init__(self, options: SearchOptions) -> None:
        self.m, self.neighbors, self.nprobe = options.candidates, options.neighbors, options.nprobe
        self.source = options.candidate_source

    def applies(self, size: int) -> bool:
        # With every item a candidate the exact path runs: identical results on every backend.
        return 0 < self.m < size

    def index(self, engine, gallery, kind: str) -> CandidateIndex:
        """The gallery's candidate index (built, or rebuilt with a warning, when missing or stale)."""
        m = engine.manifest
        return ensure_index(gallery, m.image_encoder_id if kind == "images" else m.text_encoder_id)

    def proposals(
        self, index: Callable[[int], CandidateIndex], engines: Sequence, vectors: list[list[np.ndarray]]
    ) -> list[np.ndarray]:
        """Per query, the storage positions (ascending) to score exactly. ``index(i)``: member i's index;
        ``vectors``: per member, per query, the query's vectors in that member's embedding."""
        asked = range(len(engines)) if self.source == "union" else range(1)
        proposed = [index(i).search(vectors[i], engines[i].config, self.m, self.neighbors, self.nprobe) for i in asked]
        return [functools.reduce(np.union1d, [p[q] for p in proposed]) for q in range(len(proposed[0]))]

    @staticmethod
    def rescore(
        engine, gallery, kind: str, positions: np.ndarray, query: dict[str, np.ndarray], block: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of one encoded query (the head's inputs, one row) against the items at ``positions``:
        (scores (B,), gallery ids (B,))."""
        if kind == "images":
            n = int(query["lengths"][0])
            return rescore_images(engine, gallery, positions, query["captions"][:, :n], n, block)
        return rescore_captions(engine, gallery, positions, query["images"], query["image_gram"], block)
