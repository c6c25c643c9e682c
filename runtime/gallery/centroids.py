"""Candidate scores aggregated over the gallery item's own vectors, from a codebook of those vectors.

Two-stage search's candidate score (docs/two_stage.md) is ``C = AGG_g max_q cos(g, q)``, where the
aggregation runs over the *item's* vectors ``g`` whenever the model aggregates over the gallery side: a
``t2i`` model searching captions (each caption word's best region of the query image) and an ``i2t``
model searching images (each image region's best word of the query caption). A nearest-neighbour
lookup from the query's vectors cannot answer this: it finds each query vector's best gallery vectors,
while ``C`` needs *every* gallery vector's best query vector. On the demo's captions a few dozen words
recur in thousands of near-identical vectors, so the neighbours of a region are an arbitrary sample of
one word's occurrences (top-10 overlap with exact 0.18 at M=20).

The exact ``C`` needs one GEMM of the query against every gallery vector: as costly as the exact head's
own GEMM. Instead (PLAID's centroid interaction), each gallery vector is replaced by its codebook
centroid: per query, ``centroids @ query.T`` (K x n_q), each centroid's best query vector (K,), one
gather per gallery vector and the model's aggregation per item give an approximate ``C`` of every item
for the price of reading the codes. The best ``refine * M`` items by that score are then scored with the
exact ``C`` from their own vectors (a GEMM of a few thousand vectors) and the best ``M`` proposed.

The codebook is the IVF index's coarse quantizer and list assignment when the candidate index has one
(nothing to train: it was saved with the index); otherwise (flat and HNSW indexes, small galleries) a
spherical k-means of the gallery's vectors, made once per opened index. Centroids are unit-normalised.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np

from runtime.gallery.index import CandidateIndex, _nlist, _top_items, _unit, import_faiss, item_vectors

logger = logging.getLogger(__name__)

# The approximate score's best refine * M items are scored with the exact candidate score (measured,
# docs/two_stage.md: 50K captions, M=100: the exact-score ceiling is reached from 4 M on).
REFINE = 8
KMEANS_ITERATIONS = 10
KMEANS_POINTS_PER_CENTROID = 64
KMEANS_MIN_POINTS = 39  # faiss's minimum training points per centroid
_CACHE: weakref.WeakKeyDictionary[CandidateIndex, Codebook] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def gallery_side(index: CandidateIndex, config) -> bool:
    """Whether the model aggregates over the gallery item's vectors (this module's case)."""
    return (index.meta["kind"] == "images") == (config.cross_attn == "i2t")


@dataclass(frozen=True)
class Codebook:
    """Each gallery vector's centroid: ``centroids`` (K, d) unit rows, ``codes`` (n_vectors,) the centroid of
    each vector in index vector-id order, where every item's vectors are one run; ``first`` (items,) the
    first vector id of each item id, ``lengths`` (items,) its vector count."""

    centroids: np.ndarray
    codes: np.ndarray
    first: np.ndarray
    lengths: np.ndarray
    source: str

    @classmethod
    def of(cls, index: CandidateIndex) -> Codebook:
        """The index's codebook, made on first use and kept while the index lives."""
        with _LOCK:
            book = _CACHE.get(index)
            if book is None:
                book = _CACHE[index] = cls._make(index)
            return book

    @classmethod
    def _make(cls, index: CandidateIndex) -> Codebook:
        faiss = import_faiss()
        t0 = time.perf_counter()
        lengths = index.layout.lengths_by_id
        first = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        try:
            ivf = faiss.extract_index_ivf(index.index)
        except RuntimeError:  # not an IVF index
            ivf = None
        if ivf is not None:
            centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
            codes = np.empty(index.index.ntotal, np.int32)
            for lst in range(ivf.nlist):
                size = ivf.invlists.list_size(lst)
                if size:
                    codes[faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), size).copy()] = lst
            source = f"ivf ({ivf.nlist} lists)"
        else:
            centroids, codes = _kmeans(faiss, index, int(lengths.sum()))
            source = f"k-means ({len(centroids)} centroids)"
        logger.info("codebook of %s: %s in %.1fs", index.gallery.folder, source, time.perf_counter() - t0)
        return cls(_unit(centroids), codes, first, lengths, source)

    def approximate(self, query: np.ndarray, config) -> np.ndarray:
        """The candidate score of every item id with each gallery vector replaced by its centroid: (items,)."""
        best = (self.centroids @ _unit(query).T).max(axis=1)  # (K,): each centroid's best query vector
        return segment_aggregate(best, self.codes, self.first, self.lengths, config.agg_func, config.lambda_lse)


def segment_aggregate(
    values: np.ndarray,
    take: np.ndarray | None,
    first: np.ndarray,
    lengths: np.ndarray,
    agg_func: str,
    lambda_lse: float,
) -> np.ndarray:
    """SCAN's aggregation of ``values[take]`` (``take`` None: ``values``) over runs starting at ``first``
    (``lengths`` long, none empty, back to back): (runs,). The exponentials of LogSumExp are taken once
    per distinct value, before the gather, in float64 shifted by the largest value (no overflow)."""
    values = np.asarray(values, np.float64)
    if agg_func == "LogSumExp":
        top = float(values.max()) if values.size else 0.0
        e = np.exp(lambda_lse * (values - top))
        total = np.add.reduceat(e if take is None else e[take], first)
        with np.errstate(divide="ignore"):
            return (top + np.log(total) / lambda_lse).astype(np.float32)
    x = values if take is None else values[take]
    if agg_func == "Max":
        return np.maximum.reduceat(x, first).astype(np.float32)
    total = np.add.reduceat(x, first)
    return (total / lengths if agg_func == "Mean" else total).astype(np.float32)


def exact_scores(index: CandidateIndex, ids: np.ndarray, query: np.ndarray, config) -> np.ndarray:
    """The exact candidate score ``AGG_g max_q cos(g, q)`` of the items ``ids`` (ascending): (len(ids),)."""
    lengths = index.layout.lengths_by_id[ids]
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    best = (item_vectors(index.gallery, ids, index.layout) @ _unit(query).T).max(axis=1)  # (vectors,)
    return segment_aggregate(best, None, first, lengths, config.agg_func, config.lambda_lse)


def propose(index: CandidateIndex, queries: list[np.ndarray], config, m: int, refine: int = REFINE) -> list[np.ndarray]:
    """Storage positions (ascending) of the ``m`` best items per query by the candidate score, for a model
    that aggregates over the gallery side: the approximate score's best ``refine * m``, rescored exactly."""
    book = Codebook.of(index)
    n_items = len(book.lengths)
    out = []
    for query in queries:
        approx = book.approximate(query, config)
        short = min(n_items, max(m, refine * m))
        ids = np.sort(np.argpartition(-approx, short - 1)[:short]) if short < n_items else np.arange(n_items)
        out.append(_top_items(exact_scores(index, ids, query, config), ids, m, n_items, index.layout.position_of_id))
    return out


def _kmeans(faiss, index: CandidateIndex, n_vectors: int) -> tuple[np.ndarray, np.ndarray]:
    """A spherical k-means codebook of the gallery's vectors (~2 sqrt(n) centroids) and each vector's code."""
    k = int(min(_nlist(n_vectors), max(1, n_vectors // KMEANS_MIN_POINTS)))
    vectors = item_vectors(index.gallery, np.arange(len(index.layout.lengths_by_id)), index.layout)
    km = faiss.Kmeans(
        vectors.shape[1],
        k,
        niter=KMEANS_ITERATIONS,
        seed=0,
        spherical=True,
        max_points_per_centroid=KMEANS_POINTS_PER_CENTROID,
        verbose=False,
    )
    km.train(vectors)
    _, codes = km.index.search(vectors, 1)
    return km.centroids, codes[:, 0].astype(np.int32)
