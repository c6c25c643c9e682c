"""Blocked running top-k equals a brute-force stable argsort of the full matrix."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.topk import RunningTopK


def brute(sims: np.ndarray, k: int):
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # ties -> lower id
    scores = np.take_along_axis(sims, order, axis=1)
    pad = k - order.shape[1]
    if pad > 0:
        order = np.pad(order, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return scores.astype(np.float32), order.astype(np.int64)


@pytest.mark.parametrize("block", [1, 3, 7, 50, 1000])
@pytest.mark.parametrize("k", [1, 5, 49, 60])
@pytest.mark.parametrize("ties", [False, True])
def test_blocked_equals_brute_force(block, k, ties):
    rng = np.random.default_rng(block * 100 + k)
    sims = rng.standard_normal((6, 49)).astype(np.float32)
    if ties:
        sims = np.round(sims, 0)  # many exact ties, across block boundaries too
    top = RunningTopK(6, k)
    for start in range(0, 49, block):
        top.add_block(sims[:, start : start + block], np.arange(start, min(start + block, 49)))
    scores, ids = top.result()
    want_s, want_i = brute(sims, k)
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_array_equal(scores, want_s)
    assert scores.dtype == np.float32 and ids.dtype == np.int64


def test_fewer_items_than_k_pads_with_minus_one():
    top = RunningTopK(1, 4)
    top.add_block(np.array([[0.5, 0.9]], np.float32), np.array([10, 11]))
    scores, ids = top.result()
    assert ids.tolist() == [[11, 10, -1, -1]]
    assert scores[0, 2] == -np.inf
