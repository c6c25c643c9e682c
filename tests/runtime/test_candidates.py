"""Two-stage search: candidate index (build, append, persistence, staleness), candidate score, exact rerank."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest

from runtime.engine import ScanEngine
from runtime.gallery import build_caption_gallery, build_image_gallery
from runtime.options import EngineOptions, OptionsError, SearchOptions, WriteOptions
from runtime.searcher import Searcher
from tests.runtime.conftest import export_small, random_captions, random_regions

faiss = pytest.importorskip("faiss", reason="two-stage search needs faiss (pip install 'scan-runtime[scale]')")

from runtime.gallery.index import (  # noqa: E402
    CandidateIndexError,
    StaleIndexError,
    aggregate,
    build_index,
    load_index,
    open_index,
)

AGGS = ("LogSumExp", "Mean", "Max", "Sum")
# The session's small models (tests/runtime/conftest.py) run by default; the other six (cross_attn,
# agg_func) pairs each need an export of their own (the aggregation is in the head graph): slow.
FAST = {("t2i", "LogSumExp"), ("i2t", "Mean")}
MODELS = [
    pytest.param((a, g), id=f"{a}-{g}", marks=() if (a, g) in FAST else pytest.mark.slow)
    for a in ("t2i", "i2t")
    for g in AGGS
]


class _Lazy(dict):
    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, key):
        self[key] = value = self.make(key)
        return value


@pytest.fixture(scope="module")
def engines(small_engines, tmp_path_factory):
    """A small exported model per (cross_attn, agg_func), exported on first use."""

    def make(key):
        attn, agg = key
        if key in FAST:
            path = small_engines[attn]
        else:
            path = export_small(
                tmp_path_factory.mktemp(f"cand_{attn}_{agg}"), seed=AGGS.index(agg), cross_attn=attn, agg_func=agg
            )
        return ScanEngine.open(path, EngineOptions(backend="onnxruntime"))

    out = _Lazy(make)
    yield out
    for e in out.values():
        e.close()


@pytest.fixture(scope="module")
def galleries(engines, tmp_path_factory):
    def make(key):
        engine = engines[key]
        folder = tmp_path_factory.mktemp(f"gal_{key[0]}_{key[1]}")
        images = build_image_gallery(
            engine, random_regions(37, seed=1), folder / "images", options=WriteOptions(progress=False, index="flat")
        )
        captions = build_caption_gallery(
            engine, random_captions(41, seed=2), folder / "captions", options=WriteOptions(progress=False, index="flat")
        )
        return images, captions

    return _Lazy(make)


def _queries(direction: str):
    return random_captions(7, seed=11) if direction == "t2i" else random_regions(5, seed=12)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("model", MODELS)
def test_all_candidates_is_exact(engines, galleries, model, direction):
    engine = engines[model]
    images, captions = galleries[model]
    n = len(images) if direction == "t2i" else len(captions)
    queries = _queries(direction)
    exact = Searcher(engine, images=images, captions=captions).search(queries, 6)
    for m in (n, n + 5):
        s, i = Searcher(
            engine, images=images, captions=captions, options=SearchOptions(candidate_plan="index", candidates=m)
        ).search(queries, 6)
        assert np.array_equal(i, exact[1]) and np.array_equal(s, exact[0])


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("model", MODELS)
def test_rerank_is_exact_on_the_candidates(engines, galleries, model, direction):
    """With M < N the returned scores are the exact SCAN scores of the returned items, and where the
    candidates hold the exact top-k the results are the exact results."""
    engine = engines[model]
    images, captions = galleries[model]
    gallery = images if direction == "t2i" else captions
    queries = _queries(direction)
    k = 5
    exact_s, exact_i = Searcher(engine, images=images, captions=captions).search(queries, len(gallery))
    m = len(gallery) - 3
    searcher = Searcher(
        engine, images=images, captions=captions, options=SearchOptions(candidate_plan="index", candidates=m)
    )
    s, i = searcher.search(queries, k)
    index = searcher.two_stage.index(engine, gallery, "images" if direction == "t2i" else "captions")
    assert np.all(np.diff(s, axis=1) <= 0) and (i >= 0).all()
    for q in range(len(queries)):
        full = dict(zip(exact_i[q].tolist(), exact_s[q].tolist()))
        np.testing.assert_allclose(s[q], [full[j] for j in i[q]], rtol=0, atol=2e-6)  # other GEMM shapes
        if direction == "t2i":
            ids, lengths = engine.tokenizer.encode_batch([queries[q]])
            vecs = [engine.encode_ids(ids, lengths)[0, : lengths[0]]]
        else:
            vecs = [engine.encode_images(queries[q : q + 1])[0][0]]
        cands = set(np.asarray(gallery.ids)[searcher.two_stage.propose(index, vecs, engine.config)[0]].tolist())
        assert len(cands) == m
        if set(exact_i[q, :k].tolist()) <= cands:
            assert i[q].tolist() == exact_i[q, :k].tolist()
        # the k best candidates by exact score are what came back
        best = sorted(cands, key=lambda j: (-full[j], j))[:k]
        np.testing.assert_allclose(s[q], [full[j] for j in best], atol=2e-6)


def _reference_score(q: np.ndarray, item: np.ndarray, attn: str, query_side_is_text: bool, agg: str, lam: float):
    """Dense candidate score of one (query, item) pair: SCAN's aggregation of hard-attention cosines."""
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)  # noqa: E731
    cos = unit(q.astype(np.float64)) @ unit(item.astype(np.float64)).T  # (query vectors, item vectors)
    words_are_query = query_side_is_text
    attention_query_is_query_side = (attn == "t2i") == words_are_query
    best = cos.max(axis=1) if attention_query_is_query_side else cos.max(axis=0)
    return aggregate(best[None, :], None, agg, lam)[0]


@pytest.mark.parametrize("attn", ["t2i", "i2t"])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_candidate_score_with_every_neighbour_is_the_dense_score(engines, galleries, attn, agg, direction):
    """A flat index asked for every vector knows every cosine: the candidates are then the top M of the
    dense score (ties to the lower id), for both model types, every aggregation, both directions."""
    key = ("t2i", "LogSumExp") if attn == "t2i" else ("i2t", "Mean")  # the index does not depend on agg_func
    engine = engines[key]
    images, captions = galleries[key]
    config = dataclasses.replace(engine.config, agg_func=agg, lambda_lse=4.0)
    gallery = images if direction == "t2i" else captions
    index = load_index(gallery, None)
    if direction == "t2i":
        ids, lengths = engine.tokenizer.encode_batch(random_captions(4, seed=21))
        words = engine.encode_ids(ids, lengths)
        queries = [w[:n] for w, n in zip(words, lengths)]
        items = [np.asarray(images.images[p]) for p in range(len(images))]
    else:
        queries = list(engine.encode_images(random_regions(4, seed=22))[0])
        off = np.asarray(captions.offsets)
        items = [np.asarray(captions.words[off[p] : off[p + 1]]) for p in range(len(captions))]
    m = 9
    got = index.search(queries, config, m, neighbors=index.index.ntotal)
    ids = np.asarray(gallery.ids)
    for q, positions in zip(queries, got):
        ref = np.array([_reference_score(q, it, attn, direction == "t2i", agg, 4.0) for it in items])
        order = np.lexsort((ids, -np.round(ref, 5)))[:m]  # round: float32 index vs float64 reference
        assert set(ids[positions].tolist()) == set(ids[order].tolist())


def test_aggregate_matches_definitions():
    x = np.array([[0.1, 0.5, -0.2], [0.3, 0.3, 0.9]])
    valid = np.array([[True, True, False], [True, True, True]])
    np.testing.assert_allclose(aggregate(x, valid, "Sum", 6.0), [0.6, 1.5])
    np.testing.assert_allclose(aggregate(x, valid, "Mean", 6.0), [0.3, 0.5])
    np.testing.assert_allclose(aggregate(x, valid, "Max", 6.0), [0.5, 0.9])
    np.testing.assert_allclose(
        aggregate(x, valid, "LogSumExp", 6.0),
        [np.log(np.exp(0.6) + np.exp(3.0)) / 6, np.log(np.exp(6 * x[1]).sum()) / 6],
    )


# ---------------------------------------------------------------------------------------------- persistence


def test_index_extended_on_append_equals_a_fresh_build(engines, tmp_path):
    engine = engines["t2i", "LogSumExp"]
    regions, caps = random_regions(30, seed=5), random_captions(33, seed=6)
    build_image_gallery(engine, regions[:18], tmp_path / "img", options=WriteOptions(progress=False, index="flat"))
    parts = build_image_gallery(
        engine, regions[18:], tmp_path / "img", options=WriteOptions(append=True, progress=False)
    )  # extended
    whole = build_image_gallery(
        engine, regions, tmp_path / "img_whole", options=WriteOptions(progress=False, index="flat")
    )
    meta = json.loads((tmp_path / "img" / "candidates.json").read_text())
    assert meta["extended_from"] == 18 and meta["count"] == 30 and meta["vectors"] == 30 * regions.shape[1]
    assert sorted(p.name for p in (tmp_path / "img").glob("candidates*")) == ["candidates.2.faiss", "candidates.json"]
    build_caption_gallery(engine, caps[:20], tmp_path / "cap", options=WriteOptions(progress=False, index="flat"))
    cparts = build_caption_gallery(
        engine, caps[20:], tmp_path / "cap", options=WriteOptions(append=True, progress=False)
    )
    cwhole = build_caption_gallery(
        engine, caps, tmp_path / "cap_whole", options=WriteOptions(progress=False, index="flat")
    )
    assert json.loads((tmp_path / "cap" / "candidates.json").read_text())["extended_from"] == 20
    texts, regs = random_captions(6, seed=7), random_regions(4, seed=8)
    for a, b, q in ((parts, whole, texts), (cparts, cwhole, regs)):
        kw = "images" if a is parts else "captions"
        ra = Searcher(engine, **{kw: a}, options=SearchOptions(candidate_plan="index", candidates=7)).search(q, 4)
        rb = Searcher(engine, **{kw: b}, options=SearchOptions(candidate_plan="index", candidates=7)).search(q, 4)
        np.testing.assert_array_equal(ra[1], rb[1])
        np.testing.assert_allclose(ra[0], rb[0], atol=1e-6)
    # reload from disk: the same index
    reloaded = load_index(parts, engine.manifest.image_encoder_id)
    assert reloaded.index.ntotal == 30 * regions.shape[1] and reloaded.index_type == "flat"


def test_interrupted_gallery_append_keeps_previous_cache_and_index(engines, tmp_path, monkeypatch):
    engine = engines["t2i", "LogSumExp"]
    g = build_image_gallery(
        engine, random_regions(12, seed=1), tmp_path, options=WriteOptions(progress=False, index="flat")
    )
    before = Searcher(engine, images=g, options=SearchOptions(candidate_plan="index", candidates=5)).search(
        random_captions(3, seed=2), 3
    )
    calls = {"n": 0}
    real = engine.encode_images

    def dying(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(engine, "encode_images", dying)
    with pytest.raises(KeyboardInterrupt):
        build_image_gallery(
            engine, random_regions(10, seed=3), tmp_path, batch=4, options=WriteOptions(append=True, progress=False)
        )
    monkeypatch.undo()
    from runtime.gallery import ImageGallery

    g2 = ImageGallery.load(tmp_path, engine.manifest.image_encoder_id)
    assert len(g2) == 12 and load_index(g2, engine.manifest.image_encoder_id).index.ntotal == 12 * 5
    after = Searcher(engine, images=g2, options=SearchOptions(candidate_plan="index", candidates=5)).search(
        random_captions(3, seed=2), 3
    )
    np.testing.assert_array_equal(before[1], after[1])


def test_interrupted_index_write_is_not_rewritten_by_readers(engines, tmp_path, monkeypatch, caplog):
    engine = engines["t2i", "LogSumExp"]
    build_image_gallery(
        engine, random_regions(12, seed=1), tmp_path, options=WriteOptions(progress=False, index="flat")
    )

    def dying(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(faiss, "write_index", dying)
    with pytest.raises(KeyboardInterrupt):
        build_image_gallery(
            engine, random_regions(4, seed=3), tmp_path, options=WriteOptions(append=True, progress=False)
        )
    monkeypatch.undo()
    from runtime.gallery import ImageGallery

    g = ImageGallery.load(tmp_path, engine.manifest.image_encoder_id)  # the gallery append was committed
    assert len(g) == 16
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob("*.tmp"))
    with pytest.raises(StaleIndexError, match=r"stale.*generation 1 \(12 items\).*generation 2 \(16 items\)"):
        load_index(g, engine.manifest.image_encoder_id)
    with caplog.at_level(logging.WARNING, logger="runtime.gallery.index"):
        Searcher(engine, images=g, options=SearchOptions(candidate_plan="index", candidates=6)).search(
            random_captions(2, seed=4), 3
        )
    assert "in-memory flat index of generation 2" in caplog.text
    with pytest.raises(StaleIndexError, match="stale"):  # a reader never writes the index...
        load_index(g, engine.manifest.image_encoder_id)
    g = build_image_gallery(engine, random_regions(1, seed=5), tmp_path, options=WriteOptions(append=True))
    assert load_index(g, engine.manifest.image_encoder_id).index.ntotal == 17 * 5  # ... the next write does
    exact = Searcher(engine, images=g).search(random_captions(2, seed=4), 3)
    np.testing.assert_array_equal(
        Searcher(engine, images=g, options=SearchOptions(candidate_plan="index", candidates=17)).search(
            random_captions(2, seed=4), 3
        )[1],
        exact[1],
    )


def test_index_from_another_model_is_refused(engines, tmp_path):
    a, b = engines["t2i", "LogSumExp"], engines["i2t", "Mean"]
    ga = build_image_gallery(
        a, random_regions(8, seed=1), tmp_path / "a", options=WriteOptions(progress=False, index="flat")
    )
    build_image_gallery(
        b, random_regions(8, seed=1), tmp_path / "b", options=WriteOptions(progress=False, index="flat")
    )
    with pytest.raises(StaleIndexError, match="another model"):
        load_index(ga, b.manifest.image_encoder_id)
    with pytest.raises(StaleIndexError, match="another model"):  # the gallery itself is not b's: no index
        open_index(ga, b.manifest.image_encoder_id)
    # b's index planted beside a's gallery (same generation and count): refused by the binding
    for p in (tmp_path / "b").glob("candidates*"):
        (tmp_path / "a" / p.name).write_bytes(p.read_bytes())
    with pytest.raises(StaleIndexError, match="another model"):
        load_index(ga, a.manifest.image_encoder_id)
    # ... and a reader builds one for a in memory, leaving the file as it is
    assert open_index(ga, a.manifest.image_encoder_id).meta["encoder_id"] == a.manifest.image_encoder_id
    assert json.loads((tmp_path / "a" / "candidates.json").read_text())["encoder_id"] == b.manifest.image_encoder_id


@pytest.mark.parametrize("kind", ["ivf", "ivfsq", "ivfpq", "hnsw"])
def test_approximate_index_kinds(engines, tmp_path, kind):
    engine = engines["t2i", "LogSumExp"]
    regions = random_regions(300, seed=9)
    g = build_image_gallery(engine, regions, tmp_path, options=WriteOptions(progress=False, index=kind))
    index = load_index(g, engine.manifest.image_encoder_id)
    assert index.index_type == kind and index.index.ntotal == 300 * regions.shape[1]
    queries = random_captions(5, seed=10)
    s, i = Searcher(engine, images=g, options=SearchOptions(candidate_plan="index", candidates=40)).search(queries, 5)
    assert (i >= 0).all() and np.all(np.diff(s, axis=1) <= 0)
    exact_s, exact_i = Searcher(engine, images=g).search(queries, 300)
    for q in range(len(queries)):  # rescored exactly
        full = dict(zip(exact_i[q].tolist(), exact_s[q].tolist()))
        np.testing.assert_allclose(s[q], [full[j] for j in i[q]], atol=2e-6)


def test_bad_arguments(engines, galleries, tmp_path):
    engine = engines["t2i", "LogSumExp"]
    images, _ = galleries["t2i", "LogSumExp"]
    for bad in (-1, 1.5, True, "10"):
        with pytest.raises(OptionsError, match="candidates"):
            Searcher(engine, images=images, options=SearchOptions(candidate_plan="index", candidates=bad))
    with pytest.raises(CandidateIndexError, match="index type"):
        build_index(images, index_type="lsh")


def test_search_cli_candidates(small_engines, tmp_path, capsys):
    from runtime.search import main

    engine = str(small_engines["t2i"])
    np.save(tmp_path / "ims.npy", random_regions(20, seed=1))
    assert (
        main(
            [
                "--engine",
                engine,
                "--gallery",
                str(tmp_path / "g"),
                "--images",
                str(tmp_path / "ims.npy"),
                "--index",
                "flat",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (tmp_path / "g" / "images" / "candidates.json").is_file()
    capsys.readouterr()
    queries = random_captions(3, seed=4)
    outs = []
    for extra in ([], ["--candidates", "20"], ["--candidates", "0"], ["--candidates", "5"]):
        assert main(["--engine", engine, "--gallery", str(tmp_path / "g"), "--json", "-k", "3", *extra, *queries]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0] == outs[1] == outs[2]
    assert [len(r["results"]) for r in outs[3]] == [3, 3, 3]
    assert main(["--engine", engine, "--gallery", str(tmp_path / "g"), "--candidates", "-3", "dog"]) == 2
    assert "candidates" in capsys.readouterr().err


def test_in_memory_gallery_gets_an_index_that_is_not_stored(engines, tmp_path):
    from runtime.gallery import ImageGallery

    engine = engines["t2i", "LogSumExp"]
    emb, gram = engine.encode_images(random_regions(25, seed=3))
    g = ImageGallery.from_arrays(emb, gram)
    queries = random_captions(3, seed=5)
    s, i = Searcher(engine, images=g, options=SearchOptions(candidate_plan="index", candidates=8)).search(queries, 4)
    exact_s, exact_i = Searcher(engine, images=g).search(queries, 25)
    for q in range(3):
        full = dict(zip(exact_i[q].tolist(), exact_s[q].tolist()))
        np.testing.assert_allclose(s[q], [full[j] for j in i[q]], atol=2e-6)
    assert not (g.folder / "candidates.json").exists()


def test_service_executor_two_stage(small_engines, tmp_path):
    """The search service's executor with ``candidates``: exact results at M >= N, rescored candidates
    below, and appends build and extend the index (``serve.py --candidates``)."""
    from runtime.service.executor import Executor

    def search(executor, queries, k):
        return executor.search("text_to_image", executor.prepare("text_to_image", queries), k)

    engine = small_engines["t2i"]
    with ScanEngine.open(engine, EngineOptions(backend="onnxruntime")) as e:
        build_image_gallery(e, random_regions(20, seed=1), tmp_path / "images", options=WriteOptions(progress=False))
    queries = random_captions(3, seed=2)
    exact = Executor.open([engine], tmp_path, EngineOptions(backend="onnxruntime"))
    full = Executor.open(
        [engine], tmp_path, EngineOptions(backend="onnxruntime"), SearchOptions(candidate_plan="index", candidates=20)
    )
    try:
        a, b = search(exact, queries, 4), search(full, queries, 4)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.scores, b.scores)
    finally:
        exact.close()
        full.close()
    two = Executor.open(
        [engine], tmp_path, EngineOptions(backend="onnxruntime"), SearchOptions(candidate_plan="index", candidates=6)
    )
    try:
        assert two.describe()["candidates"] == 6
        hits = search(two, queries, 4)  # an index in memory: a search writes none
        assert (hits.ids >= 0).all() and not (tmp_path / "images" / "candidates.json").exists()
        two.append_images(random_regions(5, seed=3), None)  # the append builds it...
        meta = json.loads((tmp_path / "images" / "candidates.json").read_text())
        assert meta["count"] == 25 and meta["extended_from"] == 0
        two.append_images(random_regions(2, seed=4), None)  # ... and the next one extends it
        meta = json.loads((tmp_path / "images" / "candidates.json").read_text())
        assert meta["count"] == 27 and meta["extended_from"] == 25
        assert (search(two, queries, 4).ids >= 0).all()
    finally:
        two.close()


def _appends_while_searching(small_engines, tmp_path, monkeypatch, seconds: float) -> None:
    """Appends and two-stage searches at once, as ``serve.py --candidates M --workers 2`` runs them: one
    thread appends while two search. Only the appending thread writes the index (a search still on the
    previous generation used to rebuild and overwrite the newer one), each append extends it (no full
    rebuild), and every result is the two-stage search of a generation the search could have seen, made
    afresh, with each score its item's exact SCAN score on that generation."""
    import threading
    import time

    from runtime.gallery import ImageGallery, index
    from runtime.service.executor import Executor

    engine = small_engines["t2i"]
    with ScanEngine.open(engine, EngineOptions(backend="onnxruntime")) as e:
        build_image_gallery(e, random_regions(20, seed=1), tmp_path / "images", options=WriteOptions(index="flat"))
    saves, save = [], index._save

    def spy(built):
        saves.append((threading.current_thread().name, built.meta["extended_from"], built.meta["count"]))
        save(built)

    monkeypatch.setattr(index, "_save", spy)
    queries, k = random_captions(3, seed=2), 3
    chunks = [random_regions(2, seed=100 + i) for i in range(200)]  # each generation's items, known in advance
    one_thread, two_stage = (
        EngineOptions(backend="onnxruntime", threads=1),
        SearchOptions(candidate_plan="index", candidates=12),
    )
    executor = Executor.open([engine], tmp_path, one_thread, two_stage)
    results, errors, stop = [], [], threading.Event()

    def searching():
        try:
            while not stop.is_set():
                before = executor.sizes()["images"]
                hits = executor.search("text_to_image", executor.prepare("text_to_image", queries), k)
                results.append((before, executor.sizes()["images"], hits.scores, hits.ids))
        except Exception as e:  # reported below, not lost in a thread
            errors.append(e)

    def appending():
        try:
            for chunk in chunks:
                if stop.is_set():
                    break
                executor.append_images(chunk, None)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=searching, name=f"search-{i}") for i in range(2)]
    threads.append(threading.Thread(target=appending, name="append"))
    try:
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors
        appended = [s for s in saves if s[0] == "append"]
        assert saves == appended and len(appended) >= 2  # no reader wrote the index
        assert all(start == count - 2 for _, start, count in appended)  # every append extended it
        final = ImageGallery.load(tmp_path / "images")
        sizes = {n for before, after, _, _ in results for n in range(before, after + 1, 2)}
        expected = {}  # per generation (its size): two-stage search of a fresh copy, and exact search of all
        with ScanEngine.open(engine, EngineOptions(backend="onnxruntime")) as e:
            for n in sizes:
                copy = ImageGallery.from_arrays(final.images[:n], final.image_gram[:n])  # an index of its own
                s, i = Searcher(e, images=copy).search(queries, n)
                exact = [dict(zip(row_i.tolist(), row_s.tolist())) for row_s, row_i in zip(s, i)]
                expected[n] = (
                    *Searcher(e, images=copy, options=SearchOptions(candidate_plan="index", candidates=12)).search(
                        queries, k
                    ),
                    exact,
                )
        assert len(results) >= 4
        for before, after, scores, ids in results:
            n = next((n for n in range(before, after + 1, 2) if np.array_equal(ids, expected[n][1])), None)
            assert n is not None, (before, after, ids)  # the two-stage result of a generation it could see
            np.testing.assert_allclose(scores, expected[n][0], rtol=0, atol=2e-6)
            for row, (q_ids, q_scores) in enumerate(zip(ids, scores)):  # each score the item's exact score
                np.testing.assert_allclose(q_scores, [expected[n][2][row][j] for j in q_ids], rtol=0, atol=2e-6)
    finally:
        stop.set()
        executor.close()


def test_appends_while_searching_never_rewrite_the_index(small_engines, tmp_path, monkeypatch):
    _appends_while_searching(small_engines, tmp_path, monkeypatch, seconds=5)


@pytest.mark.slow
def test_appends_while_searching_for_40_seconds(small_engines, tmp_path, monkeypatch):
    _appends_while_searching(small_engines, tmp_path, monkeypatch, seconds=40)


def test_auto_index_type_by_size():
    from runtime.gallery.index import AUTO_FLAT_MAX_VECTORS, IVFSQ_MAX_VECTORS, choose_type

    # flat up to 2^16 vectors, IVF-SQ above it (5K images x 36 regions), IVF-PQ for the largest
    assert choose_type(AUTO_FLAT_MAX_VECTORS) == "flat"
    assert choose_type(AUTO_FLAT_MAX_VECTORS + 1) == "ivfsq"
    assert choose_type(5000 * 36) == "ivfsq"
    assert choose_type(IVFSQ_MAX_VECTORS + 1) == "ivfpq"
    assert choose_type(5000 * 36, "flat") == "flat"  # an explicit type is kept


def test_unique_ids_matches_numpy_unique():
    from runtime.gallery.index import _unique_ids

    rng = np.random.default_rng(3)
    for n_ids, size in ((1, 5), (50, 0), (50, 7), (5000, 20000)):
        ids = rng.integers(0, n_ids, size)
        items, inverse = _unique_ids(ids, n_ids)
        ref_items, ref_inverse = np.unique(ids, return_inverse=True)
        np.testing.assert_array_equal(items, ref_items)
        np.testing.assert_array_equal(inverse, ref_inverse.reshape(-1))
        assert items.dtype.kind == "i" and inverse.dtype.kind == "i"


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_query_side_score_keeps_each_vectors_best_cosine(engines, tmp_path, kind):
    """The query-side score writes each (item, query vector) cosine in reverse result order, relying on faiss's
    rows coming back descending: it equals np.maximum.at over the same results, with few neighbours (so
    most items are reached by some query vectors only) and an approximate index whose rows still descend."""
    engine = engines["t2i", "LogSumExp"]
    g = build_image_gallery(
        engine, random_regions(300, seed=31), tmp_path, options=WriteOptions(progress=False, index=kind)
    )
    index = load_index(g, engine.manifest.image_encoder_id)
    ids, lengths = engine.tokenizer.encode_batch(random_captions(3, seed=32))
    stacked = np.concatenate([w[:n] for w, n in zip(engine.encode_ids(ids, lengths), lengths)])
    stacked = stacked / np.linalg.norm(stacked, axis=1, keepdims=True)
    dist, vid = index.index.search(stacked, 50)
    rows = np.where(vid >= 0, dist, -np.inf)
    assert np.all(rows[:, :-1] >= rows[:, 1:])  # what the score relies on: each row descends
    config = dataclasses.replace(engine.config, agg_func="Max")  # the per-vector best cosines, unmixed
    got, items = index._score(dist, vid, config, gallery_side=False)
    valid = vid >= 0
    last = np.where(valid, dist, np.inf).min(axis=1)
    owner = index.layout.owner(vid[valid])
    ref_items, u = np.unique(owner, return_inverse=True)
    mat = np.repeat(last[None, :], len(ref_items), axis=0)
    np.maximum.at(mat, (u, np.nonzero(valid)[0]), dist[valid])
    np.testing.assert_array_equal(items, ref_items)
    np.testing.assert_array_equal(got, mat.max(axis=1))
