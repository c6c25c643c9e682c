"""TensorRT backend: runs the ``.plan`` engines that ``export/build_engine.py`` recorded in the manifest.

TensorRT and the CUDA bindings are imported lazily, inside functions, so this module imports on
machines without them (the development and CI machines cannot install TensorRT, DESIGN.md 5).

* ``TensorRTBackend.from_manifest(manifest, kind)`` refuses an engine built by another TensorRT, for
  another GPU, or from another graph (``runtime.trt_plan.check_engine_record``), then deserializes it.
* One execution context and one CUDA stream per thread (TensorRT contexts are not thread-safe);
  device buffers and pinned host buffers are per thread too and grow as needed, never per call.
* ``run(feeds)`` takes and returns numpy arrays; ``run_device(feeds)`` also accepts ``DeviceArray``
  inputs already on the GPU, such as the blocks of a ``ResidentGallery`` (uploaded once, then passed
  by pointer offset instead of copied per block).
* Device memory goes through a small allocator: cuda-python (``cuda.bindings.runtime``, NVIDIA's
  current samples) when installed, otherwise pycuda if that is installed.

Every boolean TensorRT returns is checked and a failure raises BackendError naming the call.
"""
from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np

from runtime.backends.base import Backend, BackendError, TensorSpec
from runtime.manifest import Manifest
from runtime.trt_plan import TOPK_OUTPUTS, check_engine_record, shape_in_profile, source_kind

logger = logging.getLogger(__name__)

INSTALL_HINT = ("pip install tensorrt cuda-python, on a machine with an NVIDIA GPU and driver; "
                "meanwhile --backend onnxruntime serves the ONNX graphs")

# Device buffers grow to the next multiple of this, so small shape changes do not reallocate.
_ALIGN = 1 << 16


def _import_trt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendError(f"TensorRT is not installed ({e}): {INSTALL_HINT}") from e
    return trt


# ============================================================================================ allocators


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
        self._call("cudaMemcpyAsync(host->device)",
                   self.cudart.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, stream))

    def dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call("cudaMemcpyAsync(device->host)",
                   self.cudart.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, stream))

    def htod(self, dst: int, src: np.ndarray) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call("cudaMemcpy(host->device)", self.cudart.cudaMemcpy(dst, src.ctypes.data, src.nbytes, kind))


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

    def device_info(self) -> tuple[str, str]:
        major, minor = self.device.compute_capability()
        return str(self.device.name()).strip(), f"{major}.{minor}"

    def malloc(self, nbytes: int) -> int:
        self._current()
        alloc = self.cuda.mem_alloc(max(int(nbytes), 1))
        with self._lock:
            self._device[int(alloc)] = alloc
        return int(alloc)

    def free(self, ptr: int) -> None:
        self._current()
        with self._lock:
            alloc = self._device.pop(int(ptr), None)
        if alloc is not None:
            alloc.free()

    def malloc_host(self, nbytes: int) -> np.ndarray:
        self._current()
        buf = self.cuda.pagelocked_empty(max(int(nbytes), 1), np.uint8)
        with self._lock:
            self._host[buf.ctypes.data] = buf
        return buf

    def free_host(self, buf: np.ndarray) -> None:
        with self._lock:
            self._host.pop(buf.ctypes.data, None)  # pycuda frees page-locked memory with the array

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

    def stream_synchronize(self, stream: Any) -> None:
        stream.synchronize()

    def htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        self._current()
        self.cuda.memcpy_htod_async(dst, src, stream)

    def dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        self._current()
        self.cuda.memcpy_dtoh_async(dst, src, stream)

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
                "pip install cuda-python (or pycuda, which needs the CUDA toolkit to build)") from missing
        logger.info("cuda-python is not installed; using pycuda for device memory")
        return _ALLOCATOR


# ============================================================================================ backend


class _ThreadState:
    """A thread's execution context, stream, and reusable device / pinned host buffers."""

    def __init__(self, context: Any, stream: Any) -> None:
        self.context = context
        self.stream = stream
        self.device: dict[str, tuple[int, int]] = {}      # tensor -> (ptr, capacity bytes)
        self.host: dict[str, np.ndarray] = {}             # tensor -> pinned uint8 buffer


Feed = Union[np.ndarray, DeviceArray]


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, plan_path: str | Path, *, record: Mapping[str, Any] | None = None,
                 dim_names: Mapping[str, list[Any]] | None = None, allocator: DeviceAllocator | None = None) -> None:
        trt = _import_trt()
        self._trt = trt
        self.path = Path(plan_path)
        self.record = dict(record or {})
        self.precision = self.record.get("precision", "unknown")
        self.allocator = allocator or open_allocator()
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._trt_logger)
        if self._runtime is None:
            raise BackendError(f"{self.path}: trt.Runtime() returned None")
        try:
            blob = self.path.read_bytes()
        except OSError as e:
            raise BackendError(f"{self.path}: cannot read the engine ({e})") from e
        self._engine = self._runtime.deserialize_cuda_engine(blob)
        if self._engine is None:
            raise BackendError(f"{self.path}: Runtime.deserialize_cuda_engine returned None (built by another "
                               f"TensorRT or for another GPU? see the TensorRT log above); rebuild it with "
                               f"export/build_engine.py")
        dim_names = dict(dim_names or {})
        self._inputs: list[TensorSpec] = []
        self._outputs: list[TensorSpec] = []
        self._profile: dict[str, dict[str, list[int]]] = {}
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            dims = list(self._engine.get_tensor_shape(name))
            names = dim_names.get(name, [])
            shape = tuple(d if d >= 0 else (names[j] if j < len(names) else f"d{j}") for j, d in enumerate(dims))
            spec = TensorSpec(name, dtype, shape)
            if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self._inputs.append(spec)
                lo, opt, hi = self._engine.get_tensor_profile_shape(name, 0)
                self._profile[name] = {"min": list(lo), "opt": list(opt), "max": list(hi)}
            else:
                self._outputs.append(spec)
        self._in_dtype = {t.name: t.dtype for t in self._inputs}
        self._local = threading.local()
        self._states: list[_ThreadState] = []
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_manifest(cls, manifest: Manifest, kind: str) -> "TensorRTBackend":
        """Open the recorded engine of ``kind`` ('image', 'text', 'head', 'topk') after checking it fits."""
        trt = _import_trt()
        allocator = open_allocator()
        gpu_name, cc = allocator.device_info()
        plan = check_engine_record(manifest, kind, trt.__version__, gpu_name, cc)
        record = manifest.data["engines"][kind]
        graph = (manifest.data.get("graphs") or {}).get(record.get("source_key") or source_kind(kind), {})
        dim_names = {e["name"]: list(e.get("shape", [])) for e in graph.get("inputs", []) + graph.get("outputs", [])}
        if kind == "topk":
            q = next((e["shape"][1] for e in graph.get("outputs", []) if e.get("name") == "sims"), "Q")
            dim_names.update({name: ["K", q] for name in TOPK_OUTPUTS})
        logger.info("TensorRT %s engine %s (%s, %s) on %s", kind, plan, record.get("precision"),
                    record.get("strategy"), gpu_name)
        return cls(plan, record=record, dim_names=dim_names, allocator=allocator)

    # ------------------------------------------------------------------ interface

    @property
    def profile(self) -> dict[str, dict[str, list[int]]]:
        """The engine's optimization profile: ``{input: {"min", "opt", "max"}}``; calls must fit in it."""
        return self._profile

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_feeds(feeds)
        return self._execute({k: np.ascontiguousarray(v, dtype=self._in_dtype[k]) for k, v in feeds.items()})

    def run_device(self, feeds: Mapping[str, Feed]) -> dict[str, np.ndarray]:
        """Like ``run``, but any input may be a ``DeviceArray`` (used in place, not copied)."""
        self.check_feeds(feeds)
        prepared: dict[str, Feed] = {}
        for k, v in feeds.items():
            if isinstance(v, DeviceArray):
                if np.dtype(v.dtype) != self._in_dtype[k]:
                    raise BackendError(f"{self.path}: device input {k!r} is {np.dtype(v.dtype)}, the engine takes "
                                       f"{self._in_dtype[k]}")
                prepared[k] = v
            else:
                prepared[k] = np.ascontiguousarray(v, dtype=self._in_dtype[k])
        return self._execute(prepared)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            states, self._states = self._states, []
        for state in states:
            try:
                self.allocator.stream_synchronize(state.stream)
                for ptr, _ in state.device.values():
                    self.allocator.free(ptr)
                for buf in state.host.values():
                    self.allocator.free_host(buf)
                self.allocator.stream_destroy(state.stream)
            except BackendError as e:  # closing must not raise half-way; report and go on
                logger.warning("%s: releasing device memory: %s", self.path, e)
            state.context = None
        self._engine = None
        self._runtime = None

    # ------------------------------------------------------------------ execution

    def _state(self) -> _ThreadState:
        state = getattr(self._local, "state", None)
        if state is not None:
            return state
        with self._lock:
            if self._closed:
                raise BackendError(f"{self.path}: backend is closed")
            context = self._engine.create_execution_context()
        if context is None:
            raise BackendError(f"{self.path}: ICudaEngine.create_execution_context returned None "
                               "(out of GPU memory?)")
        state = _ThreadState(context, self.allocator.stream_create())
        with self._lock:
            self._states.append(state)
        self._local.state = state
        return state

    def _device_buffer(self, state: _ThreadState, name: str, nbytes: int) -> int:
        ptr, cap = state.device.get(name, (0, 0))
        if cap < nbytes:
            if ptr:
                self.allocator.free(ptr)
            cap = max(_ALIGN, -(-nbytes // _ALIGN) * _ALIGN)
            ptr = self.allocator.malloc(cap)
            state.device[name] = (ptr, cap)
        return ptr

    def _host_buffer(self, state: _ThreadState, name: str, nbytes: int) -> np.ndarray:
        buf = state.host.get(name)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                self.allocator.free_host(buf)
            buf = self.allocator.malloc_host(max(_ALIGN, -(-nbytes // _ALIGN) * _ALIGN))
            state.host[name] = buf
        return buf

    def _execute(self, feeds: Mapping[str, Feed]) -> dict[str, np.ndarray]:
        if self._closed:
            raise BackendError(f"{self.path}: backend is closed")
        state = self._state()
        ctx = state.context
        for name, value in feeds.items():
            shape = tuple(int(s) for s in value.shape)
            profile = self._profile[name]
            if not shape_in_profile(shape, profile):
                raise BackendError(
                    f"{self.path}: input {name!r} has shape {shape}, outside the engine's profile "
                    f"min {tuple(profile['min'])} .. max {tuple(profile['max'])}; send smaller blocks or rebuild "
                    "with larger --max-batch / --block / --max-words (export/build_engine.py)")
            if not ctx.set_input_shape(name, shape):
                raise BackendError(f"{self.path}: IExecutionContext.set_input_shape({name!r}, {shape}) failed")
        unresolved = ctx.infer_shapes()
        if unresolved:
            raise BackendError(f"{self.path}: IExecutionContext.infer_shapes left {list(unresolved)} unspecified")
        for name, value in feeds.items():
            if isinstance(value, DeviceArray):
                ptr = int(value.ptr)
            else:
                # Stage through pinned memory: async copies from pageable memory are not truly async.
                host = self._host_buffer(state, name, value.nbytes)
                staged = host[:value.nbytes].view(value.dtype).reshape(value.shape)
                np.copyto(staged, value)
                ptr = self._device_buffer(state, name, value.nbytes)
                self.allocator.htod_async(ptr, staged, state.stream)
            if not ctx.set_tensor_address(name, ptr):
                raise BackendError(f"{self.path}: IExecutionContext.set_tensor_address({name!r}) failed")
        results: dict[str, np.ndarray] = {}
        for spec in self._outputs:
            shape = tuple(int(s) for s in ctx.get_tensor_shape(spec.name))
            if any(s < 0 for s in shape):
                raise BackendError(f"{self.path}: output {spec.name!r} has unresolved shape {shape}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * spec.dtype.itemsize
            ptr = self._device_buffer(state, spec.name, nbytes)
            if not ctx.set_tensor_address(spec.name, ptr):
                raise BackendError(f"{self.path}: IExecutionContext.set_tensor_address({spec.name!r}) failed")
            host = self._host_buffer(state, spec.name, nbytes)
            results[spec.name] = host[:nbytes].view(spec.dtype).reshape(shape)
        if not ctx.execute_async_v3(self.allocator.stream_handle(state.stream)):
            raise BackendError(f"{self.path}: IExecutionContext.execute_async_v3 failed (see the TensorRT log)")
        for spec in self._outputs:
            view = results[spec.name]
            if view.nbytes:
                self.allocator.dtoh_async(view, state.device[spec.name][0], state.stream)
        self.allocator.stream_synchronize(state.stream)
        # The pinned buffers are reused by this thread's next call: hand out copies.
        return {k: v.copy() for k, v in results.items()}


# ============================================================================================ gallery


class ResidentGallery:
    """Gallery arrays (``images`` (N, R, d), ``image_gram`` (N, R, R)) uploaded to the GPU once.

    ``block_feeds(start, stop)`` returns ``DeviceArray`` views of rows ``start:stop`` by pointer offset
    (``ptr + start * row_bytes``), to pass to ``TensorRTBackend.run_device`` with the query inputs.
    Read-only after upload, so several threads may share one.
    """

    def __init__(self, backend: TensorRTBackend, arrays: Mapping[str, np.ndarray], chunk_bytes: int = 64 << 20) -> None:
        self.backend = backend
        self.allocator = backend.allocator
        dtypes = {t.name: t.dtype for t in backend.inputs}
        self._arrays: dict[str, DeviceArray] = {}
        self._row_bytes: dict[str, int] = {}
        lengths = {len(a) for a in arrays.values()}
        if len(lengths) != 1:
            raise BackendError(f"ResidentGallery: arrays differ in length {sorted(lengths)}")
        self.n = lengths.pop()
        try:
            for name, array in arrays.items():
                if name not in dtypes:
                    raise BackendError(f"ResidentGallery: {backend.path} has no input {name!r} "
                                       f"(inputs {sorted(dtypes)})")
                dtype = np.dtype(dtypes[name])
                shape = tuple(int(s) for s in array.shape)
                row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
                ptr = self.allocator.malloc(max(row_bytes * self.n, 1))
                self._arrays[name] = DeviceArray(ptr, shape, dtype)
                self._row_bytes[name] = row_bytes
                # Upload in chunks so a memory-mapped gallery is never fully copied (or cast) in RAM.
                rows = max(1, chunk_bytes // max(row_bytes, 1))
                for a in range(0, self.n, rows):
                    chunk = np.ascontiguousarray(array[a:a + rows], dtype=dtype)
                    self.allocator.htod(ptr + a * row_bytes, chunk)
        except Exception:
            self.close()
            raise
        logger.info("resident gallery: %d rows, %.1f MiB on the GPU", self.n,
                    sum(d.nbytes for d in self._arrays.values()) / 2**20)

    def __len__(self) -> int:
        return self.n

    def block_feeds(self, start: int, stop: int) -> dict[str, DeviceArray]:
        if not (isinstance(start, (int, np.integer)) and isinstance(stop, (int, np.integer))
                and 0 <= start < stop <= self.n):
            raise BackendError(f"ResidentGallery.block_feeds({start!r}, {stop!r}): need 0 <= start < stop <= {self.n}")
        rows = int(stop - start)
        return {name: DeviceArray(d.ptr + int(start) * self._row_bytes[name], (rows,) + d.shape[1:], d.dtype)
                for name, d in self._arrays.items()}

    def close(self) -> None:
        arrays, self._arrays = self._arrays, {}
        for d in arrays.values():
            self.allocator.free(d.ptr)

    def __enter__(self) -> "ResidentGallery":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
