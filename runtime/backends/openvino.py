"""OpenVINO backend: the similarity head in bfloat16 on the CPU (``--backend openvino``; approximate, opt-in).

Only the head runs here (``runtime.backends.open_backend`` keeps the encoders on ONNX Runtime, exact). The
head is memory-bound for one query: it reads every cached region once. So the gain comes from *reading*
bf16, not from computing in it: ``upload`` converts the gallery's ``images`` and ``image_gram`` to bf16 once
(resident by default, half the float32 bytes), and the graph is rewritten so those two inputs are bf16
parameters feeding bf16 MatMuls (the other operand is converted, the product converted back to float32;
everything after the MatMuls stays float32). OpenVINO's own ``INFERENCE_PRECISION_HINT=bf16`` on the float32
graph converts the float32 gallery to bf16 on every call instead, which measured slower than ONNX Runtime
float32 (bench/openvino_head.py).

bf16 keeps float32's exponent and 8 significant bits: a stored value is off by at most 2**-8 relative (half
a unit in the last place). Top-10 agreement with exact is measured by bench/openvino_head.py. Measured on a
CPU with AVX-512 bf16 (AMD Zen 4); on a CPU without bf16 instructions it was not measured.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends.base import Backend, BackendError, Block, GalleryBlocks, TensorSpec
from runtime.install import install_command
from runtime.threads import Threads

logger = logging.getLogger(__name__)

# The head inputs held in bf16: either can be the gallery a search reads per query (images for text queries,
# captions for image queries); the query side is converted per call (a few rows).
BF16_INPUTS = ("images", "image_gram", "captions")
# Ops an input may pass through on its way to a MatMul without looking at its values.
_SHAPE_ONLY = {"Reshape", "Transpose", "Squeeze", "Unsqueeze"}
_NUMPY = {"f32": np.float32, "f16": np.float16, "i64": np.int64, "i32": np.int32, "f64": np.float64}


def _import_openvino():
    try:
        import openvino
    except ImportError as e:
        raise BackendError(f"--backend openvino: OpenVINO is not installed ({install_command('openvino')})") from e
    return openvino


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounded to nearest even (what a hardware conversion does)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    out = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():  # the rounding carry would turn some NaN payloads into -0 or inf: keep them NaN
        out[nan] = 0x7FC0
    return out


def from_bf16(x: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> float32 (exact)."""
    return (x.astype(np.uint32) << np.uint32(16)).view(np.float32)


def bf16_head(model: Any, names: Iterable[str]) -> Any:
    """Rewrite an OpenVINO model in place: the parameters ``names`` become bf16 and every MatMul they reach
    (through shape-only ops) runs in bf16, its other operand converted to bf16 and its product back to f32.
    Any other op reading them gets them converted to f32 (exact: every bf16 value is a float32)."""
    ov = _import_openvino()
    import openvino.opset13 as ops

    wanted = set(names)
    for param in model.get_parameters():
        if param.get_friendly_name() not in wanted:
            continue
        param.set_element_type(ov.Type.bf16)
        pending = [param.output(0)]
        while pending:
            out = pending.pop()
            for target in list(out.get_target_inputs()):
                node = target.get_node()
                kind = node.get_type_name()
                if kind in _SHAPE_ONLY:
                    pending.append(node.output(0))
                elif kind == "MatMul":
                    other = node.input(1 - target.get_index())
                    source = other.get_source_output()
                    if source.get_element_type() != ov.Type.bf16:
                        other.replace_source_output(ops.convert(source, "bf16").output(0))
                    consumers = list(node.output(0).get_target_inputs())
                    back = ops.convert(node.output(0), "f32")
                    for c in consumers:
                        c.replace_source_output(back.output(0))
                elif kind != "ShapeOf":
                    target.replace_source_output(ops.convert(out, "f32").output(0))
    model.validate_nodes_and_infer_types()
    return model


def cpu_config(threads: int | None, precision: str = "bf16") -> dict[str, Any]:
    """OpenVINO's CPU plugin settings for one head: ``precision`` its inference precision hint."""
    return {
        "INFERENCE_PRECISION_HINT": precision,
        "INFERENCE_NUM_THREADS": threads or Threads.for_cores().intra_op,
        "PERFORMANCE_HINT": "LATENCY",
        # Like ONNX Runtime's spinning off (runtime/threads.py): threads pinned to cores would fight the event
        # loop, the batcher and other sessions for them.
        "ENABLE_CPU_PINNING": False,
    }


class OpenVinoBackend(Backend):
    """The head graph at ``path`` compiled by OpenVINO for the CPU with its gallery inputs in bf16.

    ``inputs`` advertises float32 (what callers pass); float32 feeds of ``BF16_INPUTS`` are converted per
    call, blocks from ``upload`` once."""

    name = "openvino"

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self._ov = ov = _import_openvino()
        self.path = Path(path)
        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
            present = {p.get_friendly_name() for p in model.get_parameters()}
            self._bf16 = tuple(n for n in BF16_INPUTS if n in present)
            bf16_head(model, self._bf16)
            self._compiled = core.compile_model(model, "CPU", cpu_config(threads))
        except BackendError:
            raise
        except Exception as e:  # OpenVINO raises RuntimeError subclasses of its own
            raise BackendError(f"OpenVINO cannot open {self.path}: {e}") from e
        self._inputs = [self._spec(p, p.get_any_name() in self._bf16) for p in self._compiled.inputs]
        self._outputs = [self._spec(o, False) for o in self._compiled.outputs]
        self._local = threading.local()  # an infer request per calling thread
        # Approximate, so said where the user sees it (as an int8 cache is, when opened).
        logger.warning(
            "%s: the similarity head runs in bf16 with OpenVINO %s (approximate: top-10 agreement with fp32 0.98-0.99 "
            "measured by bench/openvino_head.py)",
            self.path,
            ov.__version__,
        )
        self._closed = False

    @staticmethod
    def _spec(port: Any, bf16: bool) -> TensorSpec:
        name = port.get_any_name()
        dtype = np.float32 if bf16 else _NUMPY.get(port.get_element_type().get_type_name(), np.float32)
        return TensorSpec(name, np.dtype(dtype), tuple(str(d) for d in port.get_partial_shape()))

    def _tensor(self, name: str, value: Any) -> Any:
        if isinstance(value, self._ov.Tensor):
            return value
        if name in self._bf16:
            bits = to_bf16(value)
            return self._ov.Tensor(bits, list(bits.shape), self._ov.Type.bf16)
        return np.ascontiguousarray(value)

    def upload(self, blocks: Callable[[], Iterable[Block]], resident: bool | None = None) -> GalleryBlocks:
        """Resident by default: each block's bf16 inputs converted once (half the float32 bytes) and read per
        search; ``resident=False`` reads the host arrays and converts them per search (slower)."""
        if resident is False:
            return super().upload(blocks, resident)
        return GalleryBlocks(
            [(offset, {k: self._tensor(k, v) for k, v in feeds.items()}) for offset, feeds in blocks()]
        )

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if self._closed:
            raise BackendError(f"{self.path}: backend is closed")
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        try:
            out = request.infer({k: self._tensor(k, v) for k, v in feeds.items()})
        except Exception as e:
            raise BackendError(f"OpenVINO cannot run {self.path}: {e}") from e
        return {spec.name: np.array(out[i], dtype=spec.dtype) for i, spec in enumerate(self._outputs)}

    def close(self) -> None:
        self._closed = True
        self._compiled = None
