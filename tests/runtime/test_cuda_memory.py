"""runtime/backends/cuda_memory.py's pycuda allocator, against a stand-in (tests/fake_pycuda.py).

The path a machine with pycuda and no cuda-python takes: ``open_allocator()`` falls back to pycuda,
allocations, copies and frees keep the driver's rules (a current context on every thread, copies
inside live allocations, async copies through page-locked memory), everything is released, and
pycuda's errors reach the user as BackendError. Then the TensorRT backend served through it.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from runtime.backends import BackendError
from runtime.backends.cuda_memory import PycudaAllocator, open_allocator
from tests.fake_pycuda import FakeDriver, install


def in_threads(n: int, work) -> list[Exception]:
    """Run ``work()`` on ``n`` threads alive at once (so their idents differ); returns what they raised."""
    errors, together = [], threading.Barrier(n)

    def run():
        try:
            together.wait(timeout=30)
            work()
        except Exception as e:  # returned to the test
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_open_allocator_falls_back_to_pycuda(monkeypatch, caplog) -> None:
    install(monkeypatch, FakeDriver(gpus=[("NVIDIA L4 ", (8, 9))]))
    with caplog.at_level(logging.INFO, logger="runtime.backends.cuda_memory"):
        alloc = open_allocator()
    assert isinstance(alloc, PycudaAllocator) and alloc.name == "pycuda"
    assert "using pycuda" in caplog.text
    assert open_allocator() is alloc  # one per process
    assert alloc.device_info() == ("NVIDIA L4", "8.9")


def test_allocate_copy_and_free(monkeypatch) -> None:
    drv = install(monkeypatch)
    alloc = open_allocator()
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    ptr = alloc.malloc(data.nbytes)
    alloc.htod(ptr, data)  # pageable memory: the synchronous copy
    staged = alloc.malloc_host(data.nbytes)
    stream = alloc.stream_create()
    assert alloc.stream_handle(stream) == stream.handle
    alloc.dtoh_async(staged[16:], ptr + 16, stream)  # an offset into the allocation: from the fifth float on
    alloc.stream_synchronize(stream)
    np.testing.assert_array_equal(staged[16:].view(np.float32), data.ravel()[4:])
    staged.view(np.float32)[:] = -data.ravel()
    alloc.htod_async(ptr, staged, stream)
    back = alloc.malloc_host(data.nbytes)
    alloc.dtoh_async(back, ptr, stream)
    np.testing.assert_array_equal(back.view(np.float32), -data.ravel())

    assert len(drv.device) == 1 and len(drv.pinned) == 2 and drv.streams == 1
    alloc.free(ptr)
    alloc.free(ptr)  # a second free (close() after a failed run) is a no-op, not a driver error
    assert not drv.device and drv.freed == {ptr}
    alloc.free_host(staged)
    alloc.free_host(back)
    alloc.stream_destroy(stream)
    del staged, back, stream
    gc.collect()
    assert not drv.pinned and drv.streams == 0, "the allocator must drop its references so pycuda can free"
    assert alloc.malloc(0) in drv.device  # zero bytes still gets a valid pointer


def test_every_thread_makes_the_primary_context_current(monkeypatch) -> None:
    drv = install(monkeypatch)
    alloc = open_allocator()

    def work():
        for _ in range(3):  # pushed once per thread, not per call
            alloc.free(alloc.malloc(64))
        alloc.stream_destroy(alloc.stream_create())

    assert not in_threads(3, work)
    assert sorted(drv.pushes.values()) == [1, 1, 1] and not drv.device


@pytest.mark.parametrize(
    "driver, message",
    [
        (FakeDriver(gpus=[]), r"no CUDA GPU is visible \(pycuda Device.count\(\) is 0\)"),
        (
            FakeDriver(init_error="CUDA_ERROR_NO_DEVICE"),
            "pycuda cannot open the GPU: cuInit failed: CUDA_ERROR_NO_DEVICE",
        ),
    ],
)
def test_no_usable_gpu_is_a_backend_error(monkeypatch, driver, message) -> None:
    install(monkeypatch, driver)
    with pytest.raises(BackendError, match=message):
        open_allocator()


def test_driver_errors_are_backend_errors_naming_the_call(monkeypatch) -> None:
    install(monkeypatch, FakeDriver(memory=1 << 20))
    alloc = open_allocator()
    with pytest.raises(
        BackendError, match=r"CUDA malloc\(2097152\) failed \(pycuda\): cuMemAlloc failed: out of memory"
    ):
        alloc.malloc(2 << 20)
    ptr = alloc.malloc(16)
    alloc.free(ptr)
    with pytest.raises(BackendError, match=rf"CUDA htod\({ptr}\) failed.*freed allocation"):
        alloc.htod(ptr, np.zeros(4, np.float32))
    live = alloc.malloc(16)
    with pytest.raises(BackendError, match=r"htod\(\d+\) failed.*no live allocation"):
        alloc.htod(live, np.zeros(8, np.float32))  # 32 bytes into 16


def test_neither_binding_installed_says_what_to_install(monkeypatch) -> None:
    install(monkeypatch)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    with pytest.raises(BackendError, match=r"pip install cuda-python \(or pycuda"):
        open_allocator()


# ================================================================================ serving through it


def test_tensorrt_backend_serves_through_pycuda(monkeypatch, t2i_export: Path, tmp_path: Path) -> None:
    """Build with the TensorRT stand-in, then run the head, the top-k head and a resident gallery on
    the pycuda allocator from two threads; close() leaves nothing allocated."""
    from runtime.backends.tensorrt import ResidentGallery, TensorRTBackend
    from runtime.manifest import load_manifest
    from tests.fake_tensorrt import build_with_fakes, copy_export
    from tests.runtime.test_tensorrt_backend import head_feeds, ort_run

    manifest_path = copy_export(t2i_export, tmp_path)
    rc, _trt, _ = build_with_fakes(monkeypatch, manifest_path, "--kinds", "head,topk", "--topk-max", "5")
    assert rc == 0
    drv = install(monkeypatch)
    m = load_manifest(manifest_path)
    rng = np.random.default_rng(7)
    feeds = head_feeds(rng, 40, 3)
    query = {"captions": feeds["captions"], "lengths": feeds["lengths"]}
    want = ort_run(manifest_path.parent / "scan.onnx", feeds)["sims"]
    with TensorRTBackend.from_manifest(m, "head") as head, TensorRTBackend.from_manifest(m, "topk") as topk:
        assert isinstance(head.allocator, PycudaAllocator)
        with ResidentGallery(
            head, {"images": feeds["images"], "image_gram": feeds["image_gram"]}, chunk_bytes=40_000
        ) as resident:

            def work():
                np.testing.assert_allclose(head.run(feeds)["sims"], want, rtol=1e-6, atol=1e-6)
                block = {**resident.block_feeds(10, 30), **query}
                np.testing.assert_allclose(head.run_device(block)["sims"], want[10:30], rtol=1e-6, atol=1e-6)
                top = topk.run_device(block)["topk_index"]
                np.testing.assert_array_equal(top, np.argsort(-want[10:30], axis=0, kind="stable")[:5])

            assert not in_threads(2, work)
    gc.collect()
    assert not drv.device and not drv.pinned and drv.streams == 0, "close() must free everything"
