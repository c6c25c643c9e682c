"""The fast float16 -> float32 cast of host feeds (runtime/backends/convert.py): bit-exact with numpy's."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.backends import convert
from runtime.backends.convert import cast, half_to_float


def test_every_float16_value_converts_bit_exactly(monkeypatch):
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)  # zeros, subnormals, inf, NaN
    finite = every[np.isfinite(every)]
    monkeypatch.setattr(convert, "CHUNK", 4096)  # many chunks, a last one shorter
    got = half_to_float(finite)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), finite.astype(np.float32).view(np.uint32))
    # inf and NaN (a corrupted cache) stay inf and NaN: their chunks go through numpy.
    got = half_to_float(every)
    want = every.astype(np.float32)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_array_equal(got[ok], want[ok])


def test_cast_shapes_and_passthrough():
    a = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float16)
    got = cast(a[:, 1:4], np.float32)  # a non-contiguous view
    assert got.shape == (3, 3, 7) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, a[:, 1:4].astype(np.float32))
    np.testing.assert_array_equal(cast(a, np.float16), a)
    assert cast(np.arange(3), np.int64).dtype == np.int64
    marker = object()
    assert cast(marker, np.float32) is marker  # a device array or OrtValue passes through
    with pytest.raises(TypeError, match="expected a float16 array, received float32"):
        half_to_float(np.zeros(2, np.float32))
