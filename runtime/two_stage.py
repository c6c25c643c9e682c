"""Two-stage search (docs/two_stage.md), the collaborator a ``Searcher`` hands its candidate generation to.

Each member's candidate index (``runtime/gallery/index.py``) proposes ``M`` gallery items per query; the
searcher scores the *union* of the members' proposals exactly (``candidate_source="union"``: up to
members x M items) or the first member's only (``"first"``: cheaper, lower recall), with ``rescore``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np

from runtime.gallery import CaptionGallery, ImageGallery, centroids
from runtime.gallery.index import CandidateIndex, open_index
from runtime.options import SearchOptions


class TwoStage:
    def __init__(self, options: SearchOptions) -> None:
        self.m, self.neighbors, self.nprobe = options.candidates, options.neighbors, options.nprobe
        self.source = options.candidate_source

    def applies(self, size: int) -> bool:
        # With every item a candidate the exact path runs: identical results on every backend.
        return 0 < self.m < size

    def asked(self, members: int) -> range:
        """The members whose indexes propose."""
        return range(members) if self.source == "union" else range(1)

    @staticmethod
    def index(engine, gallery: ImageGallery | CaptionGallery, kind: str) -> CandidateIndex | None:
        """The gallery's candidate index (None: search this generation exactly; ``open_index`` says why)."""
        m = engine.manifest
        return open_index(gallery, m.image_encoder_id if kind == "images" else m.text_encoder_id)

    def proposals(
        self, index: Callable[[int], CandidateIndex], engines: Sequence, vectors: list[list[np.ndarray]]
    ) -> list[np.ndarray]:
        """Per query, the storage positions (ascending) to score exactly. ``index(i)``: member i's index;
        ``vectors``: per member, per query, the query's vectors in that member's embedding."""
        proposed = [self.propose(index(i), vectors[i], engines[i].config) for i in self.asked(len(engines))]
        return [functools.reduce(np.union1d, [p[q] for p in proposed]) for q in range(len(proposed[0]))]

    def propose(self, index: CandidateIndex, vectors: list[np.ndarray], config) -> list[np.ndarray]:
        """Storage positions (ascending) of the M candidates of each query (its vectors) from one index."""
        # Aggregation over the item's own vectors: every gallery vector's best query vector, from the
        # codebook (runtime/gallery/centroids.py); over the query's vectors: the index's neighbours.
        if centroids.gallery_side(index, config):
            return centroids.propose(index, vectors, config, self.m)
        return index.search(vectors, config, self.m, self.neighbors, self.nprobe)

    @staticmethod
    def rescore(
        engine, gallery, kind: str, positions: np.ndarray, query: dict[str, np.ndarray], block: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of one encoded query (the head's inputs, one row) against the items at ``positions``
        (ascending): (scores (B,), gallery ids (B,))."""
        if kind == "images":
            n = int(query["lengths"][0])
            words, lengths = query["captions"][:, :n], np.asarray([n])
            scores = []
            for a in range(0, len(positions), block):
                pos = positions[a : a + block]
                gram = np.asarray(gallery.image_gram[pos]) if engine.needs_image_gram else None
                scores.append(engine.sims(np.asarray(gallery.images[pos]), gram, words, lengths)[:, 0])
        else:
            # Caption storage is sorted by length, so each run of positions is one padding-free batch.
            image, gram = query["images"], query["image_gram"]
            lengths, offsets = np.asarray(gallery.lengths)[positions], np.asarray(gallery.offsets)
            scores = []
            for run in np.split(np.arange(len(positions)), np.flatnonzero(np.diff(lengths)) + 1):
                length = int(lengths[run[0]]) if len(run) else 0
                for a in range(0, len(run), block):
                    pos = positions[run[a : a + block]]
                    caps = np.asarray(gallery.words[offsets[pos][:, None] + np.arange(length)[None, :]])  # (B, L, d)
                    scores.append(engine.sims(image, gram, caps, np.full(len(pos), length, np.int64))[0])
        out = np.concatenate(scores).astype(np.float32, copy=False) if scores else np.zeros(0, np.float32)
        return out, np.asarray(gallery.ids)[positions]
