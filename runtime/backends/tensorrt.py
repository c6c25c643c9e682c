"""TensorRT backend: runs the ``.plan`` files (TensorRT serialized engines) that ``export/build_engine.py``
recorded in the manifest.

TensorRT and the CUDA bindings are imported lazily, inside functions, so this module imports on
machines without them (the development and CI machines cannot install TensorRT, docs/design.md section 5).

* ``TensorRTBackend.from_manifest(manifest, kind)`` refuses a plan built by another TensorRT, for
  another GPU, or from another graph (``runtime.backends.plan_check.check_plan_record``), then
  deserializes it.
* One execution context and one CUDA stream per thread (TensorRT contexts are not thread-safe);
  device buffers and pinned host buffers are per thread too and grow as needed, never per call.
* ``run(feeds)`` takes and returns numpy arrays; ``run_device(feeds)`` also accepts ``DeviceArray``
  inputs already on the GPU, such as the blocks of a ``ResidentGallery`` (uploaded once, then passed
  by pointer offset instead of copied per block).
* Placement: ``upload`` keeps a gallery's blocks on the GPU (``ResidentGallery``); ``block_topk`` runs
  the head's top-k plan on them (``scan.topk.plan``, opened on first use) when k fits its ``topk_max``,
  so only (k, Q) values per block come back; otherwise the head plan and a host top-k.
* Device memory goes through a small allocator (``runtime/backends/cuda_memory.py``).

Every boolean TensorRT returns is checked and a failure raises BackendError naming the call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends.base import Backend, BackendError, Block, GalleryBlocks, TensorSpec
from runtime.backends.cuda_memory import DeviceAllocator, DeviceArray, open_allocator
from runtime.backends.plan_check import TOPK_OUTPUTS, check_plan_record, shape_in_profile
from runtime.manifest import Manifest

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "pip install tensorrt cuda-python, on a machine with an NVIDIA GPU and driver; "
    "meanwhile --backend onnxruntime serves the ONNX graphs"
)

# Device buffers grow to the next multiple of this, so small shape changes do not reallocate.
_ALIGN = 1 << 16


def _import_trt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendError(f"TensorRT is not installed ({e}): {INSTALL_HINT}") from e
    return trt


# ============================================================================================ backend


class _ThreadState:
    """A thread's execution context, stream, and reusable device / pinned host buffers."""

    def __init__(self, context: Any, stream: Any) -> None:
        self.context = context
        self.stream = stream
        self.device: dict[str, tuple[int, int]] = {}  # tensor -> (ptr, capacity bytes)
        self.host: dict[str, np.ndarray] = {}  # tensor -> pinned uint8 buffer


Feed = np.ndarray | DeviceArray


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(
        self,
        plan_path: str | Path,
        *,
        record: Mapping[str, Any] | None = None,
        dim_names: Mapping[str, list[Any]] | None = None,
        allocator: DeviceAllocator | None = None,
        topk: Callable[[], TensorRTBackend] | None = None,
        topk_max: int = 0,
    ) -> None:
        """``topk``: opens the head's top-k plan (on first use), which serves ``block_topk`` for k <= ``topk_max``."""
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
            raise BackendError(f"{self.path}: cannot read the plan ({e})") from e
        self._engine = self._runtime.deserialize_cuda_engine(blob)
        if self._engine is None:
            raise BackendError(
                f"{self.path}: Runtime.deserialize_cuda_engine returned None (built by another "
                f"TensorRT or for another GPU? see the TensorRT log above); rebuild it with "
                f"export/build_engine.py"
            )
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
        self._open_topk = topk
        self._topk: TensorRTBackend | None = None
        self.topk_max = int(topk_max) if topk is not None else 0

    @classmethod
    def from_manifest(cls, manifest: Manifest, kind: str) -> TensorRTBackend:
        """Open the recorded plan of ``kind`` ('image', 'text', 'head', 'topk') after checking it fits."""
        trt = _import_trt()
        allocator = open_allocator()
        gpu_name, cc = allocator.device_info()
        plan = check_plan_record(manifest, kind, trt.__version__, gpu_name, cc)
        record = manifest.plan(kind)
        dim_names = manifest.dim_names(manifest.plan_source_key(kind))
        if kind == "topk":
            q = dim_names.get("sims", ["N", "Q"])[1]
            dim_names.update({name: ["K", q] for name in TOPK_OUTPUTS})
        logger.info(
            "TensorRT %s plan %s (%s, %s) on %s", kind, plan, record.get("precision"), record.get("strategy"), gpu_name
        )
        topk = None
        if kind == "head" and manifest.topk_max:

            def topk() -> TensorRTBackend:
                return cls.from_manifest(manifest, "topk")

        return cls(plan, record=record, dim_names=dim_names, allocator=allocator, topk=topk, topk_max=manifest.topk_max)

    # ------------------------------------------------------------------ interface

    @property
    def profile(self) -> dict[str, dict[str, list[int]]]:
        """The plan's optimization profile: ``{input: {"min", "opt", "max"}}``; calls must fit in it."""
        return self._profile

    @property
    def limits(self) -> dict[str, int]:
        """Largest size along axis 0 per input: the profile's max (calls outside the profile fail)."""
        return {name: int(p["max"][0]) for name, p in self._profile.items() if p["max"]}

    def upload(self, blocks: Callable[[], Iterable[Block]], resident: bool | None = None) -> GalleryBlocks:
        """Each block's arrays are copied to the GPU once (``ResidentGallery``) unless ``resident`` is False."""
        if resident is False:
            return super().upload(blocks, resident)
        galleries: list[ResidentGallery] = []

        def release() -> None:
            for g in galleries:
                g.close()

        uploaded = []
        try:
            for offset, feeds in blocks():
                gallery = ResidentGallery(self, feeds)
                galleries.append(gallery)
                uploaded.append((offset, gallery.block_feeds(0, len(gallery))))
        except Exception:
            release()
            raise
        return GalleryBlocks(uploaded, release)

    def _topk_plan(self, k: int, axis: int) -> TensorRTBackend | None:
        """The top-k plan when it can serve this search (image gallery, k within its topk_max), else None."""
        if self._open_topk is None or axis != 0 or k > self.topk_max:
            return None
        with self._lock:  # open once, even when the first searches arrive from several threads
            if self._topk is None:
                self._topk = self._open_topk()
            return self._topk

    def block_topk(
        self, gallery: GalleryBlocks, queries: Mapping[str, np.ndarray], k: int, axis: int, output: str = "sims"
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        topk = self._topk_plan(k, axis)
        if topk is None:  # the host top-k over block_sims (below)
            yield from super().block_topk(gallery, queries, k, axis, output)
            return
        for offset, feeds in gallery:
            # The top-k runs in the plan: only (k', q) results per block come back to the host.
            out = topk.run_device({**feeds, **queries})
            rows = out[TOPK_OUTPUTS[1]].T[:, :k].astype(np.int64) + offset  # (q, k')
            yield out[TOPK_OUTPUTS[0]].T[:, :k].astype(np.float32), rows

    def block_sims(
        self, gallery: GalleryBlocks, queries: Mapping[str, np.ndarray], axis: int, output: str = "sims"
    ) -> Iterator[tuple[int, np.ndarray]]:
        for offset, feeds in gallery:  # resident blocks are device arrays: run_device, never a host copy
            sims = self.run_device({**feeds, **queries})[output]  # (N, Q)
            yield offset, (sims.T if axis == 0 else sims).astype(np.float32, copy=False)

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
                    raise BackendError(
                        f"{self.path}: device input {k!r} is {np.dtype(v.dtype)}, the plan takes {self._in_dtype[k]}"
                    )
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
            topk, self._topk = self._topk, None
        if topk is not None:
            topk.close()
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
            raise BackendError(f"{self.path}: ICudaEngine.create_execution_context returned None (out of GPU memory?)")
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
                    f"{self.path}: input {name!r} has shape {shape}, outside the plan's profile "
                    f"min {tuple(profile['min'])} .. max {tuple(profile['max'])}; send smaller blocks or rebuild "
                    "with larger --max-batch / --block / --max-words (export/build_engine.py)"
                )
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
                staged = host[: value.nbytes].view(value.dtype).reshape(value.shape)
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
                    raise BackendError(
                        f"ResidentGallery: {backend.path} has no input {name!r} (inputs {sorted(dtypes)})"
                    )
                dtype = np.dtype(dtypes[name])
                shape = tuple(int(s) for s in array.shape)
                row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
                ptr = self.allocator.malloc(max(row_bytes * self.n, 1))
                self._arrays[name] = DeviceArray(ptr, shape, dtype)
                self._row_bytes[name] = row_bytes
                # Upload in chunks so a memory-mapped gallery is never fully copied (or cast) in RAM.
                rows = max(1, chunk_bytes // max(row_bytes, 1))
                for a in range(0, self.n, rows):
                    chunk = np.ascontiguousarray(array[a : a + rows], dtype=dtype)
                    self.allocator.htod(ptr + a * row_bytes, chunk)
        except Exception:
            self.close()
            raise
        logger.info(
            "resident gallery: %d rows, %.1f MiB on the GPU",
            self.n,
            sum(d.nbytes for d in self._arrays.values()) / 2**20,
        )

    def __len__(self) -> int:
        return self.n

    def block_feeds(self, start: int, stop: int) -> dict[str, DeviceArray]:
        if not (
            isinstance(start, (int, np.integer)) and isinstance(stop, (int, np.integer)) and 0 <= start < stop <= self.n
        ):
            raise BackendError(f"ResidentGallery.block_feeds({start!r}, {stop!r}): need 0 <= start < stop <= {self.n}")
        rows = int(stop - start)
        return {
            name: DeviceArray(d.ptr + int(start) * self._row_bytes[name], (rows, *d.shape[1:]), d.dtype)
            for name, d in self._arrays.items()
        }

    def close(self) -> None:
        arrays, self._arrays = self._arrays, {}
        for d in arrays.values():
            self.allocator.free(d.ptr)

    def __enter__(self) -> ResidentGallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
