"""Backend selection: ``auto`` | ``onnxruntime`` | ``tensorrt`` | ``numpy`` | ``cupy`` | ``openvino``.

``auto`` serves a ``.plan`` with TensorRT when it is installed and falls back to the manifest's ONNX
graphs with a warning otherwise; ``tensorrt`` without TensorRT is an error. ``numpy`` and ``cupy`` serve
the export's weights file with no graph runtime (``runtime/backends/arrays.py``). On the CPU ``auto``
picks ONNX Runtime, measured faster than numpy in the head (bench/cpu_backends.py), and numpy when
ONNX Runtime is not installed. ``openvino`` (opt-in, approximate) runs the similarity head in bf16 with
OpenVINO and the encoders on ONNX Runtime (``runtime/backends/openvino.py``); ``auto`` never picks it.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from runtime.backends.base import Backend, BackendError, TensorSpec
from runtime.install import install_command
from runtime.manifest import Manifest
from runtime.options import EngineOptions

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt", "numpy", "cupy", "openvino")
ARRAY_BACKENDS = ("numpy", "cupy")

__all__ = [
    "ARRAY_BACKENDS",
    "BACKENDS",
    "Backend",
    "BackendError",
    "TensorSpec",
    "choose_backend",
    "open_backend",
    "tensorrt_available",
]


def module_available(name: str) -> bool:
    """Whether ``import name`` can find the module (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a finder that refuses the name, or a broken half-imported module
        return False


def tensorrt_available() -> bool:
    return module_available("tensorrt")


def choose_backend(requested: str, engine_path: str | Path | None, manifest: Manifest) -> str:
    """Resolve ``requested`` to a concrete backend name, warning on stderr when ``auto`` falls back."""
    if requested not in BACKENDS:
        raise BackendError(f"unknown backend {requested!r}; expected one of {', '.join(BACKENDS)}")
    wants_plan = engine_path is not None and Path(engine_path).suffix == ".plan"
    if requested in ("onnxruntime", *ARRAY_BACKENDS):
        return requested
    if requested == "openvino":
        if not module_available("openvino"):
            raise BackendError(
                f"--backend openvino: OpenVINO is not installed ({install_command('openvino')}); "
                "--backend onnxruntime serves the model exactly meanwhile"
            )
        return "openvino"
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
    if not module_available("onnxruntime") and manifest.data.get("weights"):
        # ONNX Runtime is the CPU default (faster than numpy in bench/results/cpu_backends.txt); without
        # it, the weights file still serves the model.
        logger.warning("ONNX Runtime is not installed; serving %s with the numpy backend", manifest.path)
        return "numpy"
    return "onnxruntime"


def open_backend(manifest: Manifest, graph: str, options: EngineOptions) -> Backend:
    """Open the ``graph`` ('image', 'text', 'head') of ``manifest`` on ``options.backend`` (a concrete one)."""
    if options.backend == "tensorrt":
        from runtime.backends.tensorrt import TensorRTBackend

        return TensorRTBackend.from_manifest(manifest, graph)
    from runtime.backends.onnxruntime import OnnxRuntimeBackend

    path = manifest.file(manifest.graph(graph, options.precision))
    if options.backend == "openvino" and graph == "head":
        from runtime.backends.openvino import OpenVinoBackend

        if options.precision != "fp32" or options.device != "cpu":
            raise BackendError(
                f"--backend openvino runs the fp32 head graph in bf16 on the CPU; received precision "
                f"{options.precision!r}, device {options.device!r} (expected 'fp32', 'cpu')"
            )
        return OpenVinoBackend(path, threads=options.threads)
    return OnnxRuntimeBackend(path, device=options.device, intra_op_threads=options.threads)
