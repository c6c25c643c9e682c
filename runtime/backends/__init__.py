"""Backend selection: ``auto`` | ``onnxruntime`` | ``tensorrt``.

``auto`` serves a ``.plan`` with TensorRT when it is installed and falls back to the manifest's ONNX
graphs with a warning otherwise; ``tensorrt`` without TensorRT is an error.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from runtime.backends.base import Backend, BackendError, TensorSpec
from runtime.manifest import Manifest

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt")

__all__ = ["BACKENDS", "Backend", "BackendError", "TensorSpec", "choose_backend", "open_backend", "tensorrt_available"]


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def choose_backend(requested: str, engine_path: str | Path | None, manifest: Manifest) -> str:
    """Resolve ``requested`` to a concrete backend name, warning on stderr when ``auto`` falls back."""
    if requested not in BACKENDS:
        raise BackendError(f"unknown backend {requested!r}; expected one of {', '.join(BACKENDS)}")
    wants_plan = engine_path is not None and Path(engine_path).suffix == ".plan"
    if requested == "onnxruntime":
        return "onnxruntime"
    if requested == "tensorrt":
        if not tensorrt_available():
            raise BackendError(
                "--backend tensorrt: TensorRT is not installed (pip install tensorrt, on a machine "
                "with an NVIDIA GPU); --backend onnxruntime serves the ONNX graphs meanwhile"
            )
        if not manifest.plans:
            raise BackendError(
                f"--backend tensorrt: {manifest.path} lists no TensorRT plans; "
                f"build them with export/build_engine.py {manifest.path}"
            )
        return "tensorrt"
    if wants_plan:
        if tensorrt_available() and manifest.plans:
            return "tensorrt"
        reason = "TensorRT is not installed" if not tensorrt_available() else "the manifest lists no plans"
        # The CLIs route warnings to stderr (logging.basicConfig); a library does not print.
        logger.warning("%s: %s; falling back to the ONNX graphs with ONNX Runtime", engine_path, reason)
    return "onnxruntime"


def open_backend(
    manifest: Manifest,
    kind: str,
    backend: str = "onnxruntime",
    precision: str = "fp32",
    device: str = "cpu",
    threads: int | None = None,
) -> Backend:
    """Open the ``kind`` graph ('image', 'text', 'head') of ``manifest`` on a concrete backend."""
    if backend == "tensorrt":
        from runtime.backends.tensorrt import TensorRTBackend

        return TensorRTBackend.from_manifest(manifest, kind)
    from runtime.backends.onnxruntime import OnnxRuntimeBackend

    path = manifest.file(manifest.graph(kind, precision))
    return OnnxRuntimeBackend(path, device=device, intra_op_threads=threads)
