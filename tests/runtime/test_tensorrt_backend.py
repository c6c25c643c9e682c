"""runtime/backends/tensorrt.py.

Without TensorRT: the module imports, ``from_manifest`` fails with a helpful BackendError, and the
backend's own logic (per-thread contexts, profile checks, checked booleans, pinned staging, device
pointers with offsets for a resident gallery, the manifest checks) runs against a stand-in: a fake
``tensorrt`` module whose "engine" is the ONNX graph run by ONNX Runtime, and an allocator whose
"device memory" is host memory. The stand-in checks this code, not TensorRT; the ``tensorrt``-marked
tests at the end build and run real engines where TensorRT and a GPU exist.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from runtime.backends import BackendError
from runtime.backends.onnxruntime import open_session
from runtime.manifest import load_manifest
from runtime.options import EngineOptions, SearchOptions, WriteOptions
from tests.fake_tensorrt import (
    FakeAllocator,
    build_with_fakes,
    copy_export,
    export_golden,
    install_fakes,
)
from tests.helpers import encode_texts, minimal_manifest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def export_copy(t2i_export: Path, tmp_path: Path) -> Path:
    return copy_export(t2i_export, tmp_path)


def head_feeds(rng, n, q, embed=32, regions=36, max_len=12):
    images = rng.standard_normal((n, regions, embed)).astype(np.float32)
    images /= np.linalg.norm(images, axis=-1, keepdims=True)
    lengths = rng.integers(1, max_len + 1, q).astype(np.int64)
    words = rng.standard_normal((q, int(lengths.max()), embed)).astype(np.float32)
    words *= (np.arange(words.shape[1])[None, :] < lengths[:, None])[..., None]
    return {"images": images, "image_gram": images @ images.transpose(0, 2, 1), "captions": words, "lengths": lengths}


def ort_run(path: Path, feeds):
    s = open_session(path)
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


# ================================================================================ without TensorRT


def test_module_imports_without_tensorrt() -> None:
    code = (
        "import sys, runtime.backends.tensorrt as m, runtime.backends.plan_check, runtime.backends.cuda_memory;"
        "assert 'tensorrt' not in sys.modules and 'cuda' not in sys.modules and 'pycuda' not in sys.modules;"
        "print(m.TensorRTBackend.name)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "tensorrt"


def test_from_manifest_without_tensorrt_is_helpful(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes ``import tensorrt`` raise ImportError
    manifest = minimal_manifest(tmp_path)
    from runtime.backends.tensorrt import TensorRTBackend

    with pytest.raises(BackendError) as e:
        TensorRTBackend.from_manifest(load_manifest(manifest), "head")
    msg = str(e.value)
    assert "TensorRT is not installed" in msg and "pip install tensorrt" in msg and "onnxruntime" in msg
    from runtime.backends import open_backend

    with pytest.raises(BackendError, match="pip install tensorrt"):
        open_backend(load_manifest(manifest), "head", EngineOptions(backend="tensorrt"))


def test_allocator_without_cuda_bindings_is_helpful(monkeypatch) -> None:
    import runtime.backends.cuda_memory as m

    monkeypatch.setattr(m, "_ALLOCATOR", None)
    for mod in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart", "pycuda", "pycuda.driver"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(BackendError, match="pip install cuda-python"):
        m.open_allocator()


def test_device_array_nbytes() -> None:
    from runtime.backends.cuda_memory import DeviceArray

    assert DeviceArray(0, (3, 36, 32), np.dtype(np.float16)).nbytes == 3 * 36 * 32 * 2


# ================================================================================ with the stand-ins


def test_build_then_serve_with_stand_ins(monkeypatch, export_copy: Path) -> None:
    rc, _trt, alloc = build_with_fakes(monkeypatch, export_copy)
    assert rc == 0
    m = load_manifest(export_copy)
    assert sorted(m.plans) == ["head", "image", "text", "topk"]
    on_disk = json.loads(export_copy.read_text())
    assert "engines" not in on_disk and sorted(on_disk["plans"]) == sorted(m.plans)  # the key is "plans" now
    from runtime.backends.tensorrt import TensorRTBackend

    rng = np.random.default_rng(0)
    feeds = head_feeds(rng, 10, 5)
    with TensorRTBackend.from_manifest(m, "head") as head:
        assert head.name == "tensorrt" and head.precision == "fp16"
        assert [t.name for t in head.inputs] == ["images", "image_gram", "captions", "lengths"]
        assert head.inputs[0].shape == ("N", "R", 32) and head.outputs[0].shape == ("N", "Q")
        assert head.profile["images"]["max"] == [64, 36, 32]
        assert head.limits == {"images": 64, "image_gram": 64, "captions": 16, "lengths": 16}
        got = head.run(feeds)["sims"]
        np.testing.assert_allclose(got, ort_run(export_copy.parent / "scan.onnx", feeds)["sims"], rtol=1e-6, atol=1e-6)
        # a second call with other shapes reuses or grows the buffers
        feeds2 = head_feeds(rng, 3, 16, max_len=40)
        np.testing.assert_allclose(
            head.run(feeds2)["sims"], ort_run(export_copy.parent / "scan.onnx", feeds2)["sims"], rtol=1e-6, atol=1e-6
        )
    assert not alloc.live and not alloc.host_live and alloc.streams == 0, "close() must free everything"


def test_outside_profile_is_a_clear_error(monkeypatch, export_copy: Path) -> None:
    build_with_fakes(monkeypatch, export_copy, "--kinds", "head")
    from runtime.backends.tensorrt import TensorRTBackend

    with TensorRTBackend.from_manifest(load_manifest(export_copy), "head") as head:
        feeds = head_feeds(np.random.default_rng(1), 65, 2)  # block is 64
        with pytest.raises(BackendError, match=r"'images' has shape \(65, 36, 32\).*max \(64, 36, 32\).*--block"):
            head.run(feeds)
        with pytest.raises(BackendError, match="expected inputs"):
            head.run({"images": feeds["images"]})


@pytest.mark.parametrize("call", ["set_input_shape", "set_tensor_address", "execute_async_v3"])
def test_false_from_tensorrt_raises_naming_the_call(monkeypatch, export_copy: Path, call: str) -> None:
    _, trt, _ = build_with_fakes(monkeypatch, export_copy, "--kinds", "head")
    from runtime.backends.tensorrt import TensorRTBackend

    with TensorRTBackend.from_manifest(load_manifest(export_copy), "head") as head:
        trt.fail_calls[call] = True
        with pytest.raises(BackendError, match=call):
            head.run(head_feeds(np.random.default_rng(2), 4, 2))


def test_undeserializable_plan(monkeypatch, export_copy: Path) -> None:
    build_with_fakes(monkeypatch, export_copy, "--kinds", "text")
    from runtime.backends.tensorrt import TensorRTBackend

    with pytest.raises(BackendError, match="deserialize_cuda_engine returned None"):
        TensorRTBackend(export_copy.parent / "scan.vocab.json")


def test_mismatched_gpu_refused_at_open(monkeypatch, export_copy: Path) -> None:
    build_with_fakes(monkeypatch, export_copy, "--kinds", "image")
    install_fakes(monkeypatch, allocator=FakeAllocator(gpu=("NVIDIA L4", "8.9")))
    from runtime.backends.plan_check import PlanMismatchError
    from runtime.backends.tensorrt import TensorRTBackend

    with pytest.raises(PlanMismatchError, match=r"compute capability 9\.0.*NVIDIA L4.*8\.9.*build_engine\.py"):
        TensorRTBackend.from_manifest(load_manifest(export_copy), "image")


def test_threads_get_their_own_contexts(monkeypatch, export_copy: Path) -> None:
    _, _trt, alloc = build_with_fakes(monkeypatch, export_copy, "--kinds", "text")
    from runtime.backends.tensorrt import TensorRTBackend

    m = load_manifest(export_copy)
    text_onnx = export_copy.parent / "scan.text.onnx"
    backend = TensorRTBackend.from_manifest(m, "text")
    errors, results = [], {}

    def work(i):
        try:
            rng = np.random.default_rng(i)
            for _ in range(3):
                lengths = rng.integers(1, 10, 4).astype(np.int64)
                ids = rng.integers(4, m.config.vocab_size, (4, int(lengths.max()))).astype(np.int64)
                ids *= np.arange(ids.shape[1])[None, :] < lengths[:, None]
                got = backend.run({"ids": ids, "lengths": lengths})["captions"]
                np.testing.assert_allclose(
                    got, ort_run(text_onnx, {"ids": ids, "lengths": lengths})["captions"], rtol=1e-6, atol=1e-6
                )
            results[i] = True
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    engine = backend._engine
    assert len(engine.contexts) == 4 and len({c.thread for c in engine.contexts}) == 4
    backend.close()
    backend.close()  # idempotent
    assert not alloc.live and alloc.streams == 0
    with pytest.raises(BackendError, match="closed"):
        backend.run({"ids": np.ones((1, 1), np.int64), "lengths": np.ones(1, np.int64)})


def test_resident_gallery_blocks_by_pointer_offset(monkeypatch, export_copy: Path) -> None:
    _, _trt, alloc = build_with_fakes(monkeypatch, export_copy, "--kinds", "head,topk", "--topk-max", "5")
    from runtime.backends.cuda_memory import DeviceArray
    from runtime.backends.tensorrt import ResidentGallery, TensorRTBackend

    m = load_manifest(export_copy)
    rng = np.random.default_rng(4)
    gallery = head_feeds(rng, 150, 1)
    query = head_feeds(rng, 1, 6)
    head_onnx = export_copy.parent / "scan.onnx"
    full = ort_run(
        head_onnx,
        {
            "images": gallery["images"],
            "image_gram": gallery["image_gram"],
            "captions": query["captions"],
            "lengths": query["lengths"],
        },
    )["sims"]
    with (
        TensorRTBackend.from_manifest(m, "head") as head,
        TensorRTBackend.from_manifest(m, "topk") as topk,
        ResidentGallery(
            head, {"images": gallery["images"], "image_gram": gallery["image_gram"]}, chunk_bytes=50_000
        ) as resident,
    ):
        assert len(resident) == 150
        base = resident.block_feeds(0, 150)["images"].ptr
        for start, stop in ((0, 64), (64, 128), (128, 150), (37, 38)):
            block = resident.block_feeds(start, stop)
            assert isinstance(block["images"], DeviceArray)
            assert block["images"].ptr == base + start * 36 * 32 * 4  # an offset, not a copy
            assert block["images"].shape == (stop - start, 36, 32)
            feeds = {**block, "captions": query["captions"], "lengths": query["lengths"]}
            sims = head.run_device(feeds)["sims"]
            np.testing.assert_allclose(sims, full[start:stop], rtol=1e-6, atol=1e-6)
            # the same resident block through the top-k engine: only (k, Q) comes back
            out = topk.run_device(feeds)
            k = min(5, stop - start)
            assert out["topk_scores"].shape == (k, 6)
            expected = np.argsort(-full[start:stop], axis=0, kind="stable")[:k]
            np.testing.assert_array_equal(out["topk_index"], expected)
        with pytest.raises(BackendError, match="block_feeds"):
            resident.block_feeds(100, 151)
        wrong = DeviceArray(base, (2, 36, 32), np.dtype(np.float16))
        with pytest.raises(BackendError, match="device input 'images' is float16"):
            head.run_device(
                {
                    **resident.block_feeds(0, 2),
                    "images": wrong,
                    "captions": query["captions"],
                    "lengths": query["lengths"],
                }
            )
    assert not alloc.live and not alloc.host_live


def test_scan_engine_opens_tensorrt_backends(monkeypatch, export_copy: Path) -> None:
    """``open_backend(..., 'tensorrt')`` as ScanEngine uses it, for all three graphs."""
    build_with_fakes(monkeypatch, export_copy, "--kinds", "head,text,image")
    from runtime.engine import ScanEngine

    with ScanEngine(load_manifest(export_copy), EngineOptions(backend="tensorrt")) as eng:
        assert eng.head.name == eng.text.name == eng.image.name == "tensorrt"
        words, lengths = encode_texts(eng, ["a dog", "two dogs on a beach"])
        regions = np.random.default_rng(5).standard_normal((3, 36, eng.config.img_dim)).astype(np.float32)
        images, gram = eng.encode_images(regions)
        sims = eng.sims(images, gram, words, lengths)
    with ScanEngine(load_manifest(export_copy), EngineOptions(backend="onnxruntime")) as ref:
        words_r, _ = encode_texts(ref, ["a dog", "two dogs on a beach"])
        images_r, gram_r = ref.encode_images(regions)
        np.testing.assert_allclose(sims, ref.sims(images_r, gram_r, words_r, lengths), rtol=1e-5, atol=1e-6)


# ================================================================================ real TensorRT


def _gpu_or_skip():
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install tensorrt on a GPU machine)")
    from runtime.backends.cuda_memory import open_allocator

    try:
        open_allocator()
    except BackendError as e:
        pytest.skip(f"no usable CUDA GPU: {e}")
    return trt


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision, atol", [("fp32", 1e-5), ("fp16", 1e-2)])
def test_golden_engine_matches_onnxruntime(tmp_path_factory, precision: str, atol: float) -> None:
    trt = _gpu_or_skip()
    from export.build_engine import main
    from export.trt_build import precision_strategy
    from runtime.backends.tensorrt import ResidentGallery, TensorRTBackend

    path = export_golden("t2i_lse_f30k", tmp_path_factory.mktemp(f"trt_{precision}"))
    if (
        precision == "fp16"
        and precision_strategy(trt.__version__) == "strongly-typed"
        and "head.fp16" not in load_manifest(path).graphs
    ):
        pytest.skip("TensorRT 11 builds FP16 only from exported fp16 graphs, which this export lacks")
    args = [
        str(path),
        "--max-batch",
        "16",
        "--block",
        "64",
        "--max-words",
        "40",
        "--topk-max",
        "5",
        "--timing-cache",
        str(path.parent / "timing.cache"),
        "--workspace-gb",
        "1",
    ]
    assert main(args + (["--fp32"] if precision == "fp32" else [])) == 0
    m = load_manifest(path)
    rng = np.random.default_rng(0)
    feeds = head_feeds(rng, 50, 7, max_len=20)
    with TensorRTBackend.from_manifest(m, "head") as head:
        got = head.run(feeds)["sims"]
        expected = ort_run(path.parent / "scan.onnx", feeds)["sims"]
        np.testing.assert_allclose(got, expected, atol=atol, rtol=0)
        with ResidentGallery(head, {"images": feeds["images"], "image_gram": feeds["image_gram"]}) as g:
            part = head.run_device(
                {**g.block_feeds(10, 40), "captions": feeds["captions"], "lengths": feeds["lengths"]}
            )["sims"]
            np.testing.assert_allclose(part, expected[10:40], atol=atol, rtol=0)
    with TensorRTBackend.from_manifest(m, "text") as text:
        lengths = np.array([1, 9, 20, 4], np.int64)
        ids = rng.integers(4, m.config.vocab_size, (4, 20)).astype(np.int64)
        ids *= np.arange(20)[None, :] < lengths[:, None]
        feeds_text = {"ids": ids, "lengths": lengths}
        np.testing.assert_allclose(
            text.run(feeds_text)["captions"],
            ort_run(path.parent / "scan.text.onnx", feeds_text)["captions"],
            atol=atol,
            rtol=0,
        )
    with TensorRTBackend.from_manifest(m, "topk") as topk:
        out = topk.run(feeds)
        assert out["topk_scores"].shape == (5, 7)
        np.testing.assert_allclose(out["topk_scores"], -np.sort(-expected, axis=0)[:5], atol=atol, rtol=0)


# ================================================================================ placement: Searcher on TensorRT


def test_searcher_on_tensorrt_equals_onnxruntime(monkeypatch, export_copy: Path, tmp_path: Path) -> None:
    """Backend.upload/block_topk under TensorRT: the galleries stay in (fake) device memory, t2i runs the top-k
    plan for k <= topk_max and the head plan past it, i2t the head plan; all equal ONNX Runtime's search."""
    _, _, alloc = build_with_fakes(monkeypatch, export_copy, "--topk-max", "5")
    from runtime.engine import ScanEngine
    from runtime.gallery import build_caption_gallery, build_image_gallery
    from runtime.searcher import Searcher

    m = load_manifest(export_copy)
    assert m.topk_max == 5
    rng = np.random.default_rng(7)
    regions = rng.standard_normal((150, 36, m.config.img_dim)).astype(np.float32)
    words = ["a", "dog", "man", "on", "the", "beach", "two", "red", "car", "."]
    texts = [" ".join(rng.choice(words, size=rng.integers(1, 15))) for _ in range(90)]
    with ScanEngine(m, EngineOptions(backend="onnxruntime")) as ref:
        images = build_image_gallery(ref, regions, tmp_path / "images", options=WriteOptions(progress=False))
        captions = build_caption_gallery(ref, texts, tmp_path / "captions", options=WriteOptions(progress=False))
        with Searcher(
            ref, images=images, captions=captions, options=SearchOptions(image_block=50, caption_block=40)
        ) as s:
            want = {k: s.search(texts[:20], k) for k in (3, 9)}
            want_i2t = s.search(regions[:20], 6)
    with ScanEngine(m, EngineOptions(backend="tensorrt")) as eng:
        assert eng.head.limits["images"] == 64 and eng.head.limits["captions"] == 16
        with Searcher(
            eng, images=images, captions=captions, options=SearchOptions(image_block=100, caption_block=40)
        ) as s:
            o = s.options
            assert (o.image_block, o.caption_block, o.query_batch) == (64, 16, 16)  # capped to the profile
            got = {k: s.search(texts[:20], k) for k in (3, 9)}  # k=3: the top-k plan; k=9 > topk_max: the head
            assert eng.head._topk is not None  # the top-k plan was opened for k=3
            got_i2t = s.search(regions[:20], 6)
            uploaded = list(s._upload(s._generation, "images", 0))
            assert [offset for offset, _ in uploaded] == [0, 64, 128]
            assert all(type(v).__name__ == "DeviceArray" for _, feeds in uploaded for v in feeds.values())
    for k in (3, 9):
        np.testing.assert_array_equal(got[k][1], want[k][1])
        np.testing.assert_allclose(got[k][0], want[k][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got_i2t[1], want_i2t[1])
    np.testing.assert_allclose(got_i2t[0], want_i2t[0], rtol=1e-5, atol=1e-6)
    assert not alloc.live and not alloc.host_live, "closing the Searcher and the engine frees the device galleries"
