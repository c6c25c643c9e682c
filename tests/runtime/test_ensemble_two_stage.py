"""Two-stage ensemble search: candidates from the members' indexes, then the exact ensemble score."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.engine import ScanEngine
from runtime.gallery import GalleryFolder
from runtime.options import EngineOptions, OptionsError, SearchOptions, WriteOptions
from runtime.searcher import Searcher
from tests.runtime.conftest import random_captions, random_regions
from tests.runtime.test_ensemble import ATOL, reference_sims, weighted

pytest.importorskip("faiss")

WEIGHTS = (0.3, 0.7)


@pytest.fixture(scope="module")
def setup(small_engines, tmp_path_factory):
    paths = [small_engines["t2i"], small_engines["i2t"]]
    engines = [ScanEngine.open(p, EngineOptions(backend="onnxruntime")) for p in paths]
    regions, captions = random_regions(40, seed=41), random_captions(60, seed=42)
    root = tmp_path_factory.mktemp("ensemble_two_stage") / "gal"
    images = GalleryFolder(root, engines).write_images(regions, options=WriteOptions(progress=False)).images
    caps = GalleryFolder(root, engines).write_captions(captions, options=WriteOptions(progress=False)).captions
    avg = weighted([reference_sims(p, regions, captions, e.tokenizer) for p, e in zip(paths, engines)], WEIGHTS)
    yield engines, regions, captions, images, caps, avg
    for e in engines:
        e.close()


def restricted_topk(row: np.ndarray, allowed: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference top-k of one query's scores ``row`` over the items ``allowed`` only (ties: lower id)."""
    masked = np.full_like(row, -np.inf)
    masked[allowed] = row[allowed]
    order = np.argsort(-masked, kind="stable")[: min(k, len(allowed))]
    return masked[order], order


@pytest.mark.parametrize("source", ["union", "first"])
def test_two_stage_is_the_exact_ensemble_score_of_the_proposed_items(setup, source):
    engines, regions, captions, images, caps, avg = setup
    with Searcher(
        engines,
        images=images,
        captions=caps,
        weights=WEIGHTS,
        options=SearchOptions(candidate_plan="index", candidates=6, candidate_source=source),
    ) as e:
        for queries, sims, kind in ((captions[:8], avg.T, "images"), (regions[:6], avg, "captions")):
            scores, ids = e.search(queries, 5)
            # the items the candidates proposed, by caption id (caption storage is sorted by length)
            gallery = e.galleries(kind)[0]
            if kind == "images":
                members = [[w[:n] for w, n in zip(*_encoded_text(m, queries))] for m in engines]
            else:
                members = [list(m.encode_images(queries)[0]) for m in engines]
            proposals = _proposals(e, kind, members)
            for q, positions in enumerate(proposals):
                allowed = np.asarray(gallery.ids)[positions]
                assert len(allowed) >= 6  # M = 6 from each member asked
                want_s, want_i = restricted_topk(sims[q], allowed, 5)
                np.testing.assert_allclose(scores[q, : len(want_s)], want_s, atol=ATOL)
                gaps = np.abs(np.diff(want_s))
                if (gaps > ATOL).all():  # no near-ties: the order is determined
                    np.testing.assert_array_equal(ids[q, : len(want_i)], want_i)


def _encoded_text(engine, queries):
    ids, lengths = engine.tokenizer.encode_batch(queries)
    return engine.encode_ids(ids, lengths), lengths


def _index(searcher, kind, member):
    return searcher.two_stage.index(searcher.engines[member], searcher.galleries(kind)[member], kind)


def _proposals(searcher, kind, vectors):
    return searcher.two_stage.proposals(lambda i: _index(searcher, kind, i), searcher.engines, vectors)


def test_union_proposes_every_members_candidates(setup):
    engines, _, captions, images, _, _ = setup
    with Searcher(
        engines, images=images, weights=WEIGHTS, options=SearchOptions(candidate_plan="index", candidates=5)
    ) as e:
        vectors = [[w[:n] for w, n in zip(*_encoded_text(m, captions[:6]))] for m in engines]
        union = _proposals(e, "images", vectors)
        singles = [_index(e, "images", i).search(v, m.config, 5) for i, (m, v) in enumerate(zip(engines, vectors))]
    for q, u in enumerate(union):
        for single in singles:
            assert set(single[q]) <= set(u)
        assert len(u) <= 10 and np.all(np.diff(u) > 0)
    assert any(len(u) > 5 for u in union)  # the members do propose different items here


def test_candidates_covering_the_gallery_equal_exact(setup):
    engines, regions, captions, images, caps, _ = setup
    with (
        Searcher(engines, images=images, captions=caps, weights=WEIGHTS) as exact,
        Searcher(
            engines,
            images=images,
            captions=caps,
            weights=WEIGHTS,
            options=SearchOptions(candidate_plan="index", candidates=1000),
        ) as covering,
    ):
        for queries in (captions[:5], regions[:4]):
            s1, i1 = exact.search(queries, 7)
            s2, i2 = covering.search(queries, 7)
            np.testing.assert_array_equal(i1, i2)
            np.testing.assert_array_equal(s1, s2)


def test_bad_candidate_source_refused(setup):
    engines, _, _, images, _, _ = setup
    with pytest.raises(OptionsError, match="candidate_source must be one of"):
        Searcher(engines, images=images, options=SearchOptions(candidate_source="best"))


def test_cli_and_service_search_the_two_stage_ensemble(setup, small_engines, tmp_path, capsys):
    """search.py and the service with two --engine and --candidates answer as the searcher with candidates=M."""
    import json

    from runtime.search import main as search
    from runtime.service.executor import Executor

    engines, regions, captions, _, _, _ = setup
    np.save(tmp_path / "ims.npy", regions)
    (tmp_path / "caps.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    flags = ["--engine", str(small_engines["t2i"]), "--engine", str(small_engines["i2t"]), "--weights", "0.3,0.7"]
    gal = tmp_path / "gal"
    build = [*flags, "--gallery", str(gal), "--images", str(tmp_path / "ims.npy"), "--captions"]
    assert search([*build, str(tmp_path / "caps.txt"), "--index", "flat", "--no-progress"]) == 0
    assert all((gal / m).joinpath("candidates.json").is_file() for m in _member_folders(gal))  # built with them
    two_stage = ["--candidates", "6", "--candidate-source", "first", "--candidate-plan", "index"]
    assert search([*flags, *two_stage, "--gallery", str(gal), "--json", "-k", "4", *captions[:3]]) == 0
    got = json.loads(capsys.readouterr().out)

    images = GalleryFolder(gal, engines).load().images
    with Searcher(
        engines,
        images=images,
        weights=WEIGHTS,
        options=SearchOptions(candidate_plan="index", candidates=6, candidate_source="first"),
    ) as e:
        scores, ids = e.search(captions[:3], 4)
    assert [[r["id"] for r in q["results"]] for q in got] == ids.tolist()
    options = SearchOptions(candidate_plan="index", candidates=6, candidate_source="first")
    executor = Executor(Searcher.open(engines, gal, weights=WEIGHTS, options=options), ["t2i", "i2t"], gal)
    hits = executor.search("text_to_image", executor.prepare("text_to_image", captions[:3]), 4)
    assert hits.ids.tolist() == ids.tolist()
    np.testing.assert_allclose(hits.scores, scores, rtol=0, atol=1e-6)
    assert executor.describe()["candidates"] == 6
    appended = executor.append_images(random_regions(2, seed=99), None)  # the index follows the append
    assert appended.count == 42
    assert executor.search("text_to_image", executor.prepare("text_to_image", captions[:1]), 42).ids.shape == (1, 42)


def _member_folders(gal):
    import json

    index = json.loads((gal / "ensemble.json").read_text())
    return [m["folder"] for kind in ("images", "captions") for m in index[kind]["members"].values()]
