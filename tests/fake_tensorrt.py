"""Test doubles for TensorRT and CUDA, shared by the TensorRT tests (the one place they live).

A fake ``tensorrt`` module whose "engine" is the ONNX graph run by ONNX Runtime, and an allocator whose
"device memory" is host memory: they check our code against TensorRT's documented API, not TensorRT.
Also the small helpers those tests share (a golden export, a build with the stand-ins).
"""

from __future__ import annotations

import ctypes
import pickle
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import GOLDEN


def export_golden(case: str, out: Path) -> Path:
    """Export a golden checkpoint (tiny dimensions, ~1 s) and return its manifest path."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from export.checkpoint import load_checkpoint, load_vocab
    from export.exporter import export_all

    ckpt = load_checkpoint(GOLDEN / case / "ckpt.pth.tar")
    vocab = load_vocab(GOLDEN / case / "vocab.json", ckpt.config)
    export_all(ckpt, vocab.to_json_dict(), out)
    return out / "scan.json"


def copy_export(src_manifest: Path, dst: Path) -> Path:
    """Copy an export's files (not its lock files) to ``dst``; returns the copied manifest."""
    for f in src_manifest.parent.iterdir():
        if f.is_file() and not f.name.startswith("."):
            (dst / f.name).write_bytes(f.read_bytes())
    return dst / src_manifest.name


def build_with_fakes(monkeypatch, manifest_path: Path, *extra: str, trt=None, allocator=None):
    """Run export/build_engine.py against the stand-ins; returns (exit status, fake trt, fake allocator)."""
    trt, allocator = install_fakes(monkeypatch, trt, allocator)
    from export.build_engine import main

    rc = main([str(manifest_path), "--max-batch", "16", "--block", "64", "--max-words", "40", *extra])
    return rc, trt, allocator


class _Enum:
    """Stands in for a pybind11 enum member: has ``.name`` and ``int()``."""

    def __init__(self, name: str, value: int = 0) -> None:
        self.name, self.value = name, value

    def __int__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return self.name


def _ns(**members) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{k: _Enum(k, v) for k, v in members.items()})


# ONNX op -> (LayerType name, op name) roughly as onnx-tensorrt imports it.
_ONNX_TO_LAYER = {
    "MatMul": ("MATRIX_MULTIPLY", None),
    "ReduceSum": ("REDUCE", None),
    "ReduceMax": ("REDUCE", None),
    "ReduceL2": ("REDUCE", None),
    "Softmax": ("SOFTMAX", None),
    "Exp": ("UNARY", "EXP"),
    "Log": ("UNARY", "LOG"),
    "Sqrt": ("UNARY", "SQRT"),
    "Not": ("UNARY", "NOT"),
    "Div": ("ELEMENTWISE", "DIV"),
    "Pow": ("ELEMENTWISE", "POW"),
    "Mul": ("ELEMENTWISE", "PROD"),
    "Add": ("ELEMENTWISE", "SUM"),
    "Sub": ("ELEMENTWISE", "SUB"),
    "Less": ("ELEMENTWISE", "LESS"),
    "Shape": ("SHAPE", None),
    "Cast": ("CAST", None),
    "Gather": ("GATHER", None),
    "LeakyRelu": ("ACTIVATION", None),
    "Clip": ("ACTIVATION", None),
    "Where": ("SELECT", None),
    "TopK": ("TOPK", None),
    "GRU": ("RECURRENCE", None),
}
_INT_LAYERS = {"SHAPE", "GATHER", "CAST"}


class FakeTensor:
    def __init__(self, name, dtype):
        self.name, self.dtype = name, dtype


class FakeLayer:
    def __init__(self, trt, index, node):
        type_name, op = _ONNX_TO_LAYER.get(node.op_type, ("SHUFFLE", None))
        self.type = _Enum(type_name)
        self.name = node.name or f"layer{index}"
        self._op = op
        self._inputs = [FakeTensor(t, trt.float32) for t in node.input if t]
        dtype = trt.int64 if type_name in _INT_LAYERS or op in ("LESS", "NOT") else trt.float32
        self._outputs = [FakeTensor(t, dtype) for t in node.output]
        self.precision = None
        self.output_types = {}

    num_inputs = property(lambda self: len(self._inputs))
    num_outputs = property(lambda self: len(self._outputs))

    def get_input(self, j):
        return self._inputs[j]

    def get_output(self, j):
        return self._outputs[j]

    def set_output_type(self, j, dtype):
        self.output_types[j] = dtype


class FakeUnaryLayer(FakeLayer):
    @property
    def op(self):
        return _Enum(self._op)


class FakeElementWiseLayer(FakeUnaryLayer):
    pass


class FakeNetwork:
    def __init__(self, trt, flags):
        self.trt, self.flags, self.onnx = trt, flags, None
        self.layers, self.input_names = [], []

    def load(self, blob: bytes) -> None:
        import onnx

        model = onnx.load_from_string(blob)
        self.onnx = blob
        init = {i.name for i in model.graph.initializer}
        self.input_names = [i.name for i in model.graph.input if i.name not in init]
        self.layers = [FakeLayer(self.trt, i, n) for i, n in enumerate(model.graph.node) if n.op_type != "Constant"]

    num_layers = property(lambda self: len(self.layers))
    num_inputs = property(lambda self: len(self.input_names))

    def get_layer(self, i):
        return self.layers[i]

    def get_input(self, i):
        return FakeTensor(self.input_names[i], self.trt.float32)


class FakeParser:
    def __init__(self, network, logger):
        self.network, self.errors = network, []

    def _fail(self) -> bool:
        if self.network.trt.parse_errors:
            self.errors = list(self.network.trt.parse_errors)
            return False
        return True

    def parse(self, blob):
        if not self._fail():
            return False
        self.network.load(bytes(blob))
        return True

    def parse_from_file(self, path):
        return self.parse(Path(path).read_bytes()) if self._fail() else False

    num_errors = property(lambda self: len(self.errors))

    def get_error(self, i):
        return f"In node {i} (importFoo): UNSUPPORTED_NODE: {self.errors[i]}"


class FakeProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (list(lo), list(opt), list(hi))


class FakeCache:
    def __init__(self, blob):
        self.blob = bytes(blob)

    def serialize(self):
        return self.blob + b"+tuned"


class FakeConfig:
    def __init__(self, trt):
        self.trt, self.flags, self.profiles, self.cache, self.pool = trt, set(), [], None, None

    def set_flag(self, flag):
        self.flags.add(flag.name)

    def clear_flag(self, flag):
        self.flags.discard(flag.name)

    def set_memory_pool_limit(self, pool, size):
        self.pool = size

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, blob):
        return FakeCache(blob)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache
        return True


class FakeBuilder:
    def __init__(self, trt, logger):
        if not trt.has_gpu:
            raise TypeError("pybind11::init(): factory function returned nullptr")
        self.trt = trt

    def create_network(self, flags):
        return FakeNetwork(self.trt, flags)

    def create_builder_config(self):
        return FakeConfig(self.trt)

    def create_optimization_profile(self):
        return FakeProfile()

    def build_serialized_network(self, network, config):
        if self.trt.fail_build:
            return None
        self.trt.builds.append({"network": network, "config": config})
        return pickle.dumps({"onnx": network.onnx, "profile": config.profiles[0].shapes})


class FakeEngine:
    """A "plan": the ONNX graph and the profile, run by ONNX Runtime."""

    def __init__(self, trt, spec):
        import onnxruntime as ort

        self.trt = trt
        self.session = ort.InferenceSession(spec["onnx"], providers=["CPUExecutionProvider"])
        self.profile = spec["profile"]
        types_ = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
        self.io = [
            (i.name, trt.TensorIOMode.INPUT, np.dtype(types_[i.type]), i.shape) for i in self.session.get_inputs()
        ]
        self.io += [
            (o.name, trt.TensorIOMode.OUTPUT, np.dtype(types_[o.type]), o.shape) for o in self.session.get_outputs()
        ]
        self.contexts = []

    num_io_tensors = property(lambda self: len(self.io))

    def _io(self, name):
        return next(x for x in self.io if x[0] == name)

    def get_tensor_name(self, i):
        return self.io[i][0]

    def get_tensor_mode(self, name):
        return self._io(name)[1]

    def get_tensor_dtype(self, name):
        return self._io(name)[2]

    def get_tensor_shape(self, name):
        return [d if isinstance(d, int) else -1 for d in self._io(name)[3]]

    def get_tensor_profile_shape(self, name, index):
        return self.profile[name]

    def create_execution_context(self):
        ctx = FakeContext(self)
        self.contexts.append(ctx)
        return ctx


def _read(ptr, shape, dtype):
    n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_uint8 * max(n, 1)).from_address(ptr), np.uint8)[:n].view(dtype).reshape(shape).copy()


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.out = engine, {}, {}, None
        self.thread = threading.get_ident()

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profile[name]
        self.out = None
        if self.engine.trt.fail_calls.get("set_input_shape") or not all(a <= s <= b for s, a, b in zip(shape, lo, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def infer_shapes(self):
        return [n for n, mode, *_ in self.engine.io if mode.name == "INPUT" and n not in self.shapes]

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return not self.engine.trt.fail_calls.get("set_tensor_address")

    def _compute(self):
        if self.out is None:
            feeds = {
                n: _read(self.addresses[n], self.shapes[n], dt)
                for n, mode, dt, _ in self.engine.io
                if mode.name == "INPUT"
            }
            names = [n for n, mode, *_ in self.engine.io if mode.name == "OUTPUT"]
            self.out = dict(zip(names, self.engine.session.run(names, feeds)))
        return self.out

    def get_tensor_shape(self, name):
        if name in self.shapes:
            return list(self.shapes[name])
        return list(self._compute()[name].shape)

    def execute_async_v3(self, stream_handle):
        assert threading.get_ident() == self.thread, "a context was used from two threads"
        if self.engine.trt.fail_calls.get("execute_async_v3"):
            return False
        for name, value in self._compute().items():
            value = np.ascontiguousarray(value)
            ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
        self.out = None
        return True


class FakeRuntime:
    def __init__(self, trt, logger):
        self.trt = trt

    def deserialize_cuda_engine(self, blob):
        try:
            return FakeEngine(self.trt, pickle.loads(blob))
        except Exception:
            return None


def make_fake_trt(version: str = "10.9.0", has_gpu: bool = True) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.has_gpu, trt.fail_build, trt.parse_errors, trt.fail_calls, trt.builds = has_gpu, False, [], {}, []
    trt.float32, trt.float16, trt.int64, trt.int32 = (np.dtype(t) for t in ("float32", "float16", "int64", "int32"))
    trt.nptype = np.dtype
    trt.TensorIOMode = _ns(INPUT=0, OUTPUT=1)
    trt.MemoryPoolType = _ns(WORKSPACE=0)
    flags = {"TF32": 6} if int(version.split(".")[0]) >= 11 else {"FP16": 0, "TF32": 6, "OBEY_PRECISION_CONSTRAINTS": 9}
    trt.BuilderFlag = _ns(**flags)
    trt.NetworkDefinitionCreationFlag = _ns(STRONGLY_TYPED=1)

    class ILogger:
        Severity = _ns(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

        def __init__(self, *a):
            pass

    class Logger(ILogger):
        WARNING = ILogger.Severity.WARNING

    trt.ILogger, trt.Logger = ILogger, Logger
    trt.Builder = lambda logger: FakeBuilder(trt, logger)
    trt.Runtime = lambda logger: FakeRuntime(trt, logger)
    trt.OnnxParser = FakeParser
    trt.IUnaryLayer, trt.IElementWiseLayer = FakeUnaryLayer, FakeElementWiseLayer
    return trt


class FakeAllocator:
    """ "Device" memory is host memory, so pointers and offsets are real and checkable."""

    name = "fake"

    def __init__(self, gpu=("NVIDIA H200", "9.0")):
        self.gpu = gpu
        self.live: dict[int, np.ndarray] = {}
        self.host_live: dict[int, np.ndarray] = {}
        self.streams = 0

    def device_info(self):
        return self.gpu

    def malloc(self, nbytes):
        buf = np.zeros(max(int(nbytes), 1), np.uint8)
        self.live[buf.ctypes.data] = buf
        return buf.ctypes.data

    def free(self, ptr):
        del self.live[ptr]

    def malloc_host(self, nbytes):
        buf = np.zeros(max(int(nbytes), 1), np.uint8)
        self.host_live[buf.ctypes.data] = buf
        return buf

    def free_host(self, buf):
        del self.host_live[buf.ctypes.data]

    def stream_create(self):
        self.streams += 1
        return self.streams

    def stream_handle(self, stream):
        return int(stream)

    def stream_destroy(self, stream):
        self.streams -= 1

    def stream_synchronize(self, stream):
        pass

    def _owned(self, ptr, nbytes, pool):
        return any(base <= ptr and ptr + nbytes <= base + buf.nbytes for base, buf in pool.items())

    def htod_async(self, dst, src, stream):
        assert self._owned(dst, src.nbytes, self.live), "copy outside a device allocation"
        assert self._owned(src.ctypes.data, src.nbytes, self.host_live), "async copy from pageable memory"
        ctypes.memmove(dst, src.ctypes.data, src.nbytes)

    def dtoh_async(self, dst, src, stream):
        assert self._owned(src, dst.nbytes, self.live)
        assert self._owned(dst.ctypes.data, dst.nbytes, self.host_live), "async copy into pageable memory"
        ctypes.memmove(dst.ctypes.data, src, dst.nbytes)

    def htod(self, dst, src):
        assert self._owned(dst, src.nbytes, self.live)
        ctypes.memmove(dst, np.ascontiguousarray(src).ctypes.data, src.nbytes)


def install_fakes(monkeypatch, trt=None, allocator=None):
    """Make ``import tensorrt`` and ``open_allocator()`` return the stand-ins."""
    import runtime.backends.cuda_memory as memory

    trt = trt or make_fake_trt()
    allocator = allocator or FakeAllocator()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(memory, "_ALLOCATOR", allocator)
    return trt, allocator
