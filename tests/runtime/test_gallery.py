"""Gallery caches: build, append, memory-mapped load, model binding, corruption and interruption."""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.engine import ScanEngine
from runtime.gallery import CaptionGallery, GalleryError, ImageGallery, build_caption_gallery, build_image_gallery
from runtime.options import EngineOptions, WriteOptions
from tests.runtime.conftest import random_captions, random_regions


@pytest.fixture(scope="module")
def engines(small_engines):
    opened = {m: ScanEngine.open(p, EngineOptions(backend="onnxruntime")) for m, p in small_engines.items()}
    yield opened
    for e in opened.values():
        e.close()


def test_image_gallery_roundtrip_and_append(engines, tmp_path):
    engine = engines["t2i"]
    regions = random_regions(10, seed=3)
    names = [f"img{i}" for i in range(10)]
    whole = build_image_gallery(
        engine, regions, tmp_path / "whole", names=names, batch=3, options=WriteOptions(progress=False)
    )
    build_image_gallery(engine, regions[:6], tmp_path / "parts", names=names[:6], options=WriteOptions(progress=False))
    parts = build_image_gallery(
        engine, regions[6:], tmp_path / "parts", names=names[6:], options=WriteOptions(append=True, progress=False)
    )
    assert isinstance(parts.images, np.memmap)
    np.testing.assert_allclose(parts.images, whole.images, atol=1e-6)
    np.testing.assert_allclose(parts.image_gram, whole.image_gram, atol=1e-6)
    assert parts.ids.tolist() == list(range(10)) and parts.names == names
    emb, gram = engine.encode_images(regions)
    np.testing.assert_allclose(whole.images, emb, atol=1e-6)
    np.testing.assert_allclose(whole.image_gram, gram, atol=1e-6)
    # only the current generation's files remain
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == sorted(
        [".lock", "gallery.json", "images.2.npy", "image_gram.2.npy", "ids.2.npy", "names.2.json"]
    )


def test_float16_gallery(engines, tmp_path):
    engine = engines["t2i"]
    regions = random_regions(4, seed=4)
    g = build_image_gallery(engine, regions, tmp_path, options=WriteOptions(dtype="float16", progress=False))
    assert g.dtype == np.float16
    np.testing.assert_allclose(g.images.astype(np.float32), engine.encode_images(regions)[0], atol=1e-3)
    with pytest.raises(GalleryError, match="float16"):
        build_image_gallery(
            engine, regions, tmp_path, options=WriteOptions(dtype="float32", append=True, progress=False)
        )


def test_caption_gallery_is_ragged_sorted_and_appendable(engines, tmp_path):
    engine = engines["i2t"]
    caps = random_captions(15, seed=5)
    whole = build_caption_gallery(engine, caps, tmp_path / "whole", batch=4, options=WriteOptions(progress=False))
    build_caption_gallery(engine, caps[:9], tmp_path / "parts", options=WriteOptions(progress=False))
    parts = build_caption_gallery(
        engine, caps[9:], tmp_path / "parts", options=WriteOptions(append=True, progress=False)
    )
    ids, lengths = engine.tokenizer.encode_batch(caps)
    assert whole.words.shape[0] == lengths.sum()  # no padding stored
    assert (np.diff(whole.lengths) >= 0).all()
    for g in (whole, parts):
        assert g.texts == caps
        np.testing.assert_array_equal(np.sort(g.ids), np.arange(15))
        np.testing.assert_array_equal(g.lengths, lengths[g.ids])
        for pos, cid in enumerate(g.ids):
            expected = engine.encode_ids(ids[cid : cid + 1, : lengths[cid]], lengths[cid : cid + 1])[0]
            np.testing.assert_allclose(g.words[g.offsets[pos] : g.offsets[pos + 1]], expected, atol=1e-6)
    blocks = list(whole.blocks(2))
    assert sum(len(b[2]) for b in blocks) == 15
    for _pos, words, lens in blocks:
        assert (lens == lens[0]).all() and words.shape[:2] == (len(lens), lens[0])
        assert np.shares_memory(words, whole.words)  # a view, not a copy


def test_gallery_of_another_model_is_refused(engines, tmp_path):
    build_image_gallery(engines["t2i"], random_regions(3), tmp_path / "g", options=WriteOptions(progress=False))
    with pytest.raises(GalleryError, match="built by another model"):
        ImageGallery.load(tmp_path / "g", engines["i2t"].manifest.image_encoder_id)
    with pytest.raises(GalleryError, match="built by another model"):
        build_image_gallery(
            engines["i2t"], random_regions(3), tmp_path / "g", options=WriteOptions(append=True, progress=False)
        )
    build_caption_gallery(engines["t2i"], ["a dog ."], tmp_path / "c", options=WriteOptions(progress=False))
    with pytest.raises(GalleryError, match="built by another model"):
        CaptionGallery.load(tmp_path / "c", engines["i2t"].manifest.text_encoder_id)


def test_truncated_or_corrupted_files_are_detected(engines, tmp_path):
    g = build_image_gallery(engines["t2i"], random_regions(5), tmp_path, options=WriteOptions(progress=False))
    images_file = tmp_path / g.manifest["arrays"]["images"]["file"]
    data = images_file.read_bytes()
    images_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(GalleryError, match="truncated or corrupted"):
        ImageGallery.load(tmp_path)
    images_file.write_bytes(b"\x00" * len(data))
    with pytest.raises(GalleryError, match="corrupted"):
        ImageGallery.load(tmp_path)
    (tmp_path / "gallery.json").write_text("{not json")
    with pytest.raises(GalleryError, match="corrupted gallery manifest"):
        ImageGallery.load(tmp_path)
    with pytest.raises(GalleryError, match="no gallery here"):
        ImageGallery.load(tmp_path / "nowhere")


def test_interrupted_append_leaves_previous_gallery_intact(engines, tmp_path, monkeypatch):
    engine = engines["t2i"]
    before = build_image_gallery(engine, random_regions(4, seed=1), tmp_path, options=WriteOptions(progress=False))
    snapshot = np.array(before.images)
    files = sorted(p.name for p in tmp_path.iterdir())
    calls = {"n": 0}
    real = engine.encode_images

    def dies(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-build
        return real(*a, **k)

    monkeypatch.setattr(engine, "encode_images", dies)
    with pytest.raises(KeyboardInterrupt):
        build_image_gallery(
            engine, random_regions(6, seed=2), tmp_path, batch=2, options=WriteOptions(append=True, progress=False)
        )
    monkeypatch.undo()
    after = ImageGallery.load(tmp_path, engine.manifest.image_encoder_id)
    np.testing.assert_array_equal(np.array(after.images), snapshot)
    assert sorted(p.name for p in tmp_path.iterdir()) == files  # no temp files left behind
    assert json.loads((tmp_path / "gallery.json").read_text())["count"] == 4


def test_bad_features_are_refused_with_clear_errors(engines, tmp_path):
    engine = engines["t2i"]
    with pytest.raises(ValueError, match="expected 12 features per region"):
        build_image_gallery(engine, random_regions(2, img_dim=7), tmp_path, options=WriteOptions(progress=False))
    with pytest.raises(ValueError, match="rank 3"):
        build_image_gallery(engine, np.zeros((2, 3, 4, 12), np.float32), tmp_path, options=WriteOptions(progress=False))
    with pytest.raises(ValueError, match="floating-point"):
        build_image_gallery(engine, np.zeros((2, 3, 12), np.int32), tmp_path, options=WriteOptions(progress=False))
    bad = random_regions(5)
    bad[3, 1, 2] = np.nan
    with pytest.raises(GalleryError, match="NaN or inf, first at index 3"):
        build_image_gallery(engine, bad, tmp_path, options=WriteOptions(progress=False))
    with pytest.raises(GalleryError, match="one name per image"):
        build_image_gallery(engine, random_regions(2), tmp_path, names=["x"], options=WriteOptions(progress=False))
    assert not (tmp_path / "gallery.json").exists()
