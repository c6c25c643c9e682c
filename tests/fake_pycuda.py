"""A stand-in for the parts of pycuda (``pycuda.driver``) that runtime/backends/cuda_memory.py calls.

pycuda builds only against a CUDA toolkit, so the allocator's pycuda path would otherwise never run
before a borrowed GPU. Here "device" memory is host memory, so pointers are real and copies checkable,
and the fake enforces what pycuda and the driver under it require of a caller: ``init()`` first, a
current context on the calling thread, copies inside live allocations, async copies through
page-locked memory on a stream. Page-locked buffers and streams are released when the last reference
goes, as pycuda's are, and counted. It checks our calls, not pycuda.
"""

from __future__ import annotations

import ctypes
import itertools
import sys
import threading
import types
import weakref

import numpy as np


class Error(Exception):
    """pycuda.driver.Error, the base of every pycuda error."""


class LogicError(Error):
    pass


class CudaMemoryError(Error):
    """pycuda.driver.MemoryError (renamed here so it does not shadow the builtin)."""


class FakeDriver:
    """The driver's state; ``module()`` is what ``import pycuda.driver`` returns."""

    def __init__(self, gpus=(("NVIDIA H200", (9, 0)),), init_error: str | None = None, memory: int = 1 << 30):
        self.gpus, self.init_error, self.memory = list(gpus), init_error, memory
        self.initialised = False
        self.device: dict[int, np.ndarray] = {}  # live allocations by address
        self.freed: set[int] = set()
        self.pinned: dict[int, int] = {}  # live page-locked buffers: address -> size
        self.streams = 0  # live streams
        self.pushes: dict[int, int] = {}  # thread id -> context pushes
        self._local = threading.local()
        self._handles = itertools.count(0x1000)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ checks
    def need_context(self, what: str) -> None:
        if not getattr(self._local, "stack", None):
            raise LogicError(f"{what} failed: invalid device context (no context is current on this thread)")

    def _inside(self, ptr: int, nbytes: int, pool: dict[int, int]) -> bool:
        return any(base <= ptr and ptr + nbytes <= base + size for base, size in pool.items())

    def device_range(self, ptr: int, nbytes: int, what: str) -> None:
        with self._lock:
            if not self._inside(int(ptr), nbytes, {b: a.nbytes for b, a in self.device.items()}):
                where = "a freed allocation" if int(ptr) in self.freed else "no live allocation"
                raise LogicError(f"{what} failed: {nbytes} bytes at {int(ptr):#x} are in {where}")

    def pinned_range(self, buf: np.ndarray, what: str) -> None:
        with self._lock:
            if not self._inside(buf.ctypes.data, buf.nbytes, self.pinned):
                raise LogicError(f"{what}: the host buffer is not page-locked (pycuda copies it synchronously)")

    # ------------------------------------------------------------------ the module
    def module(self) -> types.ModuleType:
        drv = self
        cuda = types.ModuleType("pycuda.driver")
        cuda.Error, cuda.LogicError, cuda.MemoryError = Error, LogicError, CudaMemoryError

        def init(flags: int = 0) -> None:
            if drv.init_error:
                raise Error(f"cuInit failed: {drv.init_error}")
            drv.initialised = True

        class Context:
            def push(self) -> None:
                stack = drv._local.__dict__.setdefault("stack", [])
                stack.append(self)
                with drv._lock:
                    tid = threading.get_ident()
                    drv.pushes[tid] = drv.pushes.get(tid, 0) + 1

        class Device:
            @staticmethod
            def count() -> int:
                if not drv.initialised:
                    raise LogicError("cuDeviceGetCount failed: initialization error (call init() first)")
                return len(drv.gpus)

            def __init__(self, ordinal: int) -> None:
                self.count()
                self._name, self._cc = drv.gpus[ordinal]

            def name(self) -> str:
                return self._name

            def compute_capability(self) -> tuple[int, int]:
                return self._cc

            def retain_primary_context(self) -> Context:
                return Context()

        class DeviceAllocation:
            def __init__(self, buf: np.ndarray) -> None:
                self.buf = buf

            def __int__(self) -> int:
                return self.buf.ctypes.data

            def free(self) -> None:
                with drv._lock:
                    if drv.device.pop(int(self), None) is not None:
                        drv.freed.add(int(self))

        def mem_alloc(nbytes: int) -> DeviceAllocation:
            drv.need_context("cuMemAlloc")
            if nbytes < 1:
                raise LogicError("cuMemAlloc failed: invalid argument (0 bytes)")
            with drv._lock:
                if sum(a.nbytes for a in drv.device.values()) + nbytes > drv.memory:
                    raise CudaMemoryError("cuMemAlloc failed: out of memory")
                buf = np.zeros(nbytes, np.uint8)
                drv.device[buf.ctypes.data] = buf
                drv.freed.discard(buf.ctypes.data)
            return DeviceAllocation(buf)

        def _release_pinned(ptr: int) -> None:
            with drv._lock:
                del drv.pinned[ptr]

        def pagelocked_empty(shape, dtype) -> np.ndarray:
            drv.need_context("cuMemHostAlloc")
            buf = np.empty(shape, dtype)
            with drv._lock:
                drv.pinned[buf.ctypes.data] = buf.nbytes
            weakref.finalize(buf, _release_pinned, buf.ctypes.data)
            return buf

        def _release_stream() -> None:
            with drv._lock:
                drv.streams -= 1

        class Stream:
            def __init__(self) -> None:
                drv.need_context("cuStreamCreate")
                self.handle = next(drv._handles)
                with drv._lock:
                    drv.streams += 1
                weakref.finalize(self, _release_stream)

            def synchronize(self) -> None:
                pass  # copies below complete at once

        def _stream(stream, what: str) -> None:
            if not isinstance(stream, Stream):
                raise TypeError(f"{what}: stream must be a pycuda Stream, received {type(stream).__name__}")

        def memcpy_htod_async(dest, src: np.ndarray, stream=None) -> None:
            drv.need_context("cuMemcpyHtoDAsync")
            _stream(stream, "memcpy_htod_async")
            drv.pinned_range(src, "memcpy_htod_async")
            drv.device_range(int(dest), src.nbytes, "cuMemcpyHtoDAsync")
            ctypes.memmove(int(dest), src.ctypes.data, src.nbytes)

        def memcpy_dtoh_async(dest: np.ndarray, src, stream=None) -> None:
            drv.need_context("cuMemcpyDtoHAsync")
            _stream(stream, "memcpy_dtoh_async")
            drv.pinned_range(dest, "memcpy_dtoh_async")
            drv.device_range(int(src), dest.nbytes, "cuMemcpyDtoHAsync")
            ctypes.memmove(dest.ctypes.data, int(src), dest.nbytes)

        def memcpy_htod(dest, src: np.ndarray) -> None:
            drv.need_context("cuMemcpyHtoD")
            src = np.ascontiguousarray(src)
            drv.device_range(int(dest), src.nbytes, "cuMemcpyHtoD")
            ctypes.memmove(int(dest), src.ctypes.data, src.nbytes)

        for f in (init, mem_alloc, pagelocked_empty, memcpy_htod_async, memcpy_dtoh_async, memcpy_htod):
            setattr(cuda, f.__name__, f)
        cuda.Device, cuda.Context, cuda.Stream = Device, Context, Stream
        return cuda


CUDA_PYTHON_MODULES = ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart")


def install(monkeypatch, driver: FakeDriver | None = None) -> FakeDriver:
    """Make ``import pycuda.driver`` return the fake, cuda-python unimportable, and ``open_allocator()``
    start afresh, so it takes the pycuda path a machine without cuda-python takes."""
    import runtime.backends.cuda_memory as memory

    driver = driver or FakeDriver()
    package = types.ModuleType("pycuda")
    package.driver = driver.module()
    monkeypatch.setitem(sys.modules, "pycuda", package)
    monkeypatch.setitem(sys.modules, "pycuda.driver", package.driver)
    for name in CUDA_PYTHON_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # makes ``import cuda...`` raise ImportError
    monkeypatch.setattr(memory, "_ALLOCATOR", None)
    return driver
