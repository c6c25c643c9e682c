"""Ensembles: top-k of the weighted mean of the members' similarities, one gallery folder for all members.

The oracle is the reference model (export/model.py, PyTorch) of each member, loaded from the checkpoint
it was exported from, scoring the same data; its similarity matrices are averaged with the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from export.checkpoint import load_checkpoint
from runtime.engine import ScanEngine
from runtime.gallery import GalleryError, GalleryFolder, build_image_gallery
from runtime.gallery.members import ENSEMBLE
from runtime.options import EngineOptions, SearchOptions, WriteOptions
from runtime.searcher import Searcher, SearchError, check_weights
from tests.runtime.conftest import random_captions, random_regions
from tests.runtime.test_searcher import assert_same_ranking

APPEND = WriteOptions(progress=False, append=True)

# The exporter fails a graph that differs from PyTorch by more than 1e-5 (export/exporter.py); the
# members' runtime similarities are held to the same bound against the reference.
ATOL = 1e-5


def reference_sims(engine_path: Path, regions: np.ndarray, captions: list[str], tokenizer) -> np.ndarray:
    """(n_images, n_captions) from the reference model of the checkpoint ``engine_path`` was exported from."""
    model = load_checkpoint(engine_path.parent.parent / "run" / "model_best.pth.tar").model.eval()
    ids, lengths = tokenizer.encode_batch(captions)
    return model.sims(torch.from_numpy(regions), torch.from_numpy(ids).long(), torch.from_numpy(lengths).long()).numpy()


@pytest.fixture(scope="module")
def setup(small_engines, tmp_path_factory):
    """Two members (t2i LogSumExp, i2t Mean; other seeds), their shared data, one ensemble gallery."""
    paths = [small_engines["t2i"], small_engines["i2t"]]
    engines = [ScanEngine.open(p, EngineOptions(backend="onnxruntime")) for p in paths]
    regions = random_regions(23, seed=11)
    captions = random_captions(37, seed=12)
    root = tmp_path_factory.mktemp("ensemble") / "gal"
    names = [f"img_{i}.jpg" for i in range(len(regions))]
    images = GalleryFolder(root, engines).write_images(regions, names=names, options=APPEND).images
    caps = GalleryFolder(root, engines).write_captions(captions, options=APPEND).captions
    sims = [reference_sims(p, regions, captions, e.tokenizer) for p, e in zip(paths, engines)]
    yield engines, paths, regions, captions, root, images, caps, sims
    for e in engines:
        e.close()


def weighted(sims: list[np.ndarray], weights) -> np.ndarray:
    w = np.asarray(weights, np.float64) / np.sum(weights)
    return sum(wi * s.astype(np.float64) for wi, s in zip(w, sims))


WEIGHTS = [None, (0.3, 0.7), (5.0, 1.0)]


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("block", [1, 4, 1000])
@pytest.mark.parametrize("k", [1, 5, 30])
def test_text_to_image_equals_reference_average(setup, weights, block, k):
    engines, _, _, captions, _, images, _, sims = setup
    with Searcher(
        engines, images=images, weights=weights, options=SearchOptions(image_block=block, query_batch=4)
    ) as ensemble:
        scores, ids = ensemble.search(captions[:11], k)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and scores.shape == (11, k)
    avg = weighted(sims, weights or (1, 1))
    assert_same_ranking(scores, ids, avg[:, :11].T, k, atol=ATOL)


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("block", [1, 3, 1000])
@pytest.mark.parametrize("k", [1, 7, 50])
def test_image_to_text_equals_reference_average(setup, weights, block, k):
    engines, _, regions, _, _, _, caps, sims = setup
    with Searcher(
        engines, captions=caps, weights=weights, options=SearchOptions(caption_block=block, query_batch=2)
    ) as ensemble:
        scores, ids = ensemble.search(regions[:5], k)
    avg = weighted(sims, weights or (1, 1))
    assert_same_ranking(scores, ids, avg[:5], k, atol=ATOL)


def test_the_average_is_not_either_member(setup):
    """The oracle has teeth: on this data each member alone ranks differently from the ensemble."""
    engines, _, _, captions, _, images, _, sims = setup
    with Searcher(engines, images=images) as ensemble:
        _, ids = ensemble.search(captions, 23)
    for s in sims:
        alone = np.argsort(-s.T, axis=1, kind="stable")
        assert (alone != ids).any()


def test_one_member_equals_searcher(setup):
    engines, _, regions, captions, _, images, caps, _ = setup
    with Searcher(engines[:1], images=images[:1], captions=caps[:1]) as one:
        searcher = Searcher(engines[0], images=images[0], captions=caps[0])
        for queries in (captions[:6], regions[:4]):
            s1, i1 = one.search(queries, 8)
            s2, i2 = searcher.search(queries, 8)
            np.testing.assert_array_equal(i1, i2)
            np.testing.assert_array_equal(s1, s2)


def test_equal_weights_in_any_scale(setup):
    engines, _, _, captions, _, images, _, _ = setup
    results = []
    for w in (None, (1, 1), "0.5,0.5", (3.0, 3.0)):
        with Searcher(engines, images=images, weights=w) as ensemble:
            results.append(ensemble.search(captions[:5], 6))
    for s, i in results[1:]:
        np.testing.assert_array_equal(i, results[0][1])
        np.testing.assert_array_equal(s, results[0][0])


@pytest.mark.parametrize(
    "weights, match",
    [
        ((1.0,), r"one weight per engine \(2\), received 1"),
        ((1.0, 0.0), "positive finite"),
        ((1.0, -1.0), "positive finite"),
        ((1.0, float("nan")), "positive finite"),
        ((1.0, float("inf")), "positive finite"),
        ("0.5;0.5", "comma-separated"),
        ("a,b", "comma-separated"),
    ],
)
def test_bad_weights_refused(weights, match):
    with pytest.raises(SearchError, match=match):
        check_weights(weights, 2)


def test_weights_normalised():
    np.testing.assert_allclose(check_weights((3, 1), 2), [0.75, 0.25])
    np.testing.assert_allclose(check_weights(None, 3), [1 / 3] * 3)


def test_gallery_built_for_one_member_refused(setup, tmp_path):
    engines, paths, regions, _, _, _, _, _ = setup
    # A single-model gallery (runtime/search.py with one --engine) is not an ensemble's.
    build_image_gallery(engines[0], regions, tmp_path / "single" / "images", options=APPEND)
    with pytest.raises(GalleryError, match=rf"one model only.*no cache for member 2 \({paths[1]}\)"):
        GalleryFolder(tmp_path / "single", engines).load()
    # An ensemble gallery whose members file lists the first member only.
    GalleryFolder(tmp_path / "first", engines).write_images(regions, options=APPEND)
    members_file = tmp_path / "first" / "ensemble.json"
    data = json.loads(members_file.read_text())
    first_id = engines[0].manifest.image_encoder_id
    data["images"]["members"] = {k: v for k, v in data["images"]["members"].items() if k == first_id}
    members_file.write_text(json.dumps(data))
    with pytest.raises(GalleryError, match=rf"no cache for member 2 \({paths[1]}\).*--rebuild"):
        GalleryFolder(tmp_path / "first", engines).load()
    with pytest.raises(GalleryError, match=rf"no cache for member 2 \({paths[1]}\)"):
        GalleryFolder(tmp_path / "first", engines).write_images(regions, options=APPEND)  # append
    # ... and a rebuild with both members works.
    built = GalleryFolder(tmp_path / "first", engines).write_images(regions, options=WriteOptions(progress=False))
    assert [len(g) for g in built.images] == [len(regions)] * 2
    with pytest.raises(GalleryError, match=r"member 1 .* and member 2 .* are the same engine"):
        GalleryFolder(tmp_path / "twice", [engines[0], engines[0]])
    nothing = GalleryFolder(tmp_path / "nothing", engines)
    assert nothing.load().images is None
    assert "no ensemble images gallery" in nothing.missing("images")


def test_members_must_agree(setup, tmp_path):
    engines, _, regions, _, _, images, caps, _ = setup
    other = build_image_gallery(engines[1], regions[:20], tmp_path / "b", options=WriteOptions(progress=False))
    with pytest.raises(GalleryError, match=r"disagree on the images gallery.*holds 23 images.*20"):
        Searcher(engines, images=[images[0], other])
    renamed = build_image_gallery(
        engines[1], regions, tmp_path / "c", names=[f"x{i}" for i in range(23)], options=WriteOptions(progress=False)
    )
    with pytest.raises(GalleryError, match=r"names\[0\] is 'img_0.jpg'.*'x0'"):
        Searcher(engines, images=[images[0], renamed])
    with pytest.raises(GalleryError, match="built by another model"):
        Searcher(engines, images=[images[1], images[0]])
    with pytest.raises(SearchError, match=r"one gallery per engine \(2\), received 1"):
        Searcher(engines, captions=caps[:1])


def test_append_fails_for_one_member_leaves_all_unchanged(setup, tmp_path, monkeypatch):
    engines, _, regions, _, _, _, _, _ = setup
    root = tmp_path / "gal"
    GalleryFolder(root, engines).write_images(regions[:10], options=APPEND)
    before = (root / ENSEMBLE).read_text()
    folders = sorted(p.relative_to(root) for p in root.rglob("*"))

    def broken(*args, **kwargs):
        raise RuntimeError("the second member's encoder failed")

    monkeypatch.setattr(engines[1], "encode_images", broken)
    with pytest.raises(RuntimeError, match="second member"):
        GalleryFolder(root, engines).write_images(regions[10:15], options=APPEND)
    monkeypatch.undo()
    assert (root / ENSEMBLE).read_text() == before
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == folders  # nothing left behind
    assert [len(g) for g in GalleryFolder(root, engines).load().images] == [10, 10]
    # The same append, now working: both members extended, the old generation's folders removed.
    grown = GalleryFolder(root, engines).write_images(regions[10:15], options=APPEND).images
    assert [len(g) for g in grown] == [15, 15]
    index = json.loads((root / ENSEMBLE).read_text())
    assert index["generation"] == 2
    assert sorted(p.name for p in (root / "images").iterdir()) == sorted(
        Path(m["folder"]).name for m in index["images"]["members"].values()
    )
    for g in grown:  # each new member folder holds its generation's files only (the links to the last are gone)
        listed = {e["file"] for e in g.manifest["arrays"].values()} | {g.manifest.get("names_file")}
        assert {p.name for p in g.folder.iterdir() if not p.name.startswith(".")} == (listed | {"gallery.json"}) - {
            None
        }
    fresh = GalleryFolder(tmp_path / "fresh", engines).write_images(regions[:15], options=APPEND).images
    for a, b in zip(grown, fresh):
        # Encoded in batches of 10 + 5 against one of 15: ONNX Runtime's GEMM may sum in another order for
        # another batch size (1.17 does: 6e-8; the same batch twice is bit-identical), so a few float32 ulps of
        # these unit-norm embeddings.
        np.testing.assert_allclose(np.asarray(a.images), np.asarray(b.images), rtol=0, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(a.ids), np.asarray(b.ids))


def test_caption_append_extends_every_member(setup, tmp_path):
    engines, _, regions, captions, _, _, _, sims = setup
    root = tmp_path / "gal"
    GalleryFolder(root, engines).write_captions(captions[:20], options=APPEND)
    caps = GalleryFolder(root, engines).write_captions(captions[20:], options=APPEND).captions
    assert [len(c) for c in caps] == [len(captions)] * 2 and caps[0].texts == captions
    with Searcher(engines, captions=GalleryFolder(root, engines).load().captions) as ensemble:
        scores, ids = ensemble.search(regions[:4], 10)
    assert_same_ranking(scores, ids, weighted(sims, (1, 1))[:4], 10, atol=ATOL)


def test_members_with_other_features_refused(setup, tmp_path):
    from tests.runtime.conftest import export_small

    engines, _, regions, _, _, _, _, _ = setup
    wide = export_small(tmp_path / "wide", seed=3, img_dim=16)
    with ScanEngine.open(wide, EngineOptions(backend="onnxruntime")) as w:
        with pytest.raises(SearchError, match=r"different region features.*img_dim 12.*img_dim 16"):
            Searcher([engines[0], w])
        with pytest.raises(GalleryError, match="different region features"):
            GalleryFolder(tmp_path / "gal", [engines[0], w]).write_images(regions, options=APPEND)


def test_interrupted_build_leaves_nothing_in_the_way(setup, tmp_path):
    """A writer killed before its commit leaves a new-generation folder: ignored by readers, removed next time."""
    engines, _, regions, _, _, _, _, _ = setup
    root = tmp_path / "gal"
    GalleryFolder(root, engines).write_images(regions[:6], options=APPEND)
    orphan = root / "images" / f"{engines[0].manifest.image_encoder_id[:12]}.2"
    orphan.mkdir()
    (orphan / "gallery.json").write_text("half written")
    assert [len(g) for g in GalleryFolder(root, engines).load().images] == [6, 6]
    assert [len(g) for g in GalleryFolder(root, engines).write_images(regions[6:9], options=APPEND).images] == [9, 9]
    assert (orphan / "gallery.json").read_text() != "half written"  # generation 2 rebuilt over it
    assert len(list((root / "images").iterdir())) == 2


def test_open_ensemble_keeps_serving_across_an_append(setup, tmp_path):
    engines, _, regions, captions, _, _, _, _ = setup
    root = tmp_path / "gal"
    GalleryFolder(root, engines).write_images(regions[:12], options=APPEND)
    with Searcher(engines, images=GalleryFolder(root, engines).load().images) as before:
        want = before.search(captions[:4], 5)
        GalleryFolder(root, engines).write_images(regions[12:], options=APPEND)  # removes the old folders
        got = before.search(captions[:4], 5)  # still the generation it opened (memory-mapped)
    np.testing.assert_array_equal(got[1], want[1])
    with Searcher(engines, images=GalleryFolder(root, engines).load().images) as after:
        assert len(after.galleries("images")[0]) == len(regions)
        assert set(after.search(captions[:1], len(regions))[1][0]) == set(range(len(regions)))


def test_tensorrt_member_scores_its_resident_blocks(monkeypatch, tmp_path):
    """Backend.block_sims under TensorRT (stand-in): the gallery's blocks stay in (fake) device memory. An
    ensemble of one model served twice (TensorRT and ONNX Runtime) equals that model alone, whatever the weights."""
    from runtime.manifest import load_manifest
    from tests.fake_tensorrt import build_with_fakes, export_golden

    export = export_golden("t2i_lse_f30k", tmp_path / "golden")
    _, _, alloc = build_with_fakes(monkeypatch, export, "--topk-max", "5")
    m = load_manifest(export)
    rng = np.random.default_rng(3)
    regions = rng.standard_normal((100, 36, m.config.img_dim)).astype(np.float32)
    words = ["a", "dog", "man", "on", "the", "beach", "two", "red", "car", "."]
    texts = [" ".join(rng.choice(words, size=rng.integers(1, 15))) for _ in range(50)]
    with (
        ScanEngine(m, EngineOptions(backend="onnxruntime")) as ref,
        ScanEngine(m, EngineOptions(backend="tensorrt")) as trt,
    ):
        images = GalleryFolder(tmp_path / "gal", [ref, trt]).write_images(regions, options=APPEND).images
        captions = GalleryFolder(tmp_path / "gal", [ref, trt]).write_captions(texts, options=APPEND).captions
        assert images[0].folder == images[1].folder  # one encoder, one cache
        with Searcher(ref, images=images[0], captions=captions[0]) as alone:
            want = alone.search(texts[:12], 4), alone.search(regions[:12], 6)
        with Searcher(
            [trt, ref], images=images, captions=captions, weights=(0.3, 0.7), options=SearchOptions(image_block=100)
        ) as ens:
            got = ens.search(texts[:12], 4), ens.search(regions[:12], 6)
            uploaded = list(ens._upload(ens._generation, "images", 0))
            assert [offset for offset, _ in uploaded] == [0, 64]  # capped to the plan's profile
            assert all(type(v).__name__ == "DeviceArray" for _, feeds in uploaded for v in feeds.values())
    for (gs, gi), (ws, wi) in zip(got, want):
        np.testing.assert_array_equal(gi, wi)
        np.testing.assert_allclose(gs, ws, rtol=1e-5, atol=1e-6)
    assert not alloc.live and not alloc.host_live


def test_members_blocked_differently_line_up(setup):
    """A member whose backend blocks the gallery otherwise (CuPy merges resident blocks) still adds up row by row."""
    engines, _, regions, captions, _, images, caps, sims = setup
    with Searcher(
        engines, images=images, captions=caps, weights=(0.4, 0.6), options=SearchOptions(image_block=4, caption_block=5)
    ) as ens:
        # member 2's galleries in other blocks, uploaded before the first search would upload them
        other = Searcher(
            engines[1], images=images[1], captions=caps[1], options=SearchOptions(image_block=3, caption_block=2)
        )
        for kind in ("images", "captions"):
            ens._generation._made[("upload", kind, 1)] = other._upload(other._generation, kind, 0)
        text = ens.search(captions[:7], 9)
        image = ens.search(regions[:5], 12)
        assert [o for o, _ in ens._upload(ens._generation, "images", 1)] == list(range(0, 23, 3))
    avg = weighted(sims, (0.4, 0.6))
    assert_same_ranking(*text, avg[:, :7].T, 9, atol=ATOL)
    assert_same_ranking(*image, avg[:5], 12, atol=ATOL)
