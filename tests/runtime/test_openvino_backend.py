"""--backend openvino: the similarity head in bf16 (runtime/backends/openvino.py) against ONNX Runtime fp32 on
seeded data. The engine tests skip without the openvino package."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.backends import BackendError, module_available
from runtime.backends.openvino import from_bf16, to_bf16
from runtime.engine import ScanEngine
from runtime.gallery import ImageGallery
from runtime.options import EngineOptions, SearchOptions
from runtime.searcher import Searcher
from tests.runtime.conftest import random_captions, random_regions

needs_openvino = pytest.mark.skipif(not module_available("openvino"), reason="openvino is not installed")

# bf16 keeps 8 significant bits: rounded to nearest, a value moves by at most half a unit in the last place,
# 2^-8 relative.
BF16_RELATIVE = 2.0**-8
# What the head reads in bf16: the gallery side and the caption operand of the MatMuls. A dot product of two
# unit vectors, both rounded, moves by at most 2 * 2^-8 = 2^-7 when every error is aligned, and typically by
# 2^-8 * sqrt(2 / d) ~ 1.4e-3 (independent errors, d = 8 here). The attention softmax scales dot products by
# lambda_softmax (9): a weight moves by ~9 * 1.4e-3 ~ 1.3% relative, and a similarity (an average of cosines
# against the weighted context, cosines in [-1, 1]) by about 1.4e-3 + 1.3% of their spread: ~0.005 expected
# (measured 0.0024 t2i, 0.0043 i2t). 0.01 allows twice that; a wrong head is far outside it: scoring the
# images in reverse order is off by up to 0.52 (i2t) and 0.59 (t2i) on these models and data.
SIM_TOLERANCE = 0.01


def test_bf16_rounding_is_nearest_even_and_within_its_bound():
    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    back = from_bf16(to_bf16(x))
    assert (np.abs(back - x) <= BF16_RELATIVE * np.abs(x)).all()
    # 1 + 2^-8 lies halfway between bf16's 1 and 1 + 2^-7: ties go to the even mantissa (1); just above rounds up.
    ties = np.array([1 + 2**-8, 1 + 2**-8 + 2**-20, 1 + 3 * 2**-8, -2.0], np.float32)
    np.testing.assert_array_equal(from_bf16(to_bf16(ties)), np.array([1, 1 + 2**-7, 1 + 4 * 2**-8, -2], np.float32))
    # Non-finite values stay non-finite (a corrupted cache must still be caught as one), the largest NaN
    # payload included (its rounding carry would otherwise wrap to -0).
    odd = np.array([0x7F800000, 0xFF800000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000], np.uint32).view(np.float32)
    back = from_bf16(to_bf16(odd))
    assert np.isposinf(back[0]) and np.isneginf(back[1]) and np.isnan(back[2:]).all()


@pytest.fixture(scope="module", params=["t2i", "i2t"])
def engines(request, small_engines):
    path = small_engines[request.param]
    with (
        ScanEngine.open(path, EngineOptions(backend="onnxruntime")) as exact,
        ScanEngine.open(path, EngineOptions(backend="openvino")) as bf16,
    ):
        yield exact, bf16


@needs_openvino
def test_head_matches_fp32_within_bf16_error(engines):
    exact, bf16 = engines
    assert bf16.head.name == "openvino" and bf16.text.name == "onnxruntime"
    images, gram = exact.encode_images(random_regions(40, seed=3))
    ids, lengths = exact.tokenizer.encode_batch(random_captions(7, seed=4))
    captions = exact.encode_ids(ids, lengths)
    want = exact.sims(images, gram, captions, lengths)
    got = bf16.sims(images, gram, captions, lengths)
    diff = np.abs(got - want).max()
    assert diff <= SIM_TOLERANCE
    assert diff > 1e-6  # the head really read bf16 (a float32 run agrees to ~1e-7)
    # Each caption's ranking of the images: the exact best image is within the tolerance of bf16's best.
    best = want[got.argmax(axis=0), np.arange(want.shape[1])]
    assert (want.max(axis=0) - best <= 2 * SIM_TOLERANCE).all()


@needs_openvino
@pytest.mark.parametrize("resident", [None, False])
def test_searcher_over_an_uploaded_gallery(small_engines, resident):
    path = small_engines["t2i"]
    with (
        ScanEngine.open(path, EngineOptions(backend="onnxruntime")) as exact,
        ScanEngine.open(path, EngineOptions(backend="openvino")) as bf16,
    ):
        gallery = ImageGallery.from_arrays(*exact.encode_images(random_regions(50, seed=5)))
        queries = random_captions(12, seed=6)
        options = SearchOptions(image_block=16, resident=resident)  # several blocks, the last one partial
        with (
            Searcher(exact, images=gallery, options=options) as a,
            Searcher(bf16, images=gallery, options=options) as b,
        ):
            want_scores, want_rows = a.search(queries, 50)
            got_scores, got_rows = b.search(queries, 50)
    assert got_scores.shape == want_scores.shape
    # Every row's score in bf16 within the tolerance of its exact score, whatever its rank.
    exact_by_row = np.take_along_axis(want_scores, np.argsort(want_rows, axis=1), axis=1)
    got_by_row = np.take_along_axis(got_scores, np.argsort(got_rows, axis=1), axis=1)
    assert np.abs(got_by_row - exact_by_row).max() <= SIM_TOLERANCE


@needs_openvino
def test_refuses_other_precisions_and_devices(small_engines):
    with pytest.raises(BackendError, match="expected 'fp32', 'cpu'"):
        ScanEngine.open(small_engines["t2i"], EngineOptions(backend="openvino", precision="fp16"))


def test_openvino_requested_without_openvino_is_an_error(small_engines, monkeypatch):
    import runtime.backends as backends
    from runtime.manifest import load_manifest

    manifest = load_manifest(small_engines["t2i"])
    monkeypatch.setattr(backends, "module_available", lambda name: name != "openvino")
    with pytest.raises(BackendError, match=r"OpenVINO is not installed \(pip install .*\[openvino\]"):
        backends.choose_backend("openvino", manifest.path, manifest)
    assert backends.choose_backend("auto", manifest.path, manifest) == "onnxruntime"  # auto never picks it
