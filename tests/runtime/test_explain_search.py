"""Searcher.explain: the explanation of one (query, gallery item) pair equals the search's score for that pair
(1e-5) in both directions, for one model and an ensemble; galleries keep region boxes with the cache."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.engine import ScanEngine
from runtime.explain import EnsembleExplanation, Explanation
from runtime.gallery import GalleryError, GalleryFolder, ImageGallery
from runtime.options import EngineOptions, WriteOptions
from runtime.searcher import Searcher, SearchError
from runtime.tokenizer import TokenizerError
from tests.runtime.conftest import random_captions, random_regions

TOL = 1e-5
N_IMAGES, N_CAPTIONS, R = 9, 11, 5
WRITE = WriteOptions(progress=False, append=True)


def random_boxes(n: int, seed: int = 0) -> np.ndarray:
    xy = np.random.default_rng(seed).uniform(0, 100, (n, R, 2)).astype(np.float32)
    return np.concatenate([xy, xy + 20], axis=2)


@pytest.fixture(scope="module")
def world(small_engines, tmp_path_factory):
    """Both small models, and one gallery folder per layout (t2i alone, i2t alone, the two as an ensemble),
    images with names and boxes, built in two appends."""
    engines = {m: ScanEngine.open(p, EngineOptions(backend="onnxruntime")) for m, p in small_engines.items()}
    regions, captions, boxes = random_regions(N_IMAGES, seed=5), random_captions(N_CAPTIONS, seed=6), random_boxes(9)
    names = [f"img{i}" for i in range(N_IMAGES)]
    root = tmp_path_factory.mktemp("explain_search")
    folders = {}
    for key, members in (("t2i", ["t2i"]), ("i2t", ["i2t"]), ("ensemble", ["t2i", "i2t"])):
        folder = GalleryFolder(root / key, [engines[m] for m in members])
        for a, b in ((0, 4), (4, N_IMAGES)):
            folder.write_images(regions[a:b], names[a:b], WRITE, boxes=boxes[a:b])
        folder.write_captions(captions[:6], WRITE)
        folder.write_captions(captions[6:], WRITE)
        folders[key] = (root / key, [engines[m] for m in members])
    yield folders, regions, captions, boxes
    for e in engines.values():
        e.close()


def _searcher(world, key):
    folders = world[0]
    path, engines = folders[key]
    return Searcher.open(engines, path, weights=[0.7, 0.3] if key == "ensemble" else None)


@pytest.mark.parametrize("key", ["t2i", "i2t", "ensemble"])
def test_scores_equal_search_scores_both_directions(world, key):
    _, regions, captions, _ = world
    with _searcher(world, key) as s:
        kind = Explanation if key != "ensemble" else EnsembleExplanation
        # text -> image: every image's score for two captions
        for caption in captions[:2]:
            scores, ids = s.search([caption], N_IMAGES)
            for score, image in zip(scores[0], ids[0]):
                ex = s.explain(caption, int(image))
                assert isinstance(ex, kind)
                assert abs(ex.score - score) <= TOL, (key, caption, image)
        # image -> text, from region features (2-D or 3-D) and from the gallery's own image
        for row in (0, 7):
            scores, ids = s.search(regions[row : row + 1], N_CAPTIONS)
            by_id = s.search_prepared(s.image_queries([row]), N_CAPTIONS)
            for score, caption_id in zip(scores[0], ids[0]):
                assert abs(s.explain(regions[row], int(caption_id)).score - score) <= TOL
                assert abs(s.explain(regions[row : row + 1], int(caption_id)).score - score) <= TOL
            for score, caption_id in zip(by_id[0][0], by_id[1][0]):
                assert abs(s.explain(s.image_queries([row]), int(caption_id)).score - score) <= TOL
            # the gallery's encoding of an image scores as a search with its features (float32 cache)
            np.testing.assert_allclose(np.sort(by_id[0][0]), np.sort(scores[0]), atol=TOL)


def test_the_explanation_has_the_model_s_tokens_and_shapes(world):
    with _searcher(world, "t2i") as s:
        ex = s.explain("a dog zzzunknown .", 3)
        assert ex.words == ("<start>", "a", "dog", "<unk>", ".", "<end>")
        assert ex.attention.shape == (6, R) and ex.cross_attn == "t2i"
        np.testing.assert_allclose(ex.attention.sum(axis=1), 1, atol=TOL)
    with _searcher(world, "i2t") as s:
        ex = s.explain(world[1][2], 4)
        assert ex.words[0] == "<start>" and ex.words[-1] == "<end>"
        assert ex.attention.shape == (R, len(ex.words)) and ex.cross_attn == "i2t"
    with _searcher(world, "ensemble") as s:
        ex = s.explain("a dog .", 0)
        assert [m.cross_attn for m in ex.members] == ["t2i", "i2t"]
        assert ex.weights == pytest.approx((0.7, 0.3))
        assert ex.score == pytest.approx(0.7 * ex.members[0].score + 0.3 * ex.members[1].score, abs=TOL)


def test_bad_pairs_are_refused_clearly(world):
    with _searcher(world, "t2i") as s:
        with pytest.raises(SearchError, match=r"id: image id 9 is outside the gallery \(ids 0..8\)"):
            s.explain("a dog .", N_IMAGES)
        with pytest.raises(SearchError, match="id: expected an integer image id, received bool"):
            s.explain("a dog .", True)
        with pytest.raises(TokenizerError, match="empty query"):
            s.explain("  ", 0)
        with pytest.raises(SearchError, match="caption id -1 is outside"):
            s.explain(world[1][0], -1)
        with pytest.raises(SearchError, match="explain takes one image, received 2"):
            s.explain(world[1][:2], 0)
        with pytest.raises(SearchError, match=r"ids\[1\]: image id 99 is outside"):
            s.image_queries([0, 99])


def test_boxes_are_kept_appended_and_checked(world, tmp_path):
    folders, regions, _, boxes = world
    for key in ("t2i", "ensemble"):
        with _searcher(world, key) as s:
            np.testing.assert_array_equal(s.boxes(5), boxes[5])
            for g in s.galleries("images"):
                np.testing.assert_array_equal(g.boxes, boxes)
    path, engines = folders["t2i"]
    g = ImageGallery.load(path / "images", verify=True)  # the boxes' checksum too
    assert g.manifest["arrays"]["boxes"]["xxh3_64"] and g.boxes.dtype == np.float32
    g.close()
    folder = GalleryFolder(path, engines)
    with pytest.raises(GalleryError, match="the gallery has region boxes; append with --boxes"):
        folder.write_images(regions[:1], ["x"], WRITE)
    with pytest.raises(GalleryError, match=r"expected region boxes \(2, 5, 4\).*received float32\[2, 5\]"):
        folder.write_images(regions[:2], ["x", "y"], WRITE, boxes=boxes[:2, :, 0])
    with pytest.raises(GalleryError, match=r"expected region boxes \(1, 5, 4\).*received float32\[2, 5, 4\]"):
        folder.write_images(regions[:1], ["x"], WRITE, boxes=boxes[:2])
    # a gallery without boxes loads as before, refuses boxes on append, and explains without them
    plain = GalleryFolder(tmp_path, engines)
    plain.write_images(regions[:2], options=WRITE)
    with pytest.raises(GalleryError, match="the gallery has no region boxes; append without --boxes"):
        plain.write_images(regions[:1], options=WRITE, boxes=boxes[:1])
    with Searcher.open(engines, tmp_path) as s:
        assert s.boxes(1) is None
        assert s.explain("a dog .", 1).n_regions == R
    np.save(tmp_path / "boxes.npy", boxes[:1])
    plain2 = GalleryFolder(tmp_path / "b", engines)
    plain2.write_images(regions[:1], options=WRITE, boxes=tmp_path / "boxes.npy")
    with pytest.raises(GalleryError, match=r"--boxes .*nope\.npy: no such file"):
        plain2.write_images(regions[:1], options=WRITE, boxes=tmp_path / "nope.npy")


def test_shards_split_and_merge_keep_the_boxes(world, tmp_path):
    from runtime.gallery.shards import merge, split

    folders, _, _, boxes = world
    split(folders["t2i"][0], tmp_path / "sharded", 2)
    parts = [ImageGallery.load(tmp_path / "sharded" / f"shard-{i}" / "images") for i in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([p.boxes for p in parts]), boxes)
    merge(tmp_path / "sharded", tmp_path / "merged")
    with ImageGallery.load(tmp_path / "merged" / "images", verify=True) as merged:
        np.testing.assert_array_equal(merged.boxes, boxes)
    for p in parts:
        p.close()
