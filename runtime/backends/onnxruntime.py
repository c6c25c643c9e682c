"""ONNX Runtime backend: CPU by default, CUDA when ``onnxruntime-gpu`` is installed.

``open_session`` is the project's one ONNX Runtime session factory (serving, export parity checks,
benchmarks). Providers are chosen explicitly and checked after the session opens, so a silent fallback
to the CPU (ONNX Runtime's default when a provider fails to load) is reported instead of hidden.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends.base import Backend, BackendError, Block, GalleryBlocks, TensorSpec
from runtime.install import install_command
from runtime.threads import Threads

logger = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(double)": np.float64,
}


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendError(
            f"ONNX Runtime is not installed: {install_command('cpu')} (or {install_command('gpu')} for onnxruntime-gpu)"
        ) from e
    return ort


def open_session(
    model: str | Path | bytes,
    device: str = "cpu",
    threads: int | None = None,
    inter_op_threads: int | None = None,
    spinning: bool | None = None,
):
    """An ``onnxruntime.InferenceSession`` for ``model`` (a path or serialized bytes) on ``device``.

    ``threads`` (intra-op), ``inter_op_threads`` and ``spinning`` (idle intra-op threads busy-wait): None takes
    ``runtime.threads.Threads.for_cores()``'s. Raises BackendError naming the model when the session cannot
    open or when the provider asked for did not load.
    """
    ort = _import_ort()
    label = f"{len(model)}-byte model" if isinstance(model, (bytes, bytearray)) else str(model)
    if device not in ("cpu", "cuda"):
        raise BackendError(f"device must be 'cpu' or 'cuda', received {device!r}")
    providers: Sequence[str] = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendError(
                f"device 'cuda' needs onnxruntime-gpu ({install_command('gpu')}); "
                f"this ONNX Runtime has {ort.get_available_providers()}"
            )
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    opts = ort.SessionOptions()
    budget = Threads.for_cores()
    opts.intra_op_num_threads = threads or budget.intra_op
    opts.inter_op_num_threads = inter_op_threads or budget.inter_op
    spin = budget.spinning if spinning is None else spinning
    # Both pools: the inter-op one spins too when it has more than one thread.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "1" if spin else "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    source = bytes(model) if isinstance(model, (bytes, bytearray)) else str(model)
    try:
        session = ort.InferenceSession(source, sess_options=opts, providers=list(providers))
    except Exception as e:  # ORT raises its own exception types (InvalidGraph, NoSuchFile, ...)
        raise BackendError(f"ONNX Runtime cannot open {label}: {e}") from e
    got = session.get_providers()
    if providers[0] not in got:
        raise BackendError(f"{label}: asked ONNX Runtime for {providers[0]}, the session has {got}")
    return session


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
    ) -> None:
        self._ort = _import_ort()
        self.path = Path(path)
        self._session = open_session(
            self.path, device=device, threads=intra_op_threads, inter_op_threads=inter_op_threads
        )
        self.device = device
        self._inputs = [
            TensorSpec(i.name, np.dtype(_ORT_TYPES.get(i.type, np.float32)), tuple(i.shape))
            for i in self._session.get_inputs()
        ]
        self._outputs = [
            TensorSpec(o.name, np.dtype(_ORT_TYPES.get(o.type, np.float32)), tuple(o.shape))
            for o in self._session.get_outputs()
        ]
        self._output_names = [o.name for o in self._outputs]

    def to_device(self, array: np.ndarray, name: str):
        """Upload ``array`` once, in input ``name``'s dtype, to the session's device (CUDA, or CPU).

        The returned OrtValue may stand in for that input in ``run``: a gallery block uploaded this way
        stays on the GPU across queries (IOBinding), instead of being copied on every call.
        """
        dtype = {t.name: t.dtype for t in self._inputs}[name]
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, dtype=dtype), self.device, 0)

    def upload(self, blocks: Callable[[], Iterable[Block]], resident: bool | None = None) -> GalleryBlocks:
        """Resident (the default on CUDA): every block is uploaded once as OrtValues (IOBinding inputs) and
        stays on the device; otherwise the host arrays are read per search (the default on the CPU, where an
        OrtValue copy would only double the memory)."""
        if not (self.device == "cuda" if resident is None else resident):
            return super().upload(blocks, resident)
        return GalleryBlocks(
            [(offset, {k: self.to_device(v, k) for k, v in feeds.items()}) for offset, feeds in blocks()]
        )

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise BackendError(f"{self.path}: backend is closed")
        # InferenceSession.run and a per-call IOBinding are thread-safe; no per-thread state needed.
        if self.device == "cpu" and not any(isinstance(v, self._ort.OrtValue) for v in feeds.values()):
            values = self._session.run(self._output_names, dict(feeds))
            return dict(zip(self._output_names, values))
        binding = self._session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, self._ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self._output_names:
            binding.bind_output(name, "cpu")  # only the (small) results come back
        self._session.run_with_iobinding(binding)
        return dict(zip(self._output_names, binding.copy_outputs_to_cpu()))

    def close(self) -> None:
        self._session = None
