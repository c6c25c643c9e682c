"""ONNX Runtime backend: CPU by default, CUDA when ``onnxruntime-gpu`` is installed.

Providers are chosen explicitly and checked after the session opens, so a silent fallback to the
CPU (ONNX Runtime's default when a provider fails to load) is reported instead of hidden.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from runtime.backends.base import Backend, BackendError, TensorSpec

logger = logging.getLogger(__name__)

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(double)": np.float64}


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendError("ONNX Runtime is not installed: pip install 'scan-runtime[cpu]' "
                           "(or [gpu] for onnxruntime-gpu)") from e
    return ort


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, path: str | Path, device: str = "cpu", intra_op_threads: int | None = None,
                 inter_op_threads: int = 1) -> None:
        ort = _import_ort()
        self._ort = ort
        self.path = Path(path)
        if device not in ("cpu", "cuda"):
            raise BackendError(f"device must be 'cpu' or 'cuda', received {device!r}")
        providers: Sequence[str] = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendError("device 'cuda' needs onnxruntime-gpu (pip install 'scan-runtime[gpu]'); "
                                   f"this ONNX Runtime has {ort.get_available_providers()}")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads or default_threads()
        opts.inter_op_num_threads = inter_op_threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=opts, providers=list(providers))
        except Exception as e:  # ORT raises its own exception types (InvalidGraph, NoSuchFile, ...)
            raise BackendError(f"ONNX Runtime cannot open {self.path}: {e}") from e
        got = self._session.get_providers()
        if providers[0] not in got:
            raise BackendError(f"{self.path}: asked ONNX Runtime for {providers[0]}, the session has {got}")
        self.device = device
        self._inputs = [TensorSpec(i.name, np.dtype(_ORT_TYPES.get(i.type, np.float32)), tuple(i.shape))
                        for i in self._session.get_inputs()]
        self._outputs = [TensorSpec(o.name, np.dtype(_ORT_TYPES.get(o.type, np.float32)), tuple(o.shape))
                         for o in self._session.get_outputs()]
        self._output_names = [o.name for o in self._outputs]

    def to_device(self, array: np.ndarray, name: str):
        """Upload ``array`` once, in input ``name``'s dtype, to the session's device (CUDA, or CPU).

        The returned OrtValue may stand in for that input in ``run``: a gallery block uploaded this way
        stays on the GPU across queries (IOBinding), instead of being copied on every call.
        """
        dtype = {t.name: t.dtype for t in self._inputs}[name]
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, dtype=dtype), self.device, 0)

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
