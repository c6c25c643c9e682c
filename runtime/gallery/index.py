"""Candidate generation for two-stage search: a faiss index over a gallery's vectors, and a cheap score.

Exact SCAN search reads every cached region (or word) of the gallery for every query. Two-stage
search finds ``M`` candidates with an approximate nearest-neighbour index over the gallery's
*vectors* (image gallery: every region embedding; caption gallery: every word embedding), scores
them with a cheap stand-in for SCAN's similarity, and the Searcher rescores only those ``M`` exactly.

The candidate score is SCAN's similarity with the attention taken to its hard limit: each item of the
attention's query side (words for a ``t2i`` model, regions for ``i2t``) attends to its single most
similar item of the context side, whose cosine is then aggregated with the model's own ``agg_func``
(LogSumExp with ``lambda_lse``, Mean, Max, Sum). Which side is which follows the *model*
(``cross_attn``), not the search direction. docs/two_stage.md gives the reasoning.

With an index, only the ``neighbors`` nearest gallery vectors of each query vector are known; a
missing cosine is filled with that query vector's farthest retrieved cosine (for an exact index an
upper bound on the missing one). Items no query vector reached all get the same score and are only
used, in id order, when fewer than ``M`` items were reached.

The index lives in the gallery folder (``candidates.json`` + ``candidates.<generation>.faiss``),
bound to the encoder and the generation of the gallery it indexes. Only the write path writes it
(``update_index``: after the gallery's commit, under its writer lock; extended on append); a reader
(``open_index``) never does, so a search still on an older generation cannot overwrite a newer index.
Vector ids in the index are insertion order: image ``i`` region ``r`` is
``i * R + r``; a caption's words follow the captions in id order (the cache stores captions sorted by
length, so the index does not follow storage order).

faiss is an optional dependency (``pip install 'scan-runtime[scale]'``), imported only here, lazily.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime import atomic
from runtime.backends.convert import cast
from runtime.gallery.store import GalleryError, MappedGallery
from runtime.install import install_command
from runtime.options import INDEX_KINDS

logger = logging.getLogger(__name__)

FORMAT = "scan-candidates/1"
META = "candidates.json"
# auto: an exact index while a query vector's brute-force scan stays cheap, then IVF with 8-bit
# scalar-quantised vectors (a quarter of float32), then IVF-PQ (tens of bytes a vector) for the largest.
# Above 2^16 vectors IVF-SQ pays at query time (5K images = 180K vectors: a batch of 200 captions'
# whole process 1.2-1.3x faster than with a flat index, same top-10; docs/two_stage.md) and its build
# takes seconds (2.9 s at 180K), so auto switches there, not at FLAT_MAX_VECTORS.
AUTO_FLAT_MAX_VECTORS = 1 << 16
# Largest gallery a reader builds a flat index for in memory (open_index) and keeps as float32 (KeptRows).
FLAT_MAX_VECTORS = 1 << 18
IVFSQ_MAX_VECTORS = 1 << 23
MAX_NLIST = 4096
DEFAULT_NPROBE = 16
# Retrieval depth per query vector (default_neighbors), in candidates: what the exact top-10 needs in
# practice (measured, docs/two_stage.md: recall follows the depth far more than nprobe) ...
NEIGHBORS_PER_CANDIDATE = 8
# ... and in gallery items: how many gallery vectors resemble a query word grows with the gallery, not with
# M. 1M demo images, M=1000: 8000 neighbours (8 M) gave top-10 overlap 0.64, 24000 gave 0.97 (docs/scale.md).
ITEMS_PER_NEIGHBOR = 40
# Cosines (query vectors x gallery vectors) a block of the dense candidate score holds: 32 MB of float32.
BLOCK_COSINES = 1 << 23
# Float32 gallery vectors two-stage search keeps in memory (KeptRows): what a flat index would hold.
KEEP_BYTES = FLAT_MAX_VECTORS * 128 * 4
# Results (query vectors x neighbours) below which the index search runs on one thread: 256 query
# vectors at the fewest neighbours (256), as before; one caption at 1M images (10 x 24K) is above it.
SMALL_SEARCH = 256 * 256
_ADD_CHUNK = 1 << 18
_OMP_THREADS: list[int] = []  # faiss's own default thread count, read at first import


def default_neighbors(m: int, items: int) -> int:
    """Gallery vectors an index search retrieves per query vector for ``m`` candidates of ``items`` items."""
    return max(256, NEIGHBORS_PER_CANDIDATE * m, items // ITEMS_PER_NEIGHBOR)


class CandidateIndexError(GalleryError):
    """The candidate index is missing, corrupted, or cannot be built."""


class StaleIndexError(CandidateIndexError):
    """The candidate index was built for another model or another state of the gallery."""


def import_faiss():
    try:
        import faiss
    except ImportError as e:
        raise CandidateIndexError(
            f"two-stage search (--candidates) needs faiss: {install_command('scale')} (or pip install faiss-cpu)"
        ) from e
    if not _OMP_THREADS:
        _OMP_THREADS.append(faiss.omp_get_max_threads())
    return faiss


# ---------------------------------------------------------------------------------------------- vectors


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def _encoder_key(gallery: MappedGallery) -> tuple[str, str]:
    """The gallery's kind and the manifest key of the encoder it is bound to."""
    if gallery.manifest["kind"] == "images":
        return "images", "image_encoder_id"
    return "captions", "text_encoder_id"


@dataclass(frozen=True)
class _Layout:
    """Maps index vector ids to gallery items (storage positions) and back."""

    owner_id: np.ndarray | None  # captions: item id of each vector (insertion order); images: None (v // R)
    first: np.ndarray | None  # captions: first vector id of each item id
    lengths_by_id: np.ndarray  # vectors per item id
    position_of_id: np.ndarray  # storage position of each item id
    regions: int  # images: R; captions: 0

    @classmethod
    def of(cls, gallery: MappedGallery) -> _Layout:
        ids = np.asarray(gallery.ids, np.int64)
        position_of_id = np.empty(len(ids), np.int64)
        position_of_id[ids] = np.arange(len(ids))
        if gallery.manifest["kind"] == "images":
            r = int(gallery.images.shape[1])
            return cls(None, None, np.full(len(ids), r, np.int64), position_of_id, r)
        lengths_by_id = np.asarray(gallery.lengths, np.int64)[position_of_id]
        first = np.concatenate([[0], np.cumsum(lengths_by_id)[:-1]]).astype(np.int64)
        owner = np.repeat(np.arange(len(ids), dtype=np.int64), lengths_by_id)
        return cls(owner, first, lengths_by_id, position_of_id, 0)

    def owner(self, v: np.ndarray) -> np.ndarray:
        return v // self.regions if self.regions else self.owner_id[v]

    def slot(self, v: np.ndarray, item: np.ndarray) -> np.ndarray:
        return v % self.regions if self.regions else v - self.first[item]


def item_vectors(gallery: MappedGallery, ids: np.ndarray, layout: _Layout | None = None) -> np.ndarray:
    """Unit-norm float32 vectors of the items ``ids`` (ascending), in index (insertion) order."""
    ids = np.asarray(ids, np.int64)
    if gallery.manifest["kind"] == "images":  # image ids are storage positions
        block = np.asarray(
            gallery.images[ids[0] : ids[-1] + 1]
            if len(ids) and ids[-1] - ids[0] + 1 == len(ids)
            else gallery.images[ids],
            np.float32,
        )  # (n, R, d)
        return _unit(block.reshape(-1, block.shape[-1]))
    layout = layout or _Layout.of(gallery)
    pos = layout.position_of_id[ids]
    starts = np.asarray(gallery.offsets)[pos]
    lengths = np.asarray(gallery.lengths)[pos]
    rows = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(lengths.sum())
    return _unit(np.asarray(gallery.words[rows], np.float32))


# ---------------------------------------------------------------------------------------------- index


def choose_type(n_vectors: int, index_type: str = "auto") -> str:
    if index_type not in INDEX_KINDS:
        raise CandidateIndexError(f"index type must be one of {INDEX_KINDS}, received {index_type!r}")
    if index_type != "auto":
        return index_type
    if n_vectors <= AUTO_FLAT_MAX_VECTORS:
        return "flat"
    return "ivfsq" if n_vectors <= IVFSQ_MAX_VECTORS else "ivfpq"


def _nlist(n_vectors: int) -> int:
    # ~2 sqrt(n) lists (a power of two) so a probe scans ~nprobe/nlist of the vectors, at most 4096:
    # k-means on ~64 points a list costs ~nlist^2, and more lists would not pay on a CPU.
    return int(min(MAX_NLIST, max(16, 1 << round(math.log2(max(2.0 * math.sqrt(n_vectors), 1.0))))))


def _new_index(faiss, index_type: str, d: int, n_vectors: int) -> tuple[Any, dict[str, Any]]:
    ip = faiss.METRIC_INNER_PRODUCT
    if index_type == "flat":
        return faiss.IndexFlatIP(d), {"kind": index_type}
    if index_type == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, ip)
        index.hnsw.efConstruction = 80
        return index, {"kind": index_type, "M": 32}
    nlist = _nlist(n_vectors)
    # For the largest galleries an exact coarse quantizer makes adding vectors cost n * nlist * d:
    # assign with an HNSW over the centroids instead.
    quantizer = faiss.IndexFlatIP(d) if n_vectors <= IVFSQ_MAX_VECTORS else faiss.IndexHNSWFlat(d, 32, ip)
    if index_type == "ivf":
        index = faiss.IndexIVFFlat(quantizer, d, nlist, ip)
    elif index_type == "ivfsq":
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit, ip)
    else:  # ivfpq: 8-bit codes over d/4 subspaces (32 bytes a vector at d=128)
        m = next(m for m in (d // 4, d // 8, d // 2, d) if m >= 1 and d % m == 0)
        index = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8, ip)
    index.own_fields = True
    quantizer.this.disown()
    index.cp.niter = 10  # a coarse quantizer needs no more; 25 (faiss's default) is 2.5x the training time
    index.cp.max_points_per_centroid = 64
    return index, {"kind": index_type, "nlist": nlist}


class CandidateIndex:
    """A loaded (or freshly built) candidate index of one gallery."""

    def __init__(self, gallery: MappedGallery, index: Any, meta: dict[str, Any]) -> None:
        self.gallery = gallery
        self.index = index
        self.meta = meta
        self.layout = _Layout.of(gallery)

    @property
    def index_type(self) -> str:
        return str(self.meta["index"]["kind"])

    def __len__(self) -> int:
        return len(self.gallery)

    def search(
        self, queries: list[np.ndarray], config, m: int, neighbors: int | None = None, nprobe: int | None = None
    ) -> list[np.ndarray]:
        """Storage positions (ascending) of up to ``m`` candidates for each query.

        ``queries``: per query, its vectors (n_q, d) (a caption's valid words or an image's regions).
        ``config``: the model's SCANConfig (``cross_attn``, ``agg_func``, ``lambda_lse``).
        ``neighbors``: gallery vectors retrieved per query vector (default ``default_neighbors``).
        """
        faiss = import_faiss()
        n_items = len(self.gallery)
        k = int(min(self.index.ntotal, neighbors or default_neighbors(m, n_items)))
        # Per-call parameters, not index fields: several threads may search one index at once.
        if hasattr(self.index, "nprobe"):
            params = faiss.SearchParametersIVF(nprobe=int(min(nprobe or DEFAULT_NPROBE, self.index.nlist)))
        elif isinstance(self.index, faiss.IndexHNSW):
            params = faiss.SearchParametersHNSW(efSearch=max(k, 64))
        else:
            params = None
        sizes = [len(q) for q in queries]
        stacked = _unit(np.concatenate(queries)) if queries else np.zeros((0, self.index.d), np.float32)
        # Little work is not worth sharing: OpenMP threads then cost more than they give (a caption's
        # search at 10K images was 3-4x slower with 2 threads on a busy 2-core machine). Much work is: one
        # caption at 1M images, 24K neighbours a word, took 77 ms on one thread and 48 ms on two (quiet
        # 2-core machine, IVF-PQ). Process-wide setting.
        faiss.omp_set_num_threads(1 if len(stacked) * k < SMALL_SEARCH else _OMP_THREADS[0])
        dist, vid = self.index.search(stacked, k, params=params)  # (sum n_q, k), each row descending
        gallery_side = (self.meta["kind"] == "images") == (config.cross_attn == "i2t")
        out = []
        row = 0
        for n in sizes:
            d, v = dist[row : row + n], vid[row : row + n]
            row += n
            scores, items = self._score(d, v, config, gallery_side)
            out.append(_top_items(scores, items, m, n_items, self.layout.position_of_id))
        return out

    def _score(self, dist: np.ndarray, vid: np.ndarray, config, gallery_side: bool) -> tuple[np.ndarray, np.ndarray]:
        """Candidate scores of the items some query vector reached: (scores, item ids)."""
        n_q, k = dist.shape
        valid = vid >= 0
        # The farthest retrieved cosine of each query vector stands in for the ones it did not retrieve.
        last = np.where(valid.any(axis=1), np.where(valid, dist, np.inf).min(axis=1), -1.0).astype(np.float32)
        a = np.broadcast_to(np.arange(n_q)[:, None], (n_q, k))[valid]
        v, c = vid[valid], dist[valid]
        item = self.layout.owner(v)
        items, u = _unique_ids(item, len(self.layout.lengths_by_id))
        if not gallery_side:
            # Aggregate over the query's vectors: best cosine of query vector a within each item.
            mat = np.repeat(last[None, :], len(items), axis=0)  # (items, n_q)
            # Each query vector's row comes back from faiss in descending order, so its first cosine in an
            # item is its best there: assigned in reverse order, the last write to (item, a) is that one
            # (numpy assigns repeated indices in order; copies, since a reversed view's iteration may be
            # flipped back to memory order). np.maximum.at did the same at 10% of a 1M search.
            back = slice(None, None, -1)
            mat[np.ascontiguousarray(u[back]), np.ascontiguousarray(a[back])] = np.ascontiguousarray(c[back])
            valid_cols = None
        else:
            # Aggregate over the item's own vectors: each one's best cosine over the query's vectors.
            lengths = self.layout.lengths_by_id[items]
            width = int(lengths.max()) if len(items) else 0
            mat = np.full((len(items), width), last.max() if n_q else -1.0, np.float32)
            np.maximum.at(mat, (u, self.layout.slot(v, item)), c)
            valid_cols = np.arange(width)[None, :] < lengths[:, None]
        return aggregate(mat, valid_cols, config.agg_func, config.lambda_lse), items


def _unique_ids(ids: np.ndarray, n_ids: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(ids, return_inverse=True)`` for ids in ``[0, n_ids)``, without sorting: a mark per id,
    then each id's rank among the marked ones (O(len(ids) + n_ids); np.unique's sort was half the score)."""
    seen = np.zeros(n_ids, bool)
    seen[ids] = True
    rank = np.cumsum(seen, dtype=np.int64) - 1
    return np.flatnonzero(seen), rank[ids]


class KeptRows:
    """A small gallery's stored rows as float32, kept in memory: the dense score and the rerank read them
    instead of converting the cache's (float16) rows again for every query batch and every query (the
    conversion and the scattered reads were half of a rerank's time). ``of`` keeps none for a gallery whose
    float32 vectors would take more than ``KEEP_BYTES`` (a flat index's worth of memory)."""

    def __init__(self, gallery: MappedGallery) -> None:
        # cast: float16 widened bit-exactly at twice numpy's speed (a tenth of a 5K-image two-stage process)
        if gallery.manifest["kind"] == "images":
            self.images = cast(np.asarray(gallery.images), np.float32)  # (N, R, d): the stored values, exactly
            self.gram = None if gallery.image_gram is None else cast(np.asarray(gallery.image_gram), np.float32)
            self.vectors = self.images.reshape(-1, self.images.shape[-1])
        else:
            self.images = self.gram = None
            self.vectors = cast(np.asarray(gallery.words), np.float32)  # (W, d)
        self.inverse_norms = _inverse_norms(self.vectors)

    @classmethod
    def of(cls, gallery: MappedGallery) -> KeptRows | None:
        d = int(gallery.images.shape[2] if gallery.manifest["kind"] == "images" else gallery.words.shape[1])
        return cls(gallery) if _vector_count(gallery) * d * 4 <= KEEP_BYTES else None


def _inverse_norms(x: np.ndarray) -> np.ndarray:
    return (1.0 / np.maximum(np.sqrt(np.einsum("ij,ij->i", x, x)), 1e-8)).astype(np.float32)


class DenseCandidates:
    """The candidate score with every cosine known, computed as one GEMM per block of the gallery: what a
    flat index asked for every neighbour gives (the same candidates; scores equal up to float rounding), at
    the cost of a dense MaxSim and without an index. ``search`` and ``index_type`` as ``CandidateIndex``'s.

    The gallery is read block by block in its stored dtype (float16 rows become float32 rows for the GEMM,
    whose cosines are then scaled by the rows' inverse norms), so memory stays bounded by ``BLOCK_COSINES``
    cosines a block; ``kept``: the gallery's rows already in float32 (``KeptRows``), read instead.
    """

    index_type = "dense"

    def __init__(self, gallery: MappedGallery, kept: KeptRows | None = None) -> None:
        self.gallery = gallery
        self.layout = _Layout.of(gallery)
        self.images = gallery.manifest["kind"] == "images"
        self.kept = kept

    def __len__(self) -> int:
        return len(self.gallery)

    def _vectors(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Float32 vectors of the items at storage positions ``a..b`` (storage order) and their inverse norms."""
        g = self.gallery
        per = int(g.images.shape[1]) if self.images else 1
        lo, hi = (a * per, b * per) if self.images else (int(g.offsets[a]), int(g.offsets[b]))
        if self.kept is not None:
            return self.kept.vectors[lo:hi], self.kept.inverse_norms[lo:hi]
        rows = g.images[a:b] if self.images else g.words[lo:hi]
        x = np.asarray(rows, np.float32).reshape(-1, rows.shape[-1])  # the stored dtype, converted once
        return x, _inverse_norms(x)

    def search(
        self, queries: list[np.ndarray], config, m: int, neighbors: int | None = None, nprobe: int | None = None
    ) -> list[np.ndarray]:
        """As ``CandidateIndex.search`` with every neighbour (``neighbors`` and ``nprobe`` do not apply)."""
        g, n_items = self.gallery, len(self.gallery)
        gallery_side = self.images == (config.cross_attn == "i2t")
        rows = np.concatenate([[0], np.cumsum([len(q) for q in queries])]).astype(np.int64)
        stacked = _unit(np.concatenate(queries)) if len(queries) else np.zeros((0, 1), np.float32)
        scores = np.empty((len(queries), n_items), np.float32)  # by storage position
        per_item = int(g.images.shape[1]) if self.images else max(1, int(np.asarray(g.lengths).max(initial=1)))
        step = max(1, BLOCK_COSINES // max(1, len(stacked) * per_item))
        for a in range(0, n_items, step):
            b = min(a + step, n_items)
            vectors, inverse_norms = self._vectors(a, b)
            cos = vectors @ stacked.T  # (block vectors, query vectors): each vector's cosines contiguous
            cos *= inverse_norms[:, None]
            scores[:, a:b] = self._block_scores(cos, rows, a, b, gallery_side, config)
        by_id = scores[:, self.layout.position_of_id]
        every = np.arange(n_items, dtype=np.int64)
        return [_top_items(s, every, m, n_items, self.layout.position_of_id) for s in by_id]

    def _block_scores(
        self, cos: np.ndarray, rows: np.ndarray, a: int, b: int, gallery_side: bool, config
    ) -> np.ndarray:
        """Every query's candidate scores (Q, b - a) of the items at storage positions ``a..b``, from the
        cosines of their vectors with the query vectors (query ``q``'s are columns ``rows[q]..rows[q+1]``)."""
        g, n = self.gallery, b - a
        agg = lambda mat, valid=None: aggregate(mat, valid, config.agg_func, config.lambda_lse)  # noqa: E731
        out = np.empty((len(rows) - 1, n), np.float32)
        if self.images:
            cos = cos.reshape(n, -1, cos.shape[-1])  # (B, R, query vectors)
            if not gallery_side:  # each query vector's best region of each image
                best = cos.max(axis=1)  # (B, query vectors)
                for q in range(len(out)):
                    out[q] = agg(best[:, rows[q] : rows[q + 1]])
            else:  # each region's best vector of each query
                for q in range(len(out)):
                    out[q] = agg(cos[:, :, rows[q] : rows[q + 1]].max(axis=2))
            return out
        lengths = np.asarray(g.lengths[a:b], np.int64)
        starts = np.asarray(g.offsets[a:b], np.int64) - int(g.offsets[a])
        if not gallery_side:  # each query vector's best word of each caption (captions are never empty)
            best = np.maximum.reduceat(cos, starts, axis=0)  # (B, query vectors)
            for q in range(len(out)):
                out[q] = agg(best[:, rows[q] : rows[q + 1]])
            return out
        width = int(lengths.max())
        owner = np.repeat(np.arange(n), lengths)
        slot = np.arange(len(cos)) - starts[owner]
        valid = np.arange(width)[None, :] < lengths[:, None]
        for q in range(len(out)):
            mat = np.zeros((n, width), np.float32)
            mat[owner, slot] = cos[:, rows[q] : rows[q + 1]].max(axis=1)  # each word's best query vector
            out[q] = agg(mat, valid)
        return out


def aggregate(mat: np.ndarray, valid: np.ndarray | None, agg_func: str, lambda_lse: float) -> np.ndarray:
    """SCAN's aggregation over axis 1 of per-item cosines (``valid`` masks ragged rows)."""
    if valid is not None:
        fill = -np.inf if agg_func in ("Max", "LogSumExp") else 0.0
        mat = np.where(valid, mat, fill)
    if agg_func == "Max":
        return mat.max(axis=1)
    if agg_func == "LogSumExp":
        x = lambda_lse * mat
        top = x.max(axis=1, keepdims=True)
        return (top[:, 0] + np.log(np.exp(x - top).sum(axis=1))) / lambda_lse
    total = mat.sum(axis=1)
    if agg_func == "Mean":
        return total / (mat.shape[1] if valid is None else np.maximum(valid.sum(axis=1), 1))
    return total


def _top_items(scores: np.ndarray, items: np.ndarray, m: int, n_items: int, position_of_id: np.ndarray) -> np.ndarray:
    if len(items) > m:
        # The m best (ties to the lower id): partition first, then order only the boundary's ties.
        kth = np.partition(scores, len(scores) - m)[len(scores) - m]
        above = np.flatnonzero(scores > kth)
        ties = np.flatnonzero(scores == kth)  # items are ascending, so the first ties are the lower ids
        chosen = items[np.concatenate([above, ties[: m - len(above)]])]
    else:
        chosen = items
        if len(chosen) < m:  # too few reached: the lowest unreached ids, all alike to the index
            rest = np.setdiff1d(np.arange(n_items), chosen, assume_unique=True)[: m - len(chosen)]
            chosen = np.concatenate([chosen, rest])
    return np.sort(position_of_id[chosen])


# ---------------------------------------------------------------------------------------------- persistence


def _meta_path(gallery) -> Path:
    return Path(gallery.folder) / META


def load_index(gallery: MappedGallery, encoder_id: str | None = None) -> CandidateIndex:
    """The gallery's candidate index; ``StaleIndexError`` when it belongs to another model or gallery state."""
    return CandidateIndex(gallery, *_read_saved(gallery, gallery.manifest.get("generation"), len(gallery), encoder_id))


def _read_saved(
    gallery: MappedGallery, generation: Any, count: int, encoder_id: str | None = None, mapped: bool = True
) -> tuple[Any, dict]:
    """The index saved beside the gallery and its manifest, checked to be of the gallery's model (and
    ``encoder_id``'s) and to index ``count`` items of generation ``generation``. ``mapped``: memory-mapped,
    read-only (searches); False reads it into memory (the write path extends it)."""
    faiss = import_faiss()
    kind, key = _encoder_key(gallery)
    path = _meta_path(gallery)
    if not path.is_file():
        raise StaleIndexError(f"{gallery.folder}: no candidate index ({META} missing)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StaleIndexError(f"{path}: corrupted candidate index manifest ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("kind") != kind:
        raise StaleIndexError(f"{path}: not a {FORMAT} index of {kind}")
    for who, value in (("gallery", gallery.manifest.get(key)), ("engine", encoder_id)):
        if value is not None and meta.get("encoder_id") != value:
            raise StaleIndexError(
                f"{path}: the candidate index was built by another model ({key} "
                f"{str(meta.get('encoder_id'))[:12]}..., the {who}'s is {str(value)[:12]}...)"
            )
    if meta.get("gallery_generation") != generation or meta.get("count") != count:
        raise StaleIndexError(
            f"{path}: the candidate index is stale: it indexes generation "
            f"{meta.get('gallery_generation')} ({meta.get('count')} items), the gallery is "
            f"generation {generation} ({count} items)"
        )
    file = Path(gallery.folder) / str(meta.get("file"))
    try:
        index = faiss.read_index(str(file), _mmap_flag(faiss, meta.get("index")) if mapped else 0)
    except RuntimeError as e:
        raise StaleIndexError(f"{file}: unreadable candidate index ({str(e).splitlines()[0][:200]})") from e
    if index.ntotal != meta.get("vectors") or not isinstance(meta.get("index"), dict):
        raise StaleIndexError(f"{file}: holds {index.ntotal} vectors, {META} says {meta.get('vectors')}")
    return index, meta


def _mmap_flag(faiss, info: Any) -> int:
    """How faiss maps an index file instead of reading it (faiss-cpu 1.15.1, checked by
    tests/runtime/test_index_mmap.py): IVF types with ``IO_FLAG_MMAP`` (the inverted lists, codes and ids,
    stay in the file as ``OnDiskInvertedLists``; the coarse quantizer is read), flat and HNSW with
    ``IO_FLAG_MMAP_IFC`` (their vector array stays in the file; HNSW's graph is read). Both flags together
    fail on IVF. Opening then costs the quantizer (or graph), not the vectors, and the pages a search touches
    are the page cache's, shared between processes and dropped under memory pressure, not this process's
    own memory; a superseded index file stays readable while mapped (it is unlinked, not overwritten)."""
    kind = info.get("kind") if isinstance(info, dict) else None
    if kind in ("ivf", "ivfsq", "ivfpq"):
        return int(faiss.IO_FLAG_MMAP)
    if kind in ("flat", "hnsw"):
        return int(faiss.IO_FLAG_MMAP_IFC)
    return 0


def build_index(
    gallery: MappedGallery, index_type: str = "auto", appended_from: int = 0, progress: bool = False
) -> CandidateIndex:
    """Build the gallery's index in memory, or extend a copy of the saved one with items ``appended_from..``.

    The saved index is extended only if it is intact and indexes exactly the first ``appended_from``
    items of the previous generation of this gallery; otherwise the index is built from scratch.
    Nothing is written (``update_index`` saves it).
    """
    faiss = import_faiss()
    gkind, key = _encoder_key(gallery)
    n_items = len(gallery)
    n_vectors = _vector_count(gallery)
    d = int(gallery.images.shape[2] if gkind == "images" else gallery.words.shape[1])
    generation = gallery.manifest.get("generation")
    start, index, info = 0, None, None
    if appended_from and _meta_path(gallery).is_file():
        try:
            prev, prev_meta = _read_saved(gallery, generation - 1, appended_from, mapped=False)
            if index_type in ("auto", prev_meta["index"]["kind"]):
                index, info, start = prev, prev_meta["index"], appended_from
        except StaleIndexError as e:
            logger.warning("%s: rebuilding the candidate index (%s)", gallery.folder, e)
    t0 = time.perf_counter()
    faiss.omp_set_num_threads(_OMP_THREADS[0])
    layout = _Layout.of(gallery)
    if index is None:
        index, info = _new_index(faiss, choose_type(n_vectors, index_type), d, n_vectors)
        if not index.is_trained:
            index.train(_training_sample(gallery, index, n_items, layout))
    from tqdm import tqdm

    step = max(1, _ADD_CHUNK // max(1, n_vectors // max(n_items, 1)))
    with tqdm(total=n_items - start, desc="indexing vectors", unit="item", disable=not progress, leave=False) as bar:
        for a in range(start, n_items, step):
            b = min(a + step, n_items)
            index.add(item_vectors(gallery, np.arange(a, b), layout))
            bar.update(b - a)
    meta = {
        "format": FORMAT,
        "kind": gkind,
        "encoder_id": gallery.manifest.get(key),
        "gallery_generation": generation,
        "count": n_items,
        "vectors": int(index.ntotal),
        "dim": d,
        "index": info,
        "file": f"candidates.{generation}.faiss",
        "build_seconds": round(time.perf_counter() - t0, 3),
        "extended_from": start,
    }
    return CandidateIndex(gallery, index, meta)


def update_index(
    gallery: MappedGallery, index_type: str | None, appended_from: int, progress: bool
) -> CandidateIndex | None:
    """The write path's step after a gallery commit, with the writer lock still held: build the index
    (``index_type``), or extend the one already in the folder, and save it; None when there is none to keep.
    An interruption before the save leaves an index of the previous generation, which readers refuse."""
    if index_type is None and not _meta_path(gallery).is_file():
        return None
    built = build_index(gallery, index_type or "auto", appended_from, progress)
    _save(built)
    return built


def _save(built: CandidateIndex) -> None:
    """Write the index file, then ``candidates.json`` (the commit), then remove older index files."""
    folder, meta = Path(built.gallery.folder), built.meta
    with atomic.atomic_path(folder / meta["file"]) as tmp:
        import_faiss().write_index(built.index, str(tmp))
    atomic.write_json(folder / META, meta)
    for p in folder.glob("candidates.*.faiss"):
        if p.name != meta["file"]:
            p.unlink(missing_ok=True)
    logger.info(
        "candidate index %s: %s over %d vectors (%d items, %d new) in %.1fs",
        folder,
        meta["index"],
        meta["vectors"],
        meta["count"],
        meta["count"] - meta["extended_from"],
        meta["build_seconds"],
    )


def open_index(gallery: MappedGallery, encoder_id: str | None = None) -> CandidateIndex | None:
    """The saved index of the gallery's generation; None: search that generation exactly.

    A reader never writes an index (one still on an older generation would overwrite a newer one).
    Without a current one, up to ``FLAT_MAX_VECTORS`` vectors get a flat index built in memory (less work
    than one exact search), larger galleries are searched exactly (an IVF index takes minutes to train);
    docs/two_stage.md, "Persistence". ``StaleIndexError``: the gallery belongs to another model.
    """
    generation = gallery.manifest.get("generation")
    if generation is None:
        return build_index(gallery)
    try:
        return load_index(gallery, encoder_id)
    except StaleIndexError as e:
        if encoder_id is not None and gallery.manifest.get(_encoder_key(gallery)[1]) != encoder_id:
            raise  # the gallery itself belongs to another model: no index would help
        reason = str(e)
    if _vector_count(gallery) <= FLAT_MAX_VECTORS:
        logger.warning(
            "%s; using an in-memory flat index of generation %s (readers never save one)", reason, generation
        )
        return build_index(gallery, "flat")
    logger.warning(
        "%s; searching generation %s exactly (an index of its size is built by gallery writes)", reason, generation
    )
    return None


def index_description(gallery: MappedGallery) -> dict[str, Any] | None:
    """What index a search of ``gallery`` would get from ``open_index`` (``candidates.json``'s ``"index"``:
    kind, nlist), for the cost model only: nothing is checked or loaded. None: it would get none."""
    try:
        meta = json.loads(_meta_path(gallery).read_text(encoding="utf-8"))
        if gallery.manifest.get("generation") is not None and isinstance(meta.get("index"), dict):
            return dict(meta["index"])
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return {"kind": "flat"} if _vector_count(gallery) <= FLAT_MAX_VECTORS else None  # built in memory


def _vector_count(gallery: MappedGallery) -> int:
    if gallery.manifest["kind"] == "images":
        return int(gallery.images.shape[0] * gallery.images.shape[1])
    return int(gallery.words.shape[0])


def _training_sample(gallery, index, n_items: int, layout: _Layout) -> np.ndarray:
    """A seeded sample of whole items with about ``max_points_per_centroid`` vectors per IVF list."""
    want = int(index.nlist * index.cp.max_points_per_centroid)
    per_item = max(1.0, float(layout.lengths_by_id.mean())) if n_items else 1.0
    n_pick = int(min(n_items, want // per_item + 1))
    ids = np.sort(np.random.default_rng(0).choice(n_items, size=n_pick, replace=False))
    x = item_vectors(gallery, ids, layout)
    if len(x) < index.nlist:
        raise CandidateIndexError(
            f"{gallery.folder}: {len(x)} vectors cannot train {index.nlist} IVF lists; "
            f"use the flat index for a gallery this small"
        )
    return x
