"""CUDA device memory for the TensorRT backend: ``DeviceArray`` and a small allocator.

cuda-python (``cuda.bindings.runtime``, NVIDIA's current samples) when installed, otherwise pycuda if
that is installed; both imported lazily, so this module imports on machines without them.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.backends.base import BackendError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceArray:
    """A tensor already in device memory: ``ptr`` is a CUDA device address (int)."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


class DeviceAllocator:
    """The few CUDA operations the backend needs; ``open_allocator()`` picks an implementation."""

    name = "none"

    def device_info(self) -> tuple[str, str]:
        """(GPU name, compute capability "major.minor") of the current device."""
        raise NotImplementedError

    def malloc(self, nbytes: int) -> int:
        raise NotImplementedError

    def free(self, ptr: int) -> None:
        raise NotImplementedError

    def malloc_host(self, nbytes: int) -> np.ndarray:
        """Page-locked host memory as a uint8 array (async copies need it)."""
        raise NotImplementedError

    def free_host(self, buf: np.ndarray) -> None:
        raise NotImplementedError

    def stream_create(self) -> Any:
        raise NotImplementedError

    def stream_handle(self, stream: Any) -> int:
        """The ``cudaStream_t`` as an int, for ``execute_async_v3``."""
        raise NotImplementedError

    def stream_destroy(self, stream: Any) -> None:
        raise NotImplementedError

    def stream_synchronize(self, stream: Any) -> None:
        raise NotImplementedError

    def htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        raise NotImplementedError

    def dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        raise NotImplementedError

    def htod(self, dst: int, src: np.ndarray) -> None:
        """Synchronous upload (gallery uploads; pageable memory is fine)."""
        raise NotImplementedError


def _load_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python layout; ImportError propagates when absent
    return cudart


class CudaPythonAllocator(DeviceAllocator):
    """cuda-python's runtime API: every call returns ``(cudaError_t, *results)``."""

    name = "cuda-python"

    def __init__(self) -> None:
        self.cudart = _load_cudart()
        n = self._call("cudaGetDeviceCount", self.cudart.cudaGetDeviceCount())
        if n < 1:
            raise BackendError("no CUDA GPU is visible (cudaGetDeviceCount returned 0)")

    def _call(self, what: str, result: Any) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.cudart.cudaError_t.cudaSuccess:
            try:
                msg = self.cudart.cudaGetErrorString(err)[1].decode()
            except Exception:  # the error string is a courtesy; the code is what matters
                msg = ""
            raise BackendError(f"CUDA {what} failed: {getattr(err, 'name', err)} {msg}".rstrip())
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else tuple(rest)

    def device_info(self) -> tuple[str, str]:
        dev = self._call("cudaGetDevice", self.cudart.cudaGetDevice())
        props = self._call("cudaGetDeviceProperties", self.cudart.cudaGetDeviceProperties(dev))
        name = props.name
        if isinstance(name, (bytes, bytearray)):
            name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
        return str(name).strip(), f"{props.major}.{props.minor}"

    def malloc(self, nbytes: int) -> int:
        return int(self._call("cudaMalloc", self.cudart.cudaMalloc(max(int(nbytes), 1))))

    def free(self, ptr: int) -> None:
        self._call("cudaFree", self.cudart.cudaFree(ptr))

    def malloc_host(self, nbytes: int) -> np.ndarray:
        nbytes = max(int(nbytes), 1)
        ptr = int(self._call("cudaMallocHost", self.cudart.cudaMallocHost(nbytes)))
        return np.frombuffer((ctypes.c_uint8 * nbytes).from_address(ptr), dtype=np.uint8)

    def free_host(self, buf: np.ndarray) -> None:
        self._call("cudaFreeHost", self.cudart.cudaFreeHost(buf.ctypes.data))

    def stream_create(self) -> Any:
        return self._call("cudaStreamCreate", self.cudart.cudaStreamCreate())

    def stream_handle(self, stream: Any) -> int:
        return int(stream)

    def stream_destroy(self, stream: Any) -> None:
        self._call("cudaStreamDestroy", self.cudart.cudaStreamDestroy(stream))

    def stream_synchronize(self, stream: Any) -> None:
        self._call("cudaStreamSynchronize", self.cudart.cudaStreamSynchronize(stream))

    def htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(
            "cudaMemcpyAsync(host->device)", self.cudart.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, stream)
        )

    def dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(
            "cudaMemcpyAsync(device->host)", self.cudart.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, stream)
        )

    def htod(self, dst: int, src: np.ndarray) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call("cudaMemcpy(host->device)", self.cudart.cudaMemcpy(dst, src.ctypes.data, src.nbytes, kind))


def _pycuda_errors(method):
    """pycuda raises its own errors; the backend and the CLIs expect BackendError, as cuda-python's path gives."""

    @functools.wraps(method)
    def call(self, *args):
        try:
            return method(self, *args)
        except self.cuda.Error as e:
            ints = ", ".join(str(a) for a in args if isinstance(a, int))  # sizes and pointers, not arrays
            raise BackendError(f"CUDA {method.__name__}({ints}) failed (pycuda): {e}") from e

    return call


class PycudaAllocator(DeviceAllocator):
    """pycuda, used only when cuda-python is absent (pycuda is source-only and needs the CUDA toolkit).

    pycuda works on the driver API: each thread must make the device's primary context current,
    the same context the CUDA runtime (and so TensorRT) uses.
    """

    name = "pycuda"

    def __init__(self) -> None:
        import pycuda.driver as cuda

        self.cuda = cuda
        try:
            cuda.init()
            if cuda.Device.count() < 1:
                raise BackendError("no CUDA GPU is visible (pycuda Device.count() is 0)")
            self.device = cuda.Device(0)
            self.context = self.device.retain_primary_context()
        except cuda.Error as e:
            raise BackendError(f"pycuda cannot open the GPU: {e}") from e
        self._local = threading.local()
        self._lock = threading.Lock()
        # pycuda objects own their memory: keep them alive by address until freed.
        self._device: dict[int, Any] = {}
        self._host: dict[int, np.ndarray] = {}
        self._streams: dict[int, Any] = {}

    def _current(self) -> None:
        if not getattr(self._local, "pushed", False):
            self.context.push()
            self._local.pushed = True

    @_pycuda_errors
    def device_info(self) -> tuple[str, str]:
        major, minor = self.device.compute_capability()
        return str(self.device.name()).strip(), f"{major}.{minor}"

    @_pycuda_errors
    def malloc(self, nbytes: int) -> int:
        self._current()
        alloc = self.cuda.mem_alloc(max(int(nbytes), 1))
        with self._lock:
            self._device[int(alloc)] = alloc
        return int(alloc)

    @_pycuda_errors
    def free(self, ptr: int) -> None:
        self._current()
        with self._lock:
            alloc = self._device.pop(int(ptr), None)
        if alloc is not None:
            alloc.free()

    @_pycuda_errors
    def malloc_host(self, nbytes: int) -> np.ndarray:
        self._current()
        buf = self.cuda.pagelocked_empty(max(int(nbytes), 1), np.uint8)
        with self._lock:
            self._host[buf.ctypes.data] = buf
        return buf

    def free_host(self, buf: np.ndarray) -> None:
        with self._lock:
            self._host.pop(buf.ctypes.data, None)  # pycuda frees page-locked memory with the array

    @_pycuda_errors
    def stream_create(self) -> Any:
        self._current()
        stream = self.cuda.Stream()
        with self._lock:
            self._streams[int(stream.handle)] = stream
        return stream

    def stream_handle(self, stream: Any) -> int:
        return int(stream.handle)

    def stream_destroy(self, stream: Any) -> None:
        with self._lock:
            self._streams.pop(int(stream.handle), None)

    @_pycuda_errors
    def stream_synchronize(self, stream: Any) -> None:
        stream.synchronize()

    @_pycuda_errors
    def htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        self._current()
        self.cuda.memcpy_htod_async(dst, src, stream)

    @_pycuda_errors
    def dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        self._current()
        self.cuda.memcpy_dtoh_async(dst, src, stream)

    @_pycuda_errors
    def htod(self, dst: int, src: np.ndarray) -> None:
        self._current()
        self.cuda.memcpy_htod(dst, src)


_ALLOCATOR: DeviceAllocator | None = None
_ALLOCATOR_LOCK = threading.Lock()


def open_allocator() -> DeviceAllocator:
    """The process-wide allocator: cuda-python, else pycuda; BackendError saying what to install."""
    global _ALLOCATOR
    with _ALLOCATOR_LOCK:
        if _ALLOCATOR is not None:
            return _ALLOCATOR
        try:
            _ALLOCATOR = CudaPythonAllocator()
            return _ALLOCATOR
        except ImportError as e:
            missing = e
        try:
            _ALLOCATOR = PycudaAllocator()
        except ImportError:
            raise BackendError(
                f"the TensorRT backend needs CUDA Python bindings ({missing}): "
                "pip install cuda-python (or pycuda, which needs the CUDA toolkit to build)"
            ) from missing
        logger.info("cuda-python is not installed; using pycuda for device memory")
        return _ALLOCATOR
