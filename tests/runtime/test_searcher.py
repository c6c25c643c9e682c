"""Search results equal a brute-force argsort of the full similarity matrix, in both directions."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest

from bench.evaluation import full_sims
from runtime.engine import ScanEngine
from runtime.gallery import build_caption_gallery, build_image_gallery
from runtime.options import EngineOptions, SearchOptions, WriteOptions
from runtime.searcher import Searcher, SearchError
from tests.runtime.conftest import random_captions, random_regions


def brute(sims: np.ndarray, k: int):
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


def assert_same_ranking(scores, ids, sims, k, atol=1e-6):
    """Equal to the brute-force top-k of ``sims`` (rows = queries).

    The search scores blocks of other shapes than the reference (no padding, other GEMM sizes), so
    scores may differ in the last float32 bits and exact near-ties may swap; ids must agree wherever
    the reference's neighbouring scores differ by more than ``atol``, and every returned score must be
    the reference score of the id returned.
    """
    want_s, want_i = brute(sims, k)
    kk = want_i.shape[1]
    np.testing.assert_allclose(scores[:, :kk], want_s, atol=atol)
    np.testing.assert_allclose(scores[:, :kk], np.take_along_axis(sims, ids[:, :kk], axis=1), atol=atol)
    gaps = np.diff(np.sort(sims, axis=1)[:, ::-1], axis=1)[:, :kk]
    separated = np.ones_like(want_i, bool)
    separated[:, : gaps.shape[1]] &= np.abs(gaps) > atol
    separated[:, 1:] &= np.abs(gaps[:, : kk - 1]) > atol
    np.testing.assert_array_equal(ids[:, :kk][separated], want_i[separated])
    assert (ids[:, kk:] == -1).all() and np.isneginf(scores[:, kk:]).all()


@pytest.fixture(scope="module")
def setup(engine_path, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("search")
    engine = ScanEngine.open(engine_path, EngineOptions(backend="onnxruntime"))
    regions = random_regions(23, seed=1)
    captions = random_captions(37, seed=2)
    images = build_image_gallery(engine, regions, tmp_path / "images", options=WriteOptions(progress=False))
    caps = build_caption_gallery(engine, captions, tmp_path / "captions", options=WriteOptions(progress=False))
    sims = full_sims(engine, regions, captions, progress=False)  # (23, 37) unblocked reference
    yield engine, regions, captions, images, caps, sims
    engine.close()


@pytest.mark.parametrize("block", [1, 4, 23, 1000])
@pytest.mark.parametrize("k", [1, 5, 30])
def test_text_to_image_equals_brute_force(setup, block, k):
    engine, _, captions, images, _, sims = setup
    scores, ids = Searcher(engine, images=images, options=SearchOptions(image_block=block, query_batch=4)).search(
        captions[:9], k
    )
    assert_same_ranking(scores, ids, sims[:, :9].T, k)


@pytest.mark.parametrize("block", [1, 3, 1000])
@pytest.mark.parametrize("k", [1, 7, 50])
def test_image_to_text_equals_brute_force(setup, block, k):
    engine, regions, _, _, caps, sims = setup
    scores, ids = Searcher(engine, captions=caps, options=SearchOptions(caption_block=block, query_batch=2)).search(
        regions[:5], k
    )
    assert_same_ranking(scores, ids, sims[:5], k)


def test_thread_safe(setup):
    engine, regions, captions, images, caps, sims = setup
    searcher = Searcher(engine, images=images, captions=caps, options=SearchOptions(image_block=5, caption_block=6))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        text = [pool.submit(searcher.search, [c], 3) for c in captions[:12]]
        imgs = [pool.submit(searcher.search, regions[i : i + 1], 3) for i in range(8)]
    for j, f in enumerate(text):
        assert_same_ranking(*f.result(), sims[:, j : j + 1].T, 3)
    for i, f in enumerate(imgs):
        assert_same_ranking(*f.result(), sims[i : i + 1], 3)


@pytest.mark.parametrize("k", [0, -1, 2.5, True, "3"])
def test_bad_k(setup, k):
    engine, regions, _captions, images, caps, _ = setup
    with pytest.raises(SearchError, match="k must be a positive integer"):
        Searcher(engine, images=images).search(["a dog"], k)
    with pytest.raises(SearchError, match="k must be a positive integer"):
        Searcher(engine, captions=caps).search(regions[:1], k)


def test_missing_gallery_says_how_to_build(setup):
    engine, regions, *_ = setup
    with pytest.raises(SearchError, match="--images"):
        Searcher(engine).search(["a dog"], 1)
    with pytest.raises(SearchError, match="--captions"):
        Searcher(engine).search(regions[:1], 1)


def test_resident_blocks_equal_streamed_blocks(setup):
    """The IOBinding path (the galleries uploaded once as OrtValues; CUDA with onnxruntime-gpu) on the CPU."""
    import onnxruntime as ort

    engine, regions, captions, images, texts, _ = setup
    streamed = Searcher(engine, images=images, options=SearchOptions(image_block=5, resident=False)).search(
        captions[:6], 4
    )
    streamed_i2t = Searcher(engine, captions=texts, options=SearchOptions(caption_block=7, resident=False)).search(
        regions[:5], 4
    )
    with Searcher(
        engine, images=images, captions=texts, options=SearchOptions(image_block=5, caption_block=7, resident=True)
    ) as searcher:
        first = searcher.search(captions[:6], 4)
        blocks = list(searcher._upload(searcher._generation, "images", 0))
        assert len(blocks) == 5 and [offset for offset, _ in blocks] == [0, 5, 10, 15, 20]  # 23 images / 5
        assert all(isinstance(v, ort.OrtValue) for _, feeds in blocks for v in feeds.values())
        again = searcher.search(captions[6:9], 4)
        assert (
            next(iter(searcher._upload(searcher._generation, "images", 0)))[1] is blocks[0][1]
        )  # uploaded once, not per search
        i2t = searcher.search(regions[:5], 4)
    assert searcher._generation._made == {}  # closed
    np.testing.assert_array_equal(first[1], streamed[1])
    np.testing.assert_allclose(first[0], streamed[0], atol=1e-6)
    np.testing.assert_array_equal(
        again[1], Searcher(engine, images=images, options=SearchOptions(resident=False)).search(captions[6:9], 4)[1]
    )
    np.testing.assert_array_equal(i2t[1], streamed_i2t[1])
    np.testing.assert_allclose(i2t[0], streamed_i2t[0], atol=1e-6)
