"""Two-stage search's cost model: the dense candidate score (exact, against a flat index asked for every
neighbour) and the choice between exact search, dense candidates and the index's candidates."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest

from runtime.engine import ScanEngine
from runtime.gallery import build_caption_gallery, build_image_gallery
from runtime.options import EngineOptions, OptionsError, SearchOptions, WriteOptions
from runtime.search_plan import MARGIN, CostModelError, Costs, Work, choose, index_visits, load_costs
from runtime.searcher import Searcher
from tests.runtime.conftest import random_captions, random_regions

faiss = pytest.importorskip("faiss", reason="two-stage search needs faiss (pip install 'scan-runtime[scale]')")

from runtime.gallery.index import DenseCandidates, KeptRows, default_neighbors, load_index  # noqa: E402
from runtime.two_stage import TwoStage  # noqa: E402

AGGS = ("LogSumExp", "Mean", "Max", "Sum")


@pytest.fixture(scope="module")
def setups(small_engines, tmp_path_factory):
    """Per model type: the engine and float16 image and caption galleries with a flat index."""
    out = {}
    for attn in ("t2i", "i2t"):
        engine = ScanEngine.open(small_engines[attn], EngineOptions(backend="onnxruntime"))
        folder = tmp_path_factory.mktemp(f"plan_{attn}")
        opts = WriteOptions(progress=False, index="flat", dtype="float16")
        images = build_image_gallery(engine, random_regions(41, seed=1), folder / "images", options=opts)
        captions = build_caption_gallery(engine, random_captions(47, seed=2), folder / "captions", options=opts)
        out[attn] = (engine, images, captions)
    yield out
    for engine, _, _ in out.values():
        engine.close()


def _query_vectors(engine, direction: str, n: int, seed: int) -> list[np.ndarray]:
    if direction == "t2i":
        ids, lengths = engine.tokenizer.encode_batch(random_captions(n, seed=seed))
        words = engine.encode_ids(ids, lengths)
        return [w[:k] for w, k in zip(words, lengths)]
    return list(engine.encode_images(random_regions(n, seed=seed))[0])


@pytest.mark.parametrize("attn", ["t2i", "i2t"])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_dense_candidates_are_the_flat_index_with_every_neighbour(setups, attn, agg, direction, monkeypatch):
    """The dense score proposes what a flat index asked for every vector proposes (the same candidate
    score, one GEMM instead of an index), for both model types, every aggregation and both directions,
    with the gallery read in several blocks (a small ``BLOCK_COSINES``) and in one, kept or not."""
    engine, images, captions = setups[attn]
    config = dataclasses.replace(engine.config, agg_func=agg, lambda_lse=4.0)
    gallery = images if direction == "t2i" else captions
    index = load_index(gallery, None)
    queries = _query_vectors(engine, direction, 6, seed=21)
    m = 9
    want = index.search(queries, config, m, neighbors=index.index.ntotal)
    # a few items per block (ragged caption blocks), read from the cache; the whole gallery, kept in float32
    for block, kept in ((200, None), (1 << 23, KeptRows(gallery))):
        monkeypatch.setattr("runtime.gallery.index.BLOCK_COSINES", block)
        got = DenseCandidates(gallery, kept).search(queries, config, m)
        assert [g.tolist() for g in got] == [w.tolist() for w in want]
    # and the candidates are not trivially all items, nor the same for every query
    assert len(want[0]) == m < len(gallery) and any(not np.array_equal(want[0], w) for w in want[1:])


def test_dense_plan_search_equals_flat_index_with_every_neighbour(setups):
    """Through the Searcher: forcing the dense plan gives what the index with every neighbour gives."""
    engine, images, _ = setups["t2i"]
    queries = random_captions(5, seed=31)
    n_vectors = load_index(images, None).index.ntotal
    runs = [
        Searcher(
            engine, images=images, options=SearchOptions(candidates=7, candidate_plan=plan, neighbors=n_vectors)
        ).search(queries, 5)
        for plan in ("dense", "index")
    ]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=0, atol=2e-6)  # the same items, exact rerank


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("attn", ["t2i", "i2t"])
def test_kept_rows_change_nothing(setups, attn, direction, monkeypatch):
    """Rows kept in float32 (a small gallery) and rows read from the float16 cache give the same results,
    bit for bit: the same values reach the GEMM and the head."""
    engine, images, captions = setups[attn]
    queries = random_captions(4, seed=61) if direction == "t2i" else random_regions(3, seed=62)
    options = SearchOptions(candidates=9, candidate_plan="dense")
    kept = Searcher(engine, images=images, captions=captions, options=options).search(queries, 5)
    monkeypatch.setattr("runtime.gallery.index.KEEP_BYTES", 0)
    searcher = Searcher(engine, images=images, captions=captions, options=options)
    read = searcher.search(queries, 5)
    assert all(key[0] != "kept" or value is None for key, value in searcher._generation._made.items())
    np.testing.assert_array_equal(kept[1], read[1])
    np.testing.assert_allclose(kept[0], read[0], rtol=0, atol=1e-6)  # the same head inputs; the same blocks


# ---------------------------------------------------------------------------------------------- the choice

COSTS = Costs(
    exact=4e-11,
    exact_pass=1e-10,
    dense=1e-11,
    dense_pass=1e-10,
    scan={"flat": 2e-11, "ivfsq": 3e-11},
    neighbour={"flat": 1e-7, "ivfsq": 5e-8},
    rerank=1.2e-10,
    rerank_query=2e-3,
)


def _work(queries: int, items: int, words: int = 10, regions: int = 36, dim: int = 128) -> Work:
    return Work(queries, queries * words, items, items * regions, dim, -(-queries // 32))


def test_choice_follows_the_costs():
    flat, ivf = {"kind": "flat"}, {"kind": "ivfsq", "nlist": 2048}
    # 200 captions vs 5000 images, M=250: the flat index at 2000 neighbours costs more than exact; dense less
    plan = choose(COSTS, _work(200, 5000), 250, flat, 2000, 16)
    assert plan.kind == "dense"
    assert plan.estimates["index"] > plan.estimates["exact"] > plan.estimates["dense"]
    # exact: 40 pico-s x 2000 words x 180K regions x 128 + the passes
    assert plan.estimates["exact"] == pytest.approx(4e-11 * 2000 * 180_000 * 128 + 1e-10 * 180_000 * 128 * 7)
    # one caption vs 20K images: an IVF index visits a few thousand vectors: the index
    assert choose(COSTS, _work(1, 20_000), 250, ivf, 2000, 16).kind == "index"
    # without an index the dense score still beats exact there
    assert choose(COSTS, _work(1, 20_000), 250, None, 2000, 16).kind == "dense"
    # a small gallery: rerank's per-query cost outweighs what candidates save
    small = choose(COSTS, _work(1, 300), 250, flat, 2000, 16)
    assert small.kind == "exact" and small.estimates["exact"] < small.estimates["dense"]
    # a candidate plan must be MARGIN times cheaper than exact: just under that, exact
    for ratio, kind in ((0.99, "exact"), (1.01, "dense")):
        costs = Costs(1.0, 0.0, 1.0 / (MARGIN * ratio), 0.0)  # dense estimated MARGIN * ratio times cheaper
        assert choose(costs, _work(200, 5000), 250, None, 2000, 16).kind == kind
    # exact is free: always exact; candidates free: never exact (the tie order is exact, dense, index)
    free = dataclasses.replace(COSTS, exact=0.0, exact_pass=0.0)
    assert choose(free, _work(200, 5000), 250, ivf, 2000, 16).kind == "exact"
    nothing = Costs(1.0, 1.0, 0.0, 0.0, {"ivfsq": 0.0}, {"ivfsq": 0.0}, 0.0, 0.0)
    assert choose(nothing, _work(200, 5000), 250, ivf, 2000, 16).kind == "dense"


def test_default_depth_grows_with_the_gallery():
    """The index's retrieval depth: 8 neighbours a candidate, and at least one in 40 gallery items (at 1M demo
    images and M=1000, 8 M gave top-10 overlap 0.64 and N / 40 0.97); the plan prices that depth."""
    assert default_neighbors(10, 1000) == 256
    assert default_neighbors(250, 5000) == 2000
    assert default_neighbors(1000, 1_000_000) == 25_000
    assert default_neighbors(100, 1_000_000) == 25_000
    ivf = {"kind": "ivfpq", "nlist": 4096}
    two_stage = TwoStage(SearchOptions(candidates=100), costs=COSTS)
    small, large = (two_stage.plan(_work(1, n), ivf).estimates["index"] for n in (10_000, 1_000_000))
    asked = TwoStage(SearchOptions(candidates=100, neighbors=800), costs=COSTS).plan(_work(1, 1_000_000), ivf)
    assert large > asked.estimates["index"]  # the default asks for more than 8 M at 1M items
    assert small < large


def test_index_visits():
    assert index_visits(None, 1000, 10, 16) is None
    assert index_visits({"kind": "flat"}, 1000, 10, 16) == ("flat", 1000.0)
    assert index_visits({"kind": "ivfsq", "nlist": 100}, 1000, 10, 16) == ("ivfsq", 100 + 16 * 10)
    assert index_visits({"kind": "ivf", "nlist": 8}, 1000, 10, 16) == ("ivf", 8 + 8 * 125)  # nprobe <= nlist


def test_searcher_falls_back_to_exact_and_says_so_once(setups, caplog):
    """Where the cost model finds that candidates would not beat exact search, the search is exact (the same
    results as candidates=0), and it is logged once, with the estimates."""
    engine, images, _ = setups["t2i"]
    queries = random_captions(4, seed=41)
    exact = Searcher(engine, images=images).search(queries, 5)
    costly = dataclasses.replace(COSTS, exact=0.0, exact_pass=0.0)
    two_stage = TwoStage(SearchOptions(candidates=7), costs=costly)
    searcher = Searcher(engine, images=images, options=SearchOptions(candidates=7), candidates=two_stage)
    with caplog.at_level(logging.INFO, logger="runtime.two_stage"):
        got = [searcher.search(queries, 5) for _ in range(3)]
    for s, i in got:
        np.testing.assert_array_equal(i, exact[1])
        np.testing.assert_array_equal(s, exact[0])
    said = [r.getMessage() for r in caplog.records if "would not beat exact search" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith(f"candidates M=7 would not beat exact search at N={len(images)} images (estimated ")
    assert said[0].endswith("searching exactly")
    assert two_stage.plans["images"].kind == "exact"


def test_searcher_runs_the_chosen_plan(setups, caplog):
    """Injected costs decide: dense where the dense score is cheapest, the index where it is (it is loaded
    only then), and the plan is logged at info and kept in ``TwoStage.plans``."""
    engine, images, _ = setups["t2i"]
    queries = random_captions(3, seed=51)
    cheap_dense = Costs(1.0, 1.0, 0.0, 0.0, {"flat": 1.0}, {"flat": 1.0}, 0.0, 0.0)
    cheap_index = Costs(1.0, 1.0, 1.0, 1.0, {"flat": 0.0}, {"flat": 0.0}, 0.0, 0.0)
    for costs, kind, source in ((cheap_dense, "dense", DenseCandidates), (cheap_index, "index", None)):
        two_stage = TwoStage(SearchOptions(candidates=7), costs=costs)
        searcher = Searcher(engine, images=images, options=SearchOptions(candidates=7), candidates=two_stage)
        with caplog.at_level(logging.INFO, logger="runtime.two_stage"):
            searcher.search(queries, 5)
        assert two_stage.plans["images"].kind == kind
        made = searcher._generation._made
        assert any(key[0] == ("dense" if kind == "dense" else "index") for key in made)
        assert not any(key[0] == ("index" if kind == "dense" else "dense") for key in made)
        if source is not None:
            assert all(isinstance(v, source) for key, v in made.items() if key[0] == "dense")
        assert f"two-stage search of images, M=7 at N={len(images)}: {kind} (" in caplog.text


def test_cost_file(tmp_path):
    costs = load_costs()  # the committed constants, measured by bench/cost_model.py
    assert costs.exact > 0 and costs.dense > 0 and costs.scan
    path = tmp_path / "costs.json"
    path.write_text(json.dumps({"format": "scan-search-costs/1", "costs": {**costs.to_dict(), "dense": -1}}))
    with pytest.raises(CostModelError, match="dense: expected a non-negative number"):
        load_costs(path)
    path.write_text(json.dumps({"format": "scan-search-costs/1", "costs": {"exact": 1.0}}))
    with pytest.raises(CostModelError, match="expected the constants"):
        load_costs(path)
    with pytest.raises(CostModelError, match="unreadable cost model"):
        load_costs(tmp_path / "missing.json")
    with pytest.raises(OptionsError, match="candidate_plan must be one of"):
        SearchOptions(candidate_plan="fast")
