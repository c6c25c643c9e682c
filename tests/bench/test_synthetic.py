"""Synthetic benchmark data: galleries made through the gallery module, reproducible whatever their size."""

from __future__ import annotations

import numpy as np
import pytest

from bench.synthetic import ImageStore, VectorPool, caption_texts, synthetic_caption_gallery, vocab_json
from runtime.gallery import CaptionGallery, GalleryError, ImageGallery
from runtime.options import EngineOptions, WriteOptions
from runtime.vocab import Vocabulary


@pytest.mark.parametrize("pooled", [False, True])
def test_synthetic_caption_gallery_has_the_built_layout(pooled):
    pool = VectorPool(0, 8) if pooled else None
    g = synthetic_caption_gallery(np.random.default_rng(0), 50, 8, pool)
    assert np.all(np.diff(g.lengths) >= 0) and g.offsets[-1] == len(g.words) == g.lengths.sum()
    assert sorted(g.ids.tolist()) == list(range(50)) and len(g.texts) == 50
    assert g.lengths.min() >= 5 and g.lengths.max() <= 42  # 3..40 words + <start>/<end>
    np.testing.assert_allclose(np.linalg.norm(g.words, axis=1), 1.0, rtol=1e-5)
    total = sum(words.shape[0] for _, words, _ in g.blocks(16))
    assert total == 50


def test_image_store_rows_do_not_depend_on_the_final_size():
    a, b = ImageStore(0, 3, 8), ImageStore(0, 3, 8)
    a.ensure(5)
    a.ensure(1500)  # grown across a chunk boundary
    b.ensure(1500)
    np.testing.assert_array_equal(a.images, b.images)
    g = a.gallery(1500)
    np.testing.assert_allclose(g.image_gram, g.images @ g.images.transpose(0, 2, 1), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(g.images, axis=2), 1.0, rtol=1e-5)
    assert len(g) == 1500 and g.ids.tolist() == list(range(1500))
    assert isinstance(g, ImageGallery) and g.manifest["kind"] == "images" and g.manifest["count"] == 1500


def test_synthetic_captions_are_in_vocabulary():
    vocab = Vocabulary.from_dict(vocab_json(50))
    texts = caption_texts(np.random.default_rng(0), 20, 50)
    assert all(w in vocab for t in texts for w in t.split())


def test_gallery_from_arrays_checks_the_layout():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((4, 3, 8), dtype=np.float32)
    with pytest.raises(GalleryError, match="image_gram"):
        ImageGallery.from_arrays(images, np.zeros((4, 3, 4), np.float32))
    with pytest.raises(GalleryError, match="one name per image"):
        ImageGallery.from_arrays(images, np.zeros((4, 3, 3), np.float32), names=["a"])
    words = rng.standard_normal((9, 8), dtype=np.float32)
    with pytest.raises(GalleryError, match="non-decreasing"):
        CaptionGallery.from_arrays(words, [5, 4], ["a", "b"])
    with pytest.raises(GalleryError, match="expected 8 rows"):
        CaptionGallery.from_arrays(words, [4, 4], ["a", "b"])
    with pytest.raises(GalleryError, match="one id and one text"):
        CaptionGallery.from_arrays(words, [4, 5], ["a"])
    g = CaptionGallery.from_arrays(words, [4, 5], ["a", "b"], ids=[1, 0])
    assert g.offsets.tolist() == [0, 4, 9] and g.ids.tolist() == [1, 0] and g.manifest["count"] == 2


def test_galleries_from_arrays_search_like_the_built_ones(golden, exported, tmp_path):
    """The in-memory galleries the benchmark searches answer exactly as the built (written) ones."""
    from bench.evaluation import load_split
    from runtime.engine import ScanEngine
    from runtime.gallery import build_caption_gallery, build_image_gallery
    from runtime.searcher import Searcher

    with ScanEngine.open(exported[golden.name], EngineOptions(backend="onnxruntime")) as engine:
        regions, captions = load_split(golden, "test", engine.config.img_dim)
        built_images = build_image_gallery(engine, regions, tmp_path / "images", options=WriteOptions(progress=False))
        built_captions = build_caption_gallery(
            engine, captions, tmp_path / "captions", options=WriteOptions(progress=False)
        )
        images = ImageGallery.from_arrays(np.asarray(built_images.images), np.asarray(built_images.image_gram))
        texts = CaptionGallery.from_arrays(
            np.asarray(built_captions.words), built_captions.lengths, built_captions.texts, ids=built_captions.ids
        )
        for built, memory, queries in (
            (built_images, images, captions[:7]),
            (built_captions, texts, np.asarray(regions[:3])),
        ):
            kind = "images" if built is built_images else "captions"
            want = Searcher(engine, **{kind: built}).search(queries, 5)
            got = Searcher(engine, **{kind: memory}).search(queries, 5)
            np.testing.assert_array_equal(got[1], want[1])
            np.testing.assert_array_equal(got[0], want[0])


# ---------------------------------------------------------------------------------------------- scene stream


def test_scene_stream_is_deterministic_and_chunked():
    from bench.synthetic import SceneStream

    a, b = SceneStream(16, seed=3, chunk=7), SceneStream(16, seed=3, chunk=7)
    first = np.concatenate([c.copy() for c in a.chunks(20)])
    assert first.shape == (20, 36, 16) and first.dtype == np.float32
    np.testing.assert_array_equal(first, np.concatenate([c.copy() for c in b.chunks(20)]))
    np.testing.assert_array_equal(first[:9], np.concatenate([c.copy() for c in b.chunks(9)]))  # prefix: same images
    assert a.captions(4) == b.captions(4) and len(a.captions(4)) == 20
    other = np.concatenate([c.copy() for c in SceneStream(16, seed=4, chunk=7).chunks(20)])
    assert not np.array_equal(first, other)
    # every region is a unit vector or zero; zero regions are where the layout says
    norms = np.linalg.norm(first, axis=-1)
    codes = np.concatenate([a.layout(c)["codes"] for c in range(3)])[:20]
    np.testing.assert_allclose(norms[codes != a.zero_code], 1.0, rtol=1e-5)
    assert np.all(norms[codes == a.zero_code] == 0)


def test_scene_stream_images_show_what_their_captions_name():
    """Captions come from each image's own layout: the object words of image i's captions are objects of
    image i, and its object regions point at their prototype (object + colour + size)."""
    from bench.demo.data import OBJECTS
    from bench.synthetic import SceneStream

    s = SceneStream(64, seed=0, chunk=50)
    caps, lay, x = s.captions(50), s.layout(0), s.features(0)
    for i in range(50):
        shown = {OBJECTS[t] for t in lay["objects"][i, : lay["n_objects"][i], 0]}
        named = {w for c in caps[5 * i : 5 * i + 5] for w in c.lower().split() if w in OBJECTS}
        assert named and named <= shown
        obj = lay["codes"][i] < s.scene_code
        assert obj.sum() == lay["n_objects"][i]
        proto = s.base[lay["codes"][i][obj]]
        cos = np.sum(x[i][obj] * proto, axis=1) / np.linalg.norm(proto, axis=1)
        assert cos.min() > 0.7  # noise of norm ~0.6 against a prototype of norm ~1.4


def test_streamed_gallery_equals_a_one_shot_build(tmp_path):
    """Chunks of 13 images re-batched by 8 (copies across chunk boundaries, which the stream overwrites)."""
    from bench.synthetic import SceneStream
    from runtime.engine import ScanEngine
    from runtime.gallery import build_image_gallery
    from runtime.gallery.images import RegionStream
    from tests.runtime.conftest import export_small

    manifest = export_small(tmp_path / "model", img_dim=24)
    with ScanEngine.open(manifest, EngineOptions(backend="onnxruntime")) as engine:
        s = SceneStream(engine.config.img_dim, seed=1, chunk=13)
        whole = np.concatenate([c.copy() for c in s.chunks(40)])
        opts = WriteOptions(progress=False, dtype="float16")
        one = build_image_gallery(engine, whole, tmp_path / "one", batch=8, options=opts)
        streamed = build_image_gallery(
            engine, RegionStream(40, 36, s.chunks(40)), tmp_path / "stream", batch=8, options=opts
        )
        for name in ("images", "image_gram", "ids"):
            np.testing.assert_array_equal(getattr(one, name), getattr(streamed, name))
        assert streamed.manifest["arrays"]["images"]["xxh3_64"] == one.manifest["arrays"]["images"]["xxh3_64"]
        with pytest.raises(GalleryError, match="promised 41 images and gave 40"):
            build_image_gallery(engine, RegionStream(41, 36, s.chunks(40)), tmp_path / "short", options=opts)
        with pytest.raises(GalleryError, match="adding up to 30 images"):
            build_image_gallery(engine, RegionStream(30, 36, s.chunks(40)), tmp_path / "long", options=opts)
        assert not (tmp_path / "short" / "gallery.json").exists() and not (tmp_path / "long" / "gallery.json").exists()
