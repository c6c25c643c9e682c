"""int8 image caches (runtime/gallery/quantize.py): codes and scales, round trip, append, checksums, agreement
with the float32 search, and the refusals."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from runtime.engine import ScanEngine
from runtime.gallery import GalleryError, ImageGallery, build_caption_gallery, build_image_gallery
from runtime.gallery.images import write_image_gallery
from runtime.gallery.quantize import Dequantized, dequantize, gram_of, quantize
from runtime.options import EngineOptions, OptionsError, WriteOptions
from runtime.searcher import Searcher
from tests.runtime.conftest import random_captions, random_regions

INT8 = WriteOptions(dtype="int8", progress=False)


@pytest.fixture(scope="module")
def engine(small_engines):
    with ScanEngine.open(small_engines["t2i"], EngineOptions(backend="onnxruntime")) as e:
        yield e


def test_quantize_codes_scales_and_error_bound():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 36, 64)).astype(np.float32)
    x[3, 5] = 0.0  # a zero vector stays zero
    codes, scales = quantize(x)
    assert codes.dtype == np.int8 and scales.dtype == np.float32 and scales.shape == (50, 36)
    assert np.abs(codes.astype(np.int32)).max() == 127 and codes.min() >= -127
    back = dequantize(codes, scales)
    assert not back[3, 5].any()
    # Rounding to the nearest code: each component within half a step (plus float32 rounding of x / s and of
    # codes * s, a few ulps of max|x|).
    peak = np.abs(x).max(axis=-1, keepdims=True)
    assert (np.abs(back - x) <= scales[..., None] / 2 + 1e-6 * peak).all()
    # Quantizing dequantized vectors gives the same codes (shard splits re-quantize what they copy).
    again, rescaled = quantize(back)
    np.testing.assert_array_equal(again, codes)
    np.testing.assert_allclose(rescaled, scales, rtol=1e-6)


def test_dequantized_face_indexes_like_an_array():
    codes, scales = quantize(np.random.default_rng(1).standard_normal((6, 4, 8)).astype(np.float32))
    face = Dequantized(codes, scales)
    full = dequantize(codes, scales)
    assert face.shape == (6, 4, 8) and face.dtype == np.float32 and len(face) == 6
    np.testing.assert_array_equal(face[2], full[2])
    np.testing.assert_array_equal(face[1:4], full[1:4])
    np.testing.assert_array_equal(face[np.array([5, 0])], full[[5, 0]])
    np.testing.assert_array_equal(face[1:3, 2], full[1:3, 2])
    np.testing.assert_array_equal(np.asarray(face), full)
    with pytest.raises(ValueError, match="int8 codes"):
        Dequantized(codes.astype(np.int16), scales)


def test_int8_gallery_round_trip_append_and_checksums(engine, tmp_path):
    regions = random_regions(10, seed=3)
    emb, _ = engine.encode_images(regions)
    whole = build_image_gallery(engine, regions, tmp_path / "whole", batch=4, options=INT8)
    assert whole.dtype == np.int8 and whole.manifest["dtype"] == "int8"
    entries = whole.manifest["arrays"]
    assert {e["dtype"] for e in (entries["images"], entries["image_scales"], entries["image_gram"])} == {
        "int8",
        "float32",
    }
    assert all("xxh3_64" in entries[name] for name in ("images", "image_scales", "image_gram"))
    codes, scales = quantize(emb)
    np.testing.assert_array_equal(whole.images.codes, codes)
    np.testing.assert_array_equal(whole.images.scales, scales)
    # The float face is the dequantized codes; the Grams are theirs, so the head scores x^ exactly.
    np.testing.assert_allclose(whole.images[:], dequantize(codes, scales), rtol=0, atol=0)
    np.testing.assert_allclose(whole.image_gram, gram_of(dequantize(codes, scales)), atol=1e-6)
    # A quarter of float32's bytes for the vectors.
    assert whole.images.codes.nbytes * 4 == emb.nbytes
    # Append: the same codes as one build; a float32 append to it is refused.
    build_image_gallery(engine, regions[:6], tmp_path / "parts", options=INT8)
    parts = build_image_gallery(
        engine, regions[6:], tmp_path / "parts", options=WriteOptions(dtype="int8", append=True, progress=False)
    )
    np.testing.assert_array_equal(parts.images.codes, whole.images.codes)
    np.testing.assert_allclose(parts.image_gram, whole.image_gram, atol=1e-6)
    with pytest.raises(GalleryError, match="stores int8; append with dtype=int8"):
        build_image_gallery(engine, regions[:2], tmp_path / "parts", options=WriteOptions(append=True, progress=False))
    reopened = ImageGallery.load(tmp_path / "parts", verify=True)
    np.testing.assert_array_equal(reopened.images.codes, whole.images.codes)
    # Written again from its float face (a shard split or merge): the same codes.
    copy = write_image_gallery(tmp_path / "copy", [reopened.images], [reopened.image_gram], None, reopened.manifest)
    assert copy.dtype == np.int8
    np.testing.assert_array_equal(copy.images.codes, whole.images.codes)


def test_int8_search_agrees_with_float32(engine, tmp_path, caplog):
    """Top-10 agreement of int8 with float32 search on seeded data, above a bound justified below."""
    regions = random_regions(60, seed=5)
    queries = random_captions(40, seed=6)
    exact = build_image_gallery(engine, regions, tmp_path / "f32", options=WriteOptions(progress=False))
    with caplog.at_level("WARNING"):
        approx = build_image_gallery(engine, regions, tmp_path / "i8", options=INT8)
    # The write measured its agreement (random-word captions, 60 images), recorded it and logged it on use.
    probe = approx.manifest["quantization"]
    assert probe["probe_images"] == 60 and probe["top10_agreement"] >= 0.9
    assert "int8 cache: approximate scores; top-10 agreement with float32" in caplog.text
    # float caches warn of nothing (their INFO lines show when an earlier test raised the root level)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "f32" in r.getMessage()]
    s_exact, i_exact = Searcher(engine, images=exact).search(queries, 10)
    s_approx, i_approx = Searcher(engine, images=approx).search(queries, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i_exact, i_approx)])
    # Each component moves by at most max|x|/254 <= 0.004 for unit vectors (test above), so a (word, region)
    # cosine moves by at most 0.004 * sqrt(d) = 0.011 here (d = 8): below the gaps between these top-10 scores
    # except near ties. Measured: 0.9975 (one swap in 400); a dequantization that dropped the scales or mixed
    # up regions gives ~0.2 (10 of 60 by chance), so 0.9 separates the two.
    assert overlap >= 0.9, overlap
    # The scores themselves: the same images (where both found them) within 0.02.
    both = i_exact[:, :1] == i_approx[:, :1]
    assert np.abs(s_exact[:, :1][both] - s_approx[:, :1][both]).max() < 0.02


def test_int8_refusals(engine, tmp_path):
    with pytest.raises(OptionsError, match="dtype must be one of 'float32', 'float16', 'int8', received 'int4'"):
        WriteOptions(dtype="int4")
    with pytest.raises(GalleryError, match="dtype 'int8' is for image caches"):
        build_caption_gallery(engine, random_captions(3, seed=1), tmp_path / "caps", options=INT8)
    g = build_image_gallery(engine, random_regions(3, seed=2), tmp_path / "g", options=INT8)
    manifest = json.loads((tmp_path / "g" / "gallery.json").read_text())
    del manifest["arrays"]["image_scales"]
    (tmp_path / "g" / "gallery.json").write_text(json.dumps(manifest))
    with pytest.raises(GalleryError, match=r"int8 images .* need float32 image_scales"):
        ImageGallery.load(tmp_path / "g")
    g.close()
    with pytest.raises(GalleryError, match="image_gram of the same float dtype"):
        ImageGallery.from_arrays(np.zeros((2, 3, 4), np.int8), np.zeros((2, 3, 3), np.float16))
