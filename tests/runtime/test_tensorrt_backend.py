"""runtime/backends/tensorrt.py.

Without TensorRT: the module imports, ``from_manifest`` fails with a helpful BackendError, and the
backend's own logic (per-thread contexts, profile checks, checked booleans, pinned staging, device
pointers with offsets for a resident gallery, the manifest checks) runs against a stand-in: a fake
``tensorrt`` module whose "engine" is the ONNX graph run by ONNX Runtime, and an allocator whose
"device memory" is host memory. The stand-in checks this code, not TensorRT; the ``tensorrt``-marked
tests at the end build and run real engines where TensorRT and a GPU exist.
"""
from __future__ import annotations

import ctypes
import json
import pickle
import subprocess
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest

from runtime.backends import BackendError
from runtime.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[2]


# ================================================================================ fake TensorRT


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
    "MatMul": ("MATRIX_MULTIPLY", None), "ReduceSum": ("REDUCE", None), "ReduceMax": ("REDUCE", None),
    "ReduceL2": ("REDUCE", None), "Softmax": ("SOFTMAX", None), "Exp": ("UNARY", "EXP"), "Log": ("UNARY", "LOG"),
    "Sqrt": ("UNARY", "SQRT"), "Not": ("UNARY", "NOT"), "Div": ("ELEMENTWISE", "DIV"), "Pow": ("ELEMENTWISE", "POW"),
    "Mul": ("ELEMENTWISE", "PROD"), "Add": ("ELEMENTWISE", "SUM"), "Sub": ("ELEMENTWISE", "SUB"),
    "Less": ("ELEMENTWISE", "LESS"), "Shape": ("SHAPE", None), "Cast": ("CAST", None), "Gather": ("GATHER", None),
    "LeakyRelu": ("ACTIVATION", None), "Clip": ("ACTIVATION", None), "Where": ("SELECT", None),
    "TopK": ("TOPK", None), "GRU": ("RECURRENCE", None),
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
        self.io = [(i.name, trt.TensorIOMode.INPUT, np.dtype(types_[i.type]), i.shape)
                   for i in self.session.get_inputs()]
        self.io += [(o.name, trt.TensorIOMode.OUTPUT, np.dtype(types_[o.type]), o.shape)
                    for o in self.session.get_outputs()]
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
            feeds = {n: _read(self.addresses[n], self.shapes[n], dt) for n, mode, dt, _ in self.engine.io
                     if mode.name == "INPUT"}
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
    """"Device" memory is host memory, so pointers and offsets are real and checkable."""

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
        for base, buf in pool.items():
            if base <= ptr and ptr + nbytes <= base + buf.nbytes:
                return True
        return False

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
    import runtime.backends.tensorrt as backend_mod

    trt = trt or make_fake_trt()
    allocator = allocator or FakeAllocator()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(backend_mod, "_ALLOCATOR", allocator)
    return trt, allocator


@pytest.fixture(scope="module")
def t2i_export(tmp_path_factory) -> Path:
    from tests.runtime.test_trt_plan import export_golden

    return export_golden("t2i_lse_f30k", tmp_path_factory.mktemp("t2i_backend"))


@pytest.fixture
def export_copy(t2i_export: Path, tmp_path: Path) -> Path:
    for f in t2i_export.parent.iterdir():
        if f.is_file() and not f.name.startswith("."):
            (tmp_path / f.name).write_bytes(f.read_bytes())
    return tmp_path / "scan.json"


def build_with_fakes(monkeypatch, manifest_path: Path, *extra: str, trt=None, allocator=None):
    trt, allocator = install_fakes(monkeypatch, trt, allocator)
    from export.build_engine import main

    rc = main([str(manifest_path), "--max-batch", "16", "--block", "64", "--max-words", "40", *extra])
    return rc, trt, allocator


def head_feeds(rng, n, q, embed=32, regions=36, max_len=12):
    images = rng.standard_normal((n, regions, embed)).astype(np.float32)
    images /= np.linalg.norm(images, axis=-1, keepdims=True)
    lengths = rng.integers(1, max_len + 1, q).astype(np.int64)
    words = rng.standard_normal((q, int(lengths.max()), embed)).astype(np.float32)
    words *= (np.arange(words.shape[1])[None, :] < lengths[:, None])[..., None]
    return {"images": images, "image_gram": images @ images.transpose(0, 2, 1), "captions": words, "lengths": lengths}


def ort_run(path: Path, feeds):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


# ================================================================================ without TensorRT


def test_module_imports_without_tensorrt() -> None:
    code = ("import sys, runtime.backends.tensorrt as m, runtime.trt_plan;"
            "assert 'tensorrt' not in sys.modules and 'cuda' not in sys.modules and 'pycuda' not in sys.modules;"
            "print(m.TensorRTBackend.name)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "tensorrt"


def test_from_manifest_without_tensorrt_is_helpful(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes ``import tensorrt`` raise ImportError
    manifest = tmp_path / "scan.json"
    manifest.write_text(json.dumps({"format": "scan-runtime/1", "name": "scan", "config": {}, "graphs": {},
                                    "vocab": {"file": "v.json"}, "image_encoder_id": "i", "text_encoder_id": "t",
                                    "engines": {}}))
    from runtime.backends.tensorrt import TensorRTBackend

    with pytest.raises(BackendError) as e:
        TensorRTBackend.from_manifest(load_manifest(manifest), "head")
    msg = str(e.value)
    assert "TensorRT is not installed" in msg and "pip install tensorrt" in msg and "onnxruntime" in msg
    from runtime.backends import open_backend

    with pytest.raises(BackendError, match="pip install tensorrt"):
        open_backend(load_manifest(manifest), "head", backend="tensorrt")


def test_allocator_without_cuda_bindings_is_helpful(monkeypatch) -> None:
    import runtime.backends.tensorrt as m

    monkeypatch.setattr(m, "_ALLOCATOR", None)
    for mod in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart", "pycuda", "pycuda.driver"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(BackendError, match="pip install cuda-python"):
        m.open_allocator()


def test_device_array_nbytes() -> None:
    from runtime.backends.tensorrt import DeviceArray

    assert DeviceArray(0, (3, 36, 32), np.dtype(np.float16)).nbytes == 3 * 36 * 32 * 2


# ================================================================================ with the stand-ins


def test_build_then_serve_with_stand_ins(monkeypatch, export_copy: Path) -> None:
    rc, trt, alloc = build_with_fakes(monkeypatch, export_copy)
    assert rc == 0
    m = load_manifest(export_copy)
    assert sorted(m.data["engines"]) == ["head", "image", "text", "topk"]
    from runtime.backends.tensorrt import TensorRTBackend

    rng = np.random.default_rng(0)
    feeds = head_feeds(rng, 10, 5)
    with TensorRTBackend.from_manifest(m, "head") as head:
        assert head.name == "tensorrt" and head.precision == "fp16"
        assert [t.name for t in head.inputs] == ["images", "image_gram", "captions", "lengths"]
        assert head.inputs[0].shape == ("N", "R", 32) and head.outputs[0].shape == ("N", "Q")
        assert head.profile["images"]["max"] == [64, 36, 32]
        got = head.run(feeds)["sims"]
        np.testing.assert_allclose(got, ort_run(export_copy.parent / "scan.onnx", feeds)["sims"], rtol=1e-6, atol=1e-6)
        # a second call with other shapes reuses or grows the buffers
        feeds2 = head_feeds(rng, 3, 16, max_len=40)
        np.testing.assert_allclose(head.run(feeds2)["sims"], ort_run(export_copy.parent / "scan.onnx", feeds2)["sims"],
                                   rtol=1e-6, atol=1e-6)
    assert not alloc.live and not alloc.host_live and alloc.streams == 0, "close() must free everything"


def test_outside_profile_is_a_clear_error(monkeypatch, export_copy: Path) -> None:
    build_with_fakes(monkeypatch, export_copy, "--kinds", "head")
    from runtime.backends.tensorrt import TensorRTBackend

    with TensorRTBackend.from_manifest(load_manifest(export_copy), "head") as head:
        feeds = head_feeds(np.random.default_rng(1), 65, 2)  # block is 64
        with pytest.raises(BackendError, match=r"'images' has shape \(65, 36, 32\).*max \(64, 36, 32\).*--block"):
            head.run(feeds)
        with pytest.raises(BackendError, match="expected inputs"):
            head.run({"images": feeds["images"]})


@pytest.mark.parametrize("call", ["set_input_shape", "set_tensor_address", "execute_async_v3"])
def test_false_from_tensorrt_raises_naming_the_call(monkeypatch, export_copy: Path, call: str) -> None:
    _, trt, _ = build_with_fakes(monkeypatch, export_copy, "--kinds", "head")
    from runtime.backends.tensorrt import TensorRTBackend

    with TensorRTBackend.from_manifest(load_manifest(export_copy), "head") as head:
        trt.fail_calls[call] = True
        with pytest.raises(BackendError, match=call):
            head.run(head_feeds(np.random.default_rng(2), 4, 2))


def test_undeserializable_plan(monkeypatch, export_copy: Path) -> None:
    build_with_fakes(monkeypatch, export_copy, "--kinds", "text")
    from runtime.backends.tensorrt import TensorRTBackend

    with pytest.raises(BackendError, match="deserialize_cuda_engine returned None"):
        TensorRTBackend(export_copy.parent / "scan.vocab.json")


def test_mismatched_gpu_refused_at_open(monkeypatch, export_copy: Path) -> None:
    build_with_fakes(monkeypatch, export_copy, "--kinds", "image")
    install_fakes(monkeypatch, allocator=FakeAllocator(gpu=("NVIDIA L4", "8.9")))
    from runtime.backends.tensorrt import TensorRTBackend
    from runtime.trt_plan import EngineMismatchError

    with pytest.raises(EngineMismatchError, match="compute capability 9.0.*NVIDIA L4.*8.9.*build_engine.py"):
        TensorRTBackend.from_manifest(load_manifest(export_copy), "image")


def test_threads_get_their_own_contexts(monkeypatch, export_copy: Path) -> None:
    _, trt, alloc = build_with_fakes(monkeypatch, export_copy, "--kinds", "text")
    from runtime.backends.tensorrt import TensorRTBackend

    m = load_manifest(export_copy)
    text_onnx = export_copy.parent / "scan.text.onnx"
    backend = TensorRTBackend.from_manifest(m, "text")
    errors, results = [], {}

    def work(i):
        try:
            rng = np.random.default_rng(i)
            for _ in range(3):
                lengths = rng.integers(1, 10, 4).astype(np.int64)
                ids = rng.integers(4, m.config.vocab_size, (4, int(lengths.max()))).astype(np.int64)
                ids *= np.arange(ids.shape[1])[None, :] < lengths[:, None]
                got = backend.run({"ids": ids, "lengths": lengths})["captions"]
                np.testing.assert_allclose(got, ort_run(text_onnx, {"ids": ids, "lengths": lengths})["captions"],
                                           rtol=1e-6, atol=1e-6)
            results[i] = True
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    engine = backend._engine
    assert len(engine.contexts) == 4 and len({c.thread for c in engine.contexts}) == 4
    backend.close()
    backend.close()  # idempotent
    assert not alloc.live and alloc.streams == 0
    with pytest.raises(BackendError, match="closed"):
        backend.run({"ids": np.ones((1, 1), np.int64), "lengths": np.ones(1, np.int64)})


def test_resident_gallery_blocks_by_pointer_offset(monkeypatch, export_copy: Path) -> None:
    _, trt, alloc = build_with_fakes(monkeypatch, export_copy, "--kinds", "head,topk", "--topk-max", "5")
    from runtime.backends.tensorrt import DeviceArray, ResidentGallery, TensorRTBackend

    m = load_manifest(export_copy)
    rng = np.random.default_rng(4)
    gallery = head_feeds(rng, 150, 1)
    query = head_feeds(rng, 1, 6)
    head_onnx = export_copy.parent / "scan.onnx"
    full = ort_run(head_onnx, {"images": gallery["images"], "image_gram": gallery["image_gram"],
                               "captions": query["captions"], "lengths": query["lengths"]})["sims"]
    with TensorRTBackend.from_manifest(m, "head") as head, TensorRTBackend.from_manifest(m, "topk") as topk:
        with ResidentGallery(head, {"images": gallery["images"], "image_gram": gallery["image_gram"]},
                             chunk_bytes=50_000) as resident:
            assert len(resident) == 150
            base = resident.block_feeds(0, 150)["images"].ptr
            for start, stop in ((0, 64), (64, 128), (128, 150), (37, 38)):
                block = resident.block_feeds(start, stop)
                assert isinstance(block["images"], DeviceArray)
                assert block["images"].ptr == base + start * 36 * 32 * 4  # an offset, not a copy
                assert block["images"].shape == (stop - start, 36, 32)
                feeds = {**block, "captions": query["captions"], "lengths": query["lengths"]}
                sims = head.run_device(feeds)["sims"]
                np.testing.assert_allclose(sims, full[start:stop], rtol=1e-6, atol=1e-6)
                # the same resident block through the top-k engine: only (k, Q) comes back
                out = topk.run_device(feeds)
                k = min(5, stop - start)
                assert out["topk_scores"].shape == (k, 6)
                expected = np.argsort(-full[start:stop], axis=0, kind="stable")[:k]
                np.testing.assert_array_equal(out["topk_index"], expected)
            with pytest.raises(BackendError, match="block_feeds"):
                resident.block_feeds(100, 151)
            wrong = DeviceArray(base, (2, 36, 32), np.dtype(np.float16))
            with pytest.raises(BackendError, match="device input 'images' is float16"):
                head.run_device({**resident.block_feeds(0, 2), "images": wrong, "captions": query["captions"],
                                 "lengths": query["lengths"]})
    assert not alloc.live and not alloc.host_live


def test_scan_engine_opens_tensorrt_backends(monkeypatch, export_copy: Path) -> None:
    """``open_backend(..., 'tensorrt')`` as ScanEngine uses it, for all three graphs."""
    build_with_fakes(monkeypatch, export_copy, "--kinds", "head,text,image")
    from runtime.engine import ScanEngine

    with ScanEngine(load_manifest(export_copy), backend="tensorrt") as eng:
        assert eng.head.name == eng.text.name == eng.image.name == "tensorrt"
        words, lengths = eng.encode_captions(["a dog", "two dogs on a beach"])
        regions = np.random.default_rng(5).standard_normal((3, 36, eng.config.img_dim)).astype(np.float32)
        images, gram = eng.encode_images(regions)
        sims = eng.sims(images, gram, words, lengths)
    with ScanEngine(load_manifest(export_copy), backend="onnxruntime") as ref:
        words_r, _ = ref.encode_captions(["a dog", "two dogs on a beach"])
        images_r, gram_r = ref.encode_images(regions)
        np.testing.assert_allclose(sims, ref.sims(images_r, gram_r, words_r, lengths), rtol=1e-5, atol=1e-6)


# ================================================================================ real TensorRT


def _gpu_or_skip():
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install tensorrt on a GPU machine)")
    from runtime.backends.tensorrt import open_allocator

    try:
        open_allocator()
    except BackendError as e:
        pytest.skip(f"no usable CUDA GPU: {e}")
    return trt


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision, atol", [("fp32", 1e-5), ("fp16", 1e-2)])
def test_golden_engine_matches_onnxruntime(tmp_path_factory, precision: str, atol: float) -> None:
    trt = _gpu_or_skip()
    from tests.runtime.test_trt_plan import export_golden
    from export.build_engine import main
    from runtime.backends.tensorrt import ResidentGallery, TensorRTBackend
    from runtime.trt_plan import precision_strategy

    path = export_golden("t2i_lse_f30k", tmp_path_factory.mktemp(f"trt_{precision}"))
    if precision == "fp16" and precision_strategy(trt.__version__) == "strongly-typed" \
            and "head.fp16" not in load_manifest(path).data["graphs"]:
        pytest.skip("TensorRT 11 builds FP16 only from exported fp16 graphs, which this export lacks")
    args = [str(path), "--max-batch", "16", "--block", "64", "--max-words", "40", "--topk-max", "5",
            "--timing-cache", str(path.parent / "timing.cache"), "--workspace-gb", "1"]
    assert main(args + (["--fp32"] if precision == "fp32" else [])) == 0
    m = load_manifest(path)
    rng = np.random.default_rng(0)
    feeds = head_feeds(rng, 50, 7, max_len=20)
    with TensorRTBackend.from_manifest(m, "head") as head:
        got = head.run(feeds)["sims"]
        expected = ort_run(path.parent / "scan.onnx", feeds)["sims"]
        np.testing.assert_allclose(got, expected, atol=atol, rtol=0)
        with ResidentGallery(head, {"images": feeds["images"], "image_gram": feeds["image_gram"]}) as g:
            part = head.run_device({**g.block_feeds(10, 40), "captions": feeds["captions"],
                                    "lengths": feeds["lengths"]})["sims"]
            np.testing.assert_allclose(part, expected[10:40], atol=atol, rtol=0)
    with TensorRTBackend.from_manifest(m, "text") as text:
        lengths = np.array([1, 9, 20, 4], np.int64)
        ids = rng.integers(4, m.config.vocab_size, (4, 20)).astype(np.int64)
        ids *= np.arange(20)[None, :] < lengths[:, None]
        feeds_text = {"ids": ids, "lengths": lengths}
        np.testing.assert_allclose(text.run(feeds_text)["captions"],
                                   ort_run(path.parent / "scan.text.onnx", feeds_text)["captions"], atol=atol, rtol=0)
    with TensorRTBackend.from_manifest(m, "topk") as topk:
        out = topk.run(feeds)
        assert out["topk_scores"].shape == (5, 7)
        np.testing.assert_allclose(out["topk_scores"], -np.sort(-expected, axis=0)[:5], atol=atol, rtol=0)
