"""Several SCAN models searched as one: the weighted mean of their similarities (the paper's ensembles).

SCAN's best published results average a t2i and an i2t model's similarities. ``Ensemble`` keeps
``Searcher``'s contract (faiss: float32 ``(n, k)`` scores descending, int64 ids, -1 past the gallery, ties
to the lower id) and its block loop: per gallery block, every member scores the block with its own
encoders, head and gallery cache (``Backend.block_sims``), the scores are averaged with the weights and
merged into one running top-k, so memory stays bounded by the block whatever the gallery's size.

    engines = [ScanEngine.open("t2i/scan.json"), ScanEngine.open("i2t/scan.json")]
    images = GalleryFolder("gal", engines).load().images          # runtime/gallery/folder.py
    with Ensemble(engines, images=images, weights=[0.5, 0.5]) as ensemble:
        scores, ids = ensemble.search(["a dog on the beach"], k=10)

Members must hold the same gallery (same items in the same order): one cache per member, all built
together by ``runtime/gallery/members.py``; ``Ensemble`` checks that they agree.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence

import numpy as np

from runtime.buckets import length_batches
from runtime.engine import ScanEngine
from runtime.gallery import CaptionGallery, GalleryError, ImageGallery
from runtime.gallery.members import check_agreement, member_label
from runtime.searcher import (
    DEFAULT_CAPTION_BLOCK,
    DEFAULT_IMAGE_BLOCK,
    DEFAULT_QUERY_BATCH,
    Searcher,
    SearcherContract,
    SearchError,
)
from runtime.topk import NonFiniteScore, RunningTopK


def check_weights(weights: Sequence[float] | str | None, n: int) -> np.ndarray:
    """One positive, finite weight per member (a sequence, or ``"0.7,0.3"``), normalised to sum to 1.

    None gives equal weights. Normalising makes the ensemble's score a weighted *mean* of the members'
    similarities, so ``[1, 1]`` and ``[0.5, 0.5]`` are the same ensemble (the average ``bench/recall.py``
    computes).
    """
    if weights is None:
        return np.full(n, 1.0 / n)
    if isinstance(weights, str):
        try:
            weights = [float(w) for w in weights.split(",")]
        except ValueError as e:
            raise SearchError(f"weights: expected comma-separated numbers such as 0.5,0.5, received {weights!r}") from e
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError) as e:
        raise SearchError(f"weights: expected numbers, received {weights!r}") from e
    if len(values) != n:
        raise SearchError(f"weights: expected one weight per engine ({n}), received {len(values)} ({values})")
    bad = [w for w in values if not (math.isfinite(w) and w > 0)]
    if bad:
        raise SearchError(f"weights: expected positive finite numbers, received {values}")
    total = math.fsum(values)
    return np.array([w / total for w in values])


# Where a two-stage ensemble search takes its candidates: every member's index (the union of their
# proposals; up to members x M items scored) or the first member's only (M items; cheaper, lower recall).
CANDIDATE_SOURCES = ("union", "first")
# How the errors for a missing gallery say to build one.
_BUILD_IMAGES = "build one with runtime/search.py --engine A --engine B --gallery DIR --images FEATS.npy"
_BUILD_CAPTIONS = "build one with runtime/search.py --engine A --engine B --gallery DIR --captions CAPTIONS.txt"


class Ensemble(SearcherContract):
    """``search(queries, k)`` over several engines, scores the weighted mean of their similarities.

    ``engines``: the members (opened ``ScanEngine``s; the ensemble does not close them). ``images`` /
    ``captions``: one gallery per member, in the members' order (see ``GalleryFolder.load``).
    ``weights``: see :func:`check_weights`. The other arguments are ``Searcher``'s, shared by all members
    (each capped to every member's backend limits, so the members' blocks line up).
    """

    def __init__(
        self,
        engines: Sequence[ScanEngine],
        images: Sequence[ImageGallery] | None = None,
        captions: Sequence[CaptionGallery] | None = None,
        weights: Sequence[float] | str | None = None,
        image_block: int = DEFAULT_IMAGE_BLOCK,
        caption_block: int = DEFAULT_CAPTION_BLOCK,
        query_batch: int = DEFAULT_QUERY_BATCH,
        resident: bool | None = None,
        candidates: int = 0,
        neighbors: int | None = None,
        nprobe: int | None = None,
        candidate_source: str = "union",
    ) -> None:
        engines = list(engines)
        if candidate_source not in CANDIDATE_SOURCES:
            raise SearchError(f"candidate_source must be one of {CANDIDATE_SOURCES}, received {candidate_source!r}")
        self.candidate_source = candidate_source
        if not engines:
            raise SearchError("an ensemble needs at least one engine, received none")
        self.engines = engines
        self.weights = check_weights(weights, len(engines))
        img_dims = {e.config.img_dim for e in engines}
        if len(img_dims) > 1:
            raise SearchError(
                "the ensemble's members take different region features: "
                + ", ".join(f"{member_label(e, i)} img_dim {e.config.img_dim}" for i, e in enumerate(engines))
            )
        for name, v in (("image_block", image_block), ("caption_block", caption_block), ("query_batch", query_batch)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SearchError(f"{name} must be a positive integer, received {v!r}")
        # Every member scores the same blocks: cap the sizes to the smallest of the backends' limits.
        for e in engines:
            limits = e.head.limits
            image_block = min(image_block, limits.get("images", image_block))
            caption_block = min(caption_block, limits.get("captions", caption_block))
            query_batch = min(query_batch, limits.get("images", query_batch), limits.get("captions", query_batch))
        self.images = _one_per_member(images, engines, "images")
        self.captions = _one_per_member(captions, engines, "captions")
        if self.images is not None:
            check_agreement(self.images, engines, "images")
        if self.captions is not None:
            check_agreement(self.captions, engines, "captions")
        self.members = [
            Searcher(
                e,
                images=None if self.images is None else self.images[i],
                captions=None if self.captions is None else self.captions[i],
                image_block=image_block,
                caption_block=caption_block,
                query_batch=query_batch,
                resident=resident,
                candidates=candidates,
                neighbors=neighbors,
                nprobe=nprobe,
            )
            for i, e in enumerate(engines)
        ]
        self.query_batch = query_batch
        self.candidates = self.members[0].candidates  # validated by Searcher
        self.neighbors, self.nprobe = neighbors, nprobe

    def close(self) -> None:
        """Free the galleries the members uploaded to their backends, if any."""
        for m in self.members:
            m.close()

    # ------------------------------------------------------------------ public

    def search_text(self, captions: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        k = self._check_text_search(k, captions, self.images is not None, _BUILD_IMAGES)
        # Each member tokenises with its own vocabulary (all validate every query before any scoring).
        tokens = [m.engine.tokenizer.encode_batch(list(captions)) for m in self.members]
        scores = np.empty((len(captions), k), np.float32)
        out_ids = np.empty((len(captions), k), np.int64)
        first_lengths = tokens[0][1]
        # Batches of similar length by the first member's tokenisation (the members' lengths agree unless
        # their max_words differ); every member pads a batch to its own longest caption.
        for idx in length_batches(first_lengths, self.query_batch):
            queries = []
            for m, (ids, lengths) in zip(self.members, tokens):
                width = int(lengths[idx].max())
                words = m.engine.encode_ids(ids[idx, :width], lengths[idx])  # (q, L, d)
                queries.append({"captions": words, "lengths": lengths[idx]})
            if self._two_stage("images"):
                scores[idx], out_ids[idx] = self._two_stage_text(queries, k)
            else:
                scores[idx], out_ids[idx] = self._score("images", self.images[0].ids, queries, len(idx), k, axis=0)
        return scores, out_ids

    def search_images(self, regions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = self._check_image_search(k, self.captions is not None, _BUILD_CAPTIONS)
        encoded = [m.engine.encode_images(regions, name="query regions") for m in self.members]
        n = len(encoded[0][0])
        scores = np.empty((n, k), np.float32)
        out_ids = np.empty((n, k), np.int64)
        for a in range(0, n, self.query_batch):
            sl = slice(a, a + self.query_batch)
            queries = []
            for m, (images, gram) in zip(self.members, encoded):
                query = {"images": images[sl]}
                if m.engine.needs_image_gram:
                    query["image_gram"] = gram[sl]
                queries.append(query)
            if self._two_stage("captions"):
                pairs = [(images[sl], gram[sl]) for images, gram in encoded]
                scores[sl], out_ids[sl] = self._two_stage_images(pairs, k)
            else:
                q = min(self.query_batch, n - a)
                scores[sl], out_ids[sl] = self._score("captions", self.captions[0].ids, queries, q, k, axis=1)
        return scores, out_ids

    # ------------------------------------------------------------------ scoring

    def _score(
        self, kind: str, gallery_ids: np.ndarray, queries: list[dict[str, np.ndarray]], n: int, k: int, axis: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Searcher's loop with the block's scores averaged over the members before the top-k."""
        ids = np.asarray(gallery_ids)
        top = RunningTopK(n, k, len(ids))
        try:
            for offset, scores in self._block_scores(kind, queries, axis):
                top.add_block(scores, ids[offset : offset + scores.shape[1]])
        except NonFiniteScore as e:  # never a silent drop: name the item
            raise self._corrupted(kind, e) from e
        return top.result()

    def _corrupted(self, kind: str, e: NonFiniteScore) -> SearchError:
        gallery = (self.images if kind == "images" else self.captions)[0]
        return SearchError(
            f"{gallery.label(e.item_id)} scored {e.value} in the ensemble: a member's cached arrays are "
            f"corrupted; check the gallery with runtime/search.py --verify and rebuild it"
        )

    def _block_scores(
        self, kind: str, queries: list[dict[str, np.ndarray]], axis: int
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(offset, weighted mean scores (q, rows))`` over the gallery, in order.

        The members' blocks usually line up (same block sizes); where a backend blocks its resident copy
        otherwise (CuPy merges blocks on the GPU), each step takes the rows every member has scored and
        keeps the rest of a longer block for the next, so memory stays bounded by the largest block.
        """
        streams = [m.engine.head.block_sims(m._gallery(kind), q, axis) for m, q in zip(self.members, queries)]
        weights = self.weights.astype(np.float32)
        pending: list[tuple[int, np.ndarray] | None] = [None] * len(streams)  # (offset, scores) not yet used
        position = 0
        while True:
            for i, stream in enumerate(streams):
                if pending[i] is None:
                    pending[i] = next(stream, None)
            if all(b is None for b in pending):
                return
            if any(b is None or b[0] != position for b in pending):
                raise GalleryError(
                    f"the ensemble's {kind} galleries do not cover the same rows: at row {position}, the members' "
                    f"next blocks start at {[None if b is None else b[0] for b in pending]}"
                )
            stop = min(offset + scores.shape[1] for offset, scores in pending)
            total = None
            for i, (w, (offset, scores)) in enumerate(zip(weights, pending)):
                part = scores[:, position - offset : stop - offset]
                total = w * part if total is None else total + w * part
                pending[i] = (stop, scores[:, stop - offset :]) if offset + scores.shape[1] > stop else None
            yield position, total
            position = stop

    # ------------------------------------------------------------------ two-stage (runtime/candidates.py)

    def _two_stage(self, kind: str) -> bool:
        # With every item a candidate the exact path runs (identical results), as in Searcher; and without
        # an index of this generation for a member that proposes.
        sources = self.members if self.candidate_source == "union" else self.members[:1]
        gallery = (self.images if kind == "images" else self.captions)[0]
        return 0 < self.candidates < len(gallery) and all(m.candidate_index(kind) is not None for m in sources)

    def _proposals(self, kind: str, vectors: list[list[np.ndarray]]) -> list[np.ndarray]:
        """Per query, the storage positions (ascending) to score exactly: the union of every member's
        ``candidates`` proposals (``candidate_source="union"``) or the first member's (``"first"``).
        ``vectors``: per member, per query, the query's vectors in that member's embedding."""
        sources = self.members if self.candidate_source == "union" else self.members[:1]
        proposed = [
            m.candidate_index(kind).search(v, m.engine.config, self.candidates, self.neighbors, self.nprobe)
            for m, v in zip(sources, vectors)
        ]
        return [functools.reduce(np.union1d, [p[q] for p in proposed]) for q in range(len(proposed[0]))]

    def _two_stage_text(self, queries: list[dict[str, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
        from runtime.candidates import rescore_images

        vectors = [[w[:n] for w, n in zip(q["captions"], q["lengths"])] for q in queries]
        out = []
        for i, positions in enumerate(self._proposals("images", vectors)):
            total = ids = None
            for w, m, q in zip(self.weights.astype(np.float32), self.members, queries):
                n = int(q["lengths"][i])
                s, ids = rescore_images(m.engine, m.images, positions, q["captions"][i : i + 1, :n], n, m.image_block)
                total = w * s if total is None else total + w * s
            out.append(self._top_of("images", total, ids, k))
        return np.concatenate([t[0] for t in out]), np.concatenate([t[1] for t in out])

    def _two_stage_images(self, pairs: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
        """``pairs``: per member, the query images' (embeddings (q, R, d), Gram matrices (q, R, R))."""
        from runtime.candidates import rescore_captions

        out = []
        for i, positions in enumerate(self._proposals("captions", [list(images) for images, _ in pairs])):
            total = ids = None
            for w, m, (images, gram) in zip(self.weights.astype(np.float32), self.members, pairs):
                s, ids = rescore_captions(
                    m.engine, m.captions, positions, images[i : i + 1], gram[i : i + 1], m.caption_block
                )
                total = w * s if total is None else total + w * s
            out.append(self._top_of("captions", total, ids, k))
        return np.concatenate([t[0] for t in out]), np.concatenate([t[1] for t in out])

    def _top_of(self, kind: str, scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(1, k) top-k of one query's rescored candidates, in the contract of the exact path."""
        gallery = (self.images if kind == "images" else self.captions)[0]
        order = np.argsort(ids, kind="stable")
        top = RunningTopK(1, k, len(gallery))
        try:
            top.add_block(scores[order][None, :], ids[order])
        except NonFiniteScore as e:
            raise self._corrupted(kind, e) from e
        return top.result()


def _one_per_member(galleries, engines: list[ScanEngine], kind: str):
    if galleries is None:
        return None
    galleries = list(galleries)
    if len(galleries) != len(engines):
        raise SearchError(f"{kind}: expected one gallery per engine ({len(engines)}), received {len(galleries)}")
    for i, (g, e) in enumerate(zip(galleries, engines)):
        key, want = (
            ("image_encoder_id", e.manifest.image_encoder_id)
            if kind == "images"
            else ("text_encoder_id", e.manifest.text_encoder_id)
        )
        have = g.manifest.get(key)
        if have is not None and have != want:
            raise GalleryError(
                f"{kind} gallery {g.folder} for {member_label(e, i)} was built by another model "
                f"({key} {str(have)[:12]}, the engine's is {want[:12]})"
            )
    return galleries
