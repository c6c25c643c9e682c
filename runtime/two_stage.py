"""Two-stage search (docs/two_stage.md), the collaborator a ``Searcher`` hands its candidate generation to.

Each member's candidate source proposes ``M`` gallery items per query; the searcher scores the *union* of
the members' proposals exactly (``candidate_source="union"``: up to members x M items) or the first
member's only (``"first"``: cheaper, lower recall), with ``rescore``. A source is the member's candidate
index or the dense candidate score (``runtime/gallery/index.py``), whichever the cost model
(``runtime/search_plan.py``) finds cheaper; where neither beats exact search, the search is exact.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from runtime.gallery import CaptionGallery, ImageGallery, centroids
from runtime.gallery.index import (
    DEFAULT_NPROBE,
    CandidateIndex,
    DenseCandidates,
    KeptRows,
    default_neighbors,
    index_description,
    open_index,
)
from runtime.options import SearchOptions
from runtime.search_plan import Costs, Plan, Work, choose, load_costs

logger = logging.getLogger(__name__)


class TwoStage:
    """``costs``: the cost model's constants (default: those measured on this machine, ``load_costs()``)."""

    def __init__(self, options: SearchOptions, costs: Costs | None = None) -> None:
        self.m, self.neighbors, self.nprobe = options.candidates, options.neighbors, options.nprobe
        self.source, self.plan_option = options.candidate_source, options.candidate_plan
        self.costs = costs if costs is not None or self.plan_option != "auto" else load_costs()
        self.plans: dict[str, Plan] = {}  # the last plan of each gallery kind (what a search ran)
        self._told: set[tuple] = set()  # decisions already logged

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

    def plan(self, work: Work, index: dict[str, Any] | None) -> Plan:
        """The search to run for ``work`` (``runtime/search_plan.py``); ``index``: the index's description."""
        neighbors = self.neighbors or default_neighbors(self.m, work.items)
        if self.plan_option != "auto":
            return Plan(self.plan_option, {}, self.m, work.items)
        return choose(self.costs, work, self.m, index, neighbors, self.nprobe or DEFAULT_NPROBE)

    def sources(
        self, engines: Sequence, galleries: Sequence, kind: str, work: Work, once: Callable[[Any, Callable], Any]
    ) -> list[CandidateIndex | DenseCandidates] | None:
        """The proposing members' candidate sources for one search of size ``work``, or None: search exactly
        (the cost model found exact search cheapest, or a member has no index of this generation).
        ``once(key, make)``: the generation's cache (indexes and dense scorers are made once per generation)."""
        asked = self.asked(len(engines))
        plan = self.plan(work, index_description(galleries[0]) if self.plan_option != "dense" else None)
        if plan.kind == "index":
            indexes = [once(("index", kind, i), lambda i=i: self.index(engines[i], galleries[i], kind)) for i in asked]
            if any(index is None for index in indexes):  # open_index said why
                plan = self.plan(work, None) if self.plan_option == "auto" else Plan("exact", {}, self.m, work.items)
            else:
                self._log(kind, plan)
                return indexes
        self._log(kind, plan)
        if plan.kind == "exact":
            return None
        kept = [self.kept(galleries, kind, i, once) for i in asked]  # made first: ``once`` does not nest
        return [once(("dense", kind, i), lambda i=i: DenseCandidates(galleries[i], kept[i])) for i in asked]

    @staticmethod
    def kept(galleries: Sequence, kind: str, i: int, once: Callable[[Any, Callable], Any]) -> KeptRows | None:
        """Member ``i``'s gallery rows in float32 when the gallery is small (``KeptRows.of``), once a generation."""
        return once(("kept", kind, i), lambda: KeptRows.of(galleries[i]))

    def _log(self, kind: str, plan: Plan) -> None:
        self.plans[kind] = plan
        key = (kind, plan.kind, plan.candidates, plan.items)
        if key in self._told:
            return
        self._told.add(key)
        if plan.kind == "exact" and plan.estimates:
            cheapest = min(v for p, v in plan.estimates.items() if p != "exact" and v is not None)
            logger.warning(
                "candidates M=%d would not beat exact search at N=%d %s (estimated %.0f ms vs %.0f ms): "
                "searching exactly",
                plan.candidates,
                plan.items,
                kind,
                cheapest * 1e3,
                plan.estimates["exact"] * 1e3,
            )
        else:
            logger.info("two-stage search of %s, %s", kind, plan.describe())

    @staticmethod
    def work(queries: int, query_vectors: int, gallery, batch: int, members: int, proposing: int) -> Work:
        """The size of one search of ``gallery`` (image or caption cache) for the cost model."""
        if gallery.manifest["kind"] == "images":
            shape = gallery.images.shape
            vectors, dim = int(shape[0] * shape[1]), int(shape[2])
        else:
            vectors, dim = int(gallery.words.shape[0]), int(gallery.words.shape[1])
        return Work(queries, query_vectors, len(gallery), vectors, dim, math.ceil(queries / batch), members, proposing)

    def proposals(
        self, index: Callable[[int], CandidateIndex], engines: Sequence, vectors: list[list[np.ndarray]]
    ) -> list[np.ndarray]:
        """Per query, the storage positions (ascending) to score exactly. ``index(i)``: member i's index;
        ``vectors``: per member, per query, the query's vectors in that member's embedding."""
        proposed = [self.propose(index(i), vectors[i], engines[i].config) for i in self.asked(len(engines))]
        return [functools.reduce(np.union1d, [p[q] for p in proposed]) for q in range(len(proposed[0]))]

    def propose(self, index: CandidateIndex | DenseCandidates, vectors: list[np.ndarray], config) -> list[np.ndarray]:
        """Storage positions (ascending) of the M candidates of each query (its vectors) from one index."""
        # Aggregation over the item's own vectors: every gallery vector's best query vector, from the
        # codebook (runtime/gallery/centroids.py); over the query's vectors: the index's neighbours.
        # The dense score knows every cosine: it needs neither.
        if not isinstance(index, DenseCandidates) and centroids.gallery_side(index, config):
            return centroids.propose(index, vectors, config, self.m)
        return index.search(vectors, config, self.m, self.neighbors, self.nprobe)

    @staticmethod
    def rescore(
        engine,
        gallery,
        kind: str,
        positions: np.ndarray,
        query: dict[str, np.ndarray],
        block: int,
        kept: KeptRows | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of one encoded query (the head's inputs, one row) against the items at ``positions``
        (ascending): (scores (B,), gallery ids (B,)). ``kept``: the gallery's rows in float32, read instead of
        the cache (the same values)."""
        if kind == "images":
            n = int(query["lengths"][0])
            words, lengths = query["captions"][:, :n], np.asarray([n])
            scores = []
            for a in range(0, len(positions), block):
                pos = positions[a : a + block]
                images, grams = (gallery.images, gallery.image_gram) if kept is None else (kept.images, kept.gram)
                gram = np.asarray(grams[pos]) if engine.needs_image_gram else None
                scores.append(engine.sims(np.asarray(images[pos]), gram, words, lengths)[:, 0])
        else:
            # Caption storage is sorted by length, so each run of positions is one padding-free batch.
            image, gram = query["images"], query["image_gram"]
            lengths, offsets = np.asarray(gallery.lengths)[positions], np.asarray(gallery.offsets)
            scores = []
            for run in np.split(np.arange(len(positions)), np.flatnonzero(np.diff(lengths)) + 1):
                length = int(lengths[run[0]]) if len(run) else 0
                for a in range(0, len(run), block):
                    pos = positions[run[a : a + block]]
                    words = gallery.words if kept is None else kept.vectors
                    caps = np.asarray(words[offsets[pos][:, None] + np.arange(length)[None, :]])  # (B, L, d)
                    scores.append(engine.sims(image, gram, caps, np.full(len(pos), length, np.int64))[0])
        out = np.concatenate(scores).astype(np.float32, copy=False) if scores else np.zeros(0, np.float32)
        return out, np.asarray(gallery.ids)[positions]
