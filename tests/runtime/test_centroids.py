"""The codebook candidate score (runtime/gallery/centroids.py) against slow loop references, on seeded data:
both model types whose aggregation runs over the gallery item's vectors (t2i searching captions, i2t
searching images), every aggregation, both codebook sources (an IVF index's lists, k-means over a flat
index)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from runtime.config import SCANConfig
from runtime.gallery import CaptionGallery, ImageGallery

faiss = pytest.importorskip("faiss", reason="two-stage search needs faiss (pip install 'scan-runtime[scale]')")

from runtime.gallery import centroids  # noqa: E402
from runtime.gallery.index import build_index  # noqa: E402

AGGS = ("LogSumExp", "Mean", "Max", "Sum")
D = 16


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def _agg(x: np.ndarray, agg: str, lam: float) -> float:
    """SCAN's aggregation of one item's cosines, written out."""
    if agg == "LogSumExp":
        return float(np.log(sum(np.exp(lam * v) for v in x)) / lam)
    if agg == "Max":
        return float(max(x))
    return float(sum(x) / (len(x) if agg == "Mean" else 1))


def _galleries(seed: int = 0):
    """An image gallery (40 x 6 regions) and a caption gallery (300 captions, 3..12 words, stored by length)
    of clustered unit vectors (a few directions plus noise, as words of one vocabulary are)."""
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((12, D))

    def vectors(n):
        return _unit(topics[rng.integers(0, len(topics), n)] + 0.4 * rng.standard_normal((n, D))).astype(np.float32)

    images = vectors(40 * 6).reshape(40, 6, D)
    gram = np.einsum("nrd,nsd->nrs", images, images).astype(np.float32)
    image_gallery = ImageGallery.from_arrays(images, gram)
    lengths = rng.integers(3, 13, 300)
    order = np.argsort(lengths, kind="stable")
    caption_gallery = CaptionGallery.from_arrays(
        vectors(int(lengths.sum())), lengths[order], [f"c{i}" for i in range(300)], ids=order
    )
    return image_gallery, caption_gallery


def _items(gallery) -> list[np.ndarray]:
    """Each item's vectors, by item id."""
    if isinstance(gallery, ImageGallery):
        return [np.asarray(gallery.images[i]) for i in range(len(gallery))]
    out = [None] * len(gallery)
    for p, i in enumerate(np.asarray(gallery.ids)):
        out[i] = np.asarray(gallery.words[gallery.offsets[p] : gallery.offsets[p + 1]])
    return out


def _config(attn: str, agg: str) -> SCANConfig:
    return dataclasses.replace(SCANConfig(vocab_size=10), cross_attn=attn, agg_func=agg, lambda_lse=5.0)


CASES = [("t2i", "captions"), ("i2t", "images")]  # the models that aggregate over the gallery item's vectors


@pytest.fixture(scope="module")
def indexes():
    image_gallery, caption_gallery = _galleries()
    out = {}
    for kind, gallery in (("images", image_gallery), ("captions", caption_gallery)):
        for index_type in ("flat", "ivf"):
            out[kind, index_type] = build_index(gallery, index_type)
    return out


def _query(kind: str, seed: int) -> np.ndarray:
    """A caption's words (searching images) or an image's regions (searching captions)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((5 if kind == "images" else 9, D)).astype(np.float32)


@pytest.mark.parametrize("index_type", ["flat", "ivf"])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize(("attn", "kind"), CASES)
def test_approximate_score_is_the_centroid_reference(indexes, attn, kind, agg, index_type):
    index = indexes[kind, index_type]
    book = centroids.Codebook.of(index)
    assert book.source.startswith("ivf" if index_type == "ivf" else "k-means")
    assert len(book.centroids) > 1 and book.codes.min() >= 0 and book.codes.max() < len(book.centroids)
    config = _config(attn, agg)
    query = _query(kind, 3)
    got = book.approximate(query, config)
    cents = _unit(book.centroids)
    # vector ids are insertion order: item by item id, each item's vectors in order
    items = _items(index.gallery)
    ref, v = [], 0
    for vecs in items:
        best = []
        for _ in vecs:
            best.append(max(float(cents[book.codes[v]] @ q) for q in _unit(query)))
            v += 1
        ref.append(_agg(best, agg, 5.0))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)  # float32 GEMM against float64 loops


def test_codes_are_the_nearest_centroid(indexes):
    """Each vector's code is its own list (IVF) or its nearest centroid (k-means): the approximation's error
    is each vector's distance to its centroid, so a wrong code would be a silent loss of recall."""
    for (kind, _), index in indexes.items():
        book = centroids.Codebook.of(index)
        vecs = _unit(np.concatenate(_items(index.gallery)))
        sims = vecs @ _unit(book.centroids).T
        chosen = sims[np.arange(len(vecs)), book.codes]
        assert np.all(chosen >= sims.max(axis=1) - 1e-4), kind


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize(("attn", "kind"), CASES)
def test_exact_candidate_score_is_the_loop_reference(indexes, attn, kind, agg):
    index = indexes[kind, "flat"]
    config = _config(attn, agg)
    query = _query(kind, 4)
    ids = np.array([0, 2, 3, 7, 11, 12, 20, 39])
    got = centroids.exact_scores(index, ids, query, config)
    items = _items(index.gallery)
    ref = [_agg([max(float(g @ q) for q in _unit(query)) for g in _unit(items[i])], agg, 5.0) for i in ids]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize(("attn", "kind"), CASES)
def test_proposals_refined_over_every_item_are_the_dense_top_m(indexes, attn, kind, agg):
    """With refine * M >= the gallery every item is rescored exactly: the proposals are then the top M of
    the dense candidate score (the ceiling of the approximation)."""
    index = indexes[kind, "ivf"]
    config = _config(attn, agg)
    n = len(index.gallery)
    ids = np.asarray(index.gallery.ids)
    for seed in (5, 6):
        query = _query(kind, seed)
        dense = centroids.exact_scores(index, np.arange(n), query, config)
        m = 7
        got = centroids.propose(index, [query], config, m, refine=n)[0]
        order = np.lexsort((np.arange(n), -dense))[:m]
        assert set(ids[got].tolist()) == set(order.tolist())


def test_segment_aggregate_handles_far_values_without_overflow():
    values = np.array([-1.0, 1.0, 0.9, -0.8], np.float32)
    got = centroids.segment_aggregate(
        values, np.array([0, 1, 2, 3, 3]), np.array([0, 2]), np.array([2, 3]), "LogSumExp", 30.0
    )
    ref = [np.log(np.exp(-30.0) + np.exp(30.0)) / 30, np.log(np.exp(27.0) + 2 * np.exp(-24.0)) / 30]
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert np.isfinite(got).all()


@pytest.mark.parametrize("attn", ["t2i", "i2t"])
@pytest.mark.parametrize("kind", ["captions", "images"])
def test_two_stage_proposes_from_the_side_the_model_aggregates_over(indexes, attn, kind, monkeypatch):
    """The Searcher's two-stage collaborator takes the codebook where the model aggregates over the gallery
    item's vectors and the index's neighbours where it aggregates over the query's."""
    from runtime.options import SearchOptions
    from runtime.two_stage import TwoStage

    index = indexes[kind, "flat"]
    config = _config(attn, "LogSumExp")
    queries = [_query(kind, 8), _query(kind, 9)]
    codebook = (attn, kind) in CASES
    want = centroids.propose(index, queries, config, 6) if codebook else index.search(queries, config, 6)
    calls = []
    real = centroids.propose
    monkeypatch.setattr(centroids, "propose", lambda *a, **k: calls.append(a) or real(*a, **k))
    got = TwoStage(SearchOptions(candidates=6)).propose(index, queries, config)
    assert len(calls) == int(codebook)
    assert len(got) == 2 and all(np.array_equal(g, w) for g, w in zip(got, want))
