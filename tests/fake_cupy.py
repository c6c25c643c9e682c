"""A numpy stand-in for the parts of CuPy that the array backend and bench/gpu_check.py call.

It lets the CPU tests run the CuPy code path end to end (pinned staging, ``ndarray.set``,
``cupy.fuse`` as a decorator factory, the memory pool, ``cupy.random``): bugs in that code then
show on every CI run instead of on a borrowed GPU. It checks the calls, not CuPy's numerics.
Install with ``install()`` (into ``sys.modules['cupy']``) in a subprocess.
"""

from __future__ import annotations

import sys
import types

import numpy as np


class ndarray(np.ndarray):
    def set(self, arr, stream=None):
        self[...] = arr

    def get(self, stream=None):
        return np.asarray(self).copy()


class _RandomState:
    def __init__(self, seed=None):
        self._gen = np.random.default_rng(seed)

    def standard_normal(self, size=None, dtype=np.float64):
        return self._gen.standard_normal(size, dtype=np.float32 if np.dtype(dtype) == np.float32 else np.float64)


def build() -> types.ModuleType:
    cp = types.ModuleType("cupy")
    for name in dir(np):
        if not name.startswith("__"):
            setattr(cp, name, getattr(np, name))
    cp.__version__ = "fake-cupy (numpy stand-in)"
    cp.ndarray = ndarray
    cp.empty = lambda shape, dtype=np.float64: np.empty(shape, dtype).view(ndarray)
    cp.asarray = lambda a, dtype=None: np.asarray(a, dtype).view(ndarray)
    cp.get_array_module = lambda *arrays: cp if any(isinstance(a, ndarray) for a in arrays) else np
    cp.asnumpy = lambda a, stream=None: np.asarray(a)
    cp.fuse = lambda *args, **kwargs: lambda fn: fn
    cp.get_default_memory_pool = lambda: types.SimpleNamespace(free_all_blocks=lambda: None)
    rs = _RandomState(0)
    cp.random = types.SimpleNamespace(RandomState=_RandomState, standard_normal=rs.standard_normal)
    runtime = types.SimpleNamespace(
        getDeviceCount=lambda: 1,
        runtimeGetVersion=lambda: 13000,
        getDeviceProperties=lambda i: {"name": b"fake GPU", "totalGlobalMem": 1 << 34},
    )
    cp.cuda = types.SimpleNamespace(
        runtime=runtime,
        alloc_pinned_memory=lambda n: bytearray(n),
        Device=lambda *a: types.SimpleNamespace(synchronize=lambda: None),
        memory=types.SimpleNamespace(OutOfMemoryError=MemoryError),
    )
    return cp


def install() -> None:
    sys.modules["cupy"] = build()
