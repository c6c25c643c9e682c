"""Tests for bench.metrics against a transcription of the original SCAN loops."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from bench.metrics import (
    DirectionMetrics,
    MetricsError,
    RecallMetrics,
    dedupe_repeated_images,
    evaluate,
    evaluate_fold5,
    evaluate_folds,
    format_table,
    i2t_ranks,
    metrics_from_ranks,
    t2i_ranks,
    validate_sims,
)
from tests.conftest import GOLDEN

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN_SIMS = GOLDEN / "t2i_lse_f30k" / "expected_sims.npy"


# ---------------------------------------------------------------------------
# Oracle: direct transcription of kuanghuei/SCAN evaluation.py i2t / t2i
# (generalised from the hard-coded 5 to k captions per image).
# ---------------------------------------------------------------------------


def oracle_i2t(sims, k=5):
    npts = sims.shape[0]
    ranks = np.zeros(npts)
    top1 = np.zeros(npts)
    for index in range(npts):
        inds = np.argsort(sims[index])[::-1]
        # Score
        rank = 1e20
        for i in range(k * index, k * index + k, 1):
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
        top1[index] = inds[0]

    # Compute metrics
    r1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    r5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    r10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    medr = np.floor(np.median(ranks)) + 1
    meanr = ranks.mean() + 1
    return (r1, r5, r10, medr, meanr), ranks


def oracle_t2i(sims, k=5):
    npts = sims.shape[0]
    ranks = np.zeros(k * npts)
    top1 = np.zeros(k * npts)
    # --> (5N(caption), N(image))
    sims = sims.T
    for index in range(npts):
        for i in range(k):
            inds = np.argsort(sims[k * index + i])[::-1]
            ranks[k * index + i] = np.where(inds == index)[0][0]
            top1[k * index + i] = inds[0]

    # Compute metrics
    r1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    r5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    r10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    medr = np.floor(np.median(ranks)) + 1
    meanr = ranks.mean() + 1
    return (r1, r5, r10, medr, meanr), ranks


def oracle_fold5(sims):
    """Original evalrank fold5 loop (on sub-matrices), returns per-fold rows."""
    n = sims.shape[0] // 5
    results = []
    for i in range(5):
        sub = sims[i * n : (i + 1) * n, i * 5 * n : (i + 1) * 5 * n]
        r, _ = oracle_i2t(sub)
        ri, _ = oracle_t2i(sub)
        ar = (r[0] + r[1] + r[2]) / 3
        ari = (ri[0] + ri[1] + ri[2]) / 3
        rsum = r[0] + r[1] + r[2] + ri[0] + ri[1] + ri[2]
        results += [list(r) + list(ri) + [ar, ari, rsum]]
    return np.array(results)


def assert_matches_oracle(sims, k=5):
    r_o, ranks_o = oracle_i2t(sims, k)
    ri_o, ranks_ti = oracle_t2i(sims, k)
    ranks = i2t_ranks(sims, k)
    ranks_t = t2i_ranks(sims, k)
    assert ranks.shape == ranks_o.shape
    assert ranks_t.shape == ranks_ti.shape
    np.testing.assert_array_equal(ranks, ranks_o)
    np.testing.assert_array_equal(ranks_t, ranks_ti)
    m = evaluate(sims, k)
    # bit-for-bit equality of every metric
    assert m.i2t.as_tuple() == tuple(float(x) for x in r_o)
    assert m.t2i.as_tuple() == tuple(float(x) for x in ri_o)
    assert m.rsum == pytest.approx(sum(r_o[:3]) + sum(ri_o[:3]))
    return m


# ---------------------------------------------------------------------------
# Agreement with the original loops
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [1, 2, 7, 40])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_random_matches_oracle(seed, n, dtype):
    rng = np.random.default_rng(seed)
    sims = rng.standard_normal((n, 5 * n)).astype(dtype)
    # make the task easier so recalls are not all ~0
    for i in range(n):
        sims[i, 5 * i : 5 * i + 5] += dtype(1.5)
    assert_matches_oracle(sims)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("n", [3, 20, 60])
def test_ties_rounded_matches_oracle(seed, n):
    rng = np.random.default_rng(100 + seed)
    sims = np.round(rng.uniform(-1, 1, (n, 5 * n)), 1)
    for i in range(n):
        sims[i, 5 * i : 5 * i + 5] = np.round(sims[i, 5 * i : 5 * i + 5] + 0.3, 1)
    assert_matches_oracle(sims)
    assert_matches_oracle(sims.astype(np.float32))


def test_heavy_ties_and_constant_matrix():
    rng = np.random.default_rng(7)
    sims = rng.integers(0, 3, (30, 150)).astype(np.float64)
    assert_matches_oracle(sims)
    assert_matches_oracle(np.zeros((25, 125)))
    assert_matches_oracle(np.ones((17, 85), dtype=np.float32))
    # integer dtype goes through the same path
    assert_matches_oracle(rng.integers(0, 4, (12, 60)))


def test_signed_zero_ties():
    sims = np.zeros((4, 20))
    sims[:, ::2] = -0.0
    sims[0, 3] = 1.0
    assert_matches_oracle(sims)


def test_mixed_unique_and_tied_rows():
    rng = np.random.default_rng(11)
    sims = rng.standard_normal((50, 250))
    # a few rows / columns with ties involving target entries
    sims[3, 17] = sims[3, 15]
    sims[10, 0] = sims[10, 52]
    sims[20, 100] = sims[21, 100]
    sims[49, 249] = sims[0, 249]
    assert_matches_oracle(sims)


def test_non_contiguous_inputs_match_oracle():
    rng = np.random.default_rng(5)
    base = np.round(rng.standard_normal((40, 200)), 1)
    f_order = np.asfortranarray(base)
    assert_matches_oracle(f_order)
    big = np.round(rng.standard_normal((30, 300)), 1)
    view = big[:20:2, :100:2]  # (10, 50)
    assert view.shape == (10, 50)
    assert not view.flags["C_CONTIGUOUS"]
    assert_matches_oracle(view)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_other_captions_per_image(k):
    rng = np.random.default_rng(k)
    sims = np.round(rng.standard_normal((15, 15 * k)), 1)
    assert_matches_oracle(sims, k)


def test_accepts_lists():
    sims = [[0.9, 0.1, 0.2, 0.3, 0.4, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.6, 0.7, 0.8, 0.95]]
    m = evaluate(sims)
    assert m.i2t.r1 == 100.0


# ---------------------------------------------------------------------------
# Hand-made tiny case with known ranks
# ---------------------------------------------------------------------------


def test_tiny_known_ranks():
    # 2 images, 10 captions; distinct values so ranks are unambiguous.
    sims = np.array(
        [
            # image 0: own captions 0..4 ; best own caption (0.90) is at position 1
            [0.90, 0.10, 0.20, 0.30, 0.40, 0.95, 0.05, 0.06, 0.07, 0.08],
            # image 1: own captions 5..9 ; best own caption (0.99) is at position 0
            [0.50, 0.51, 0.52, 0.53, 0.54, 0.99, 0.01, 0.02, 0.03, 0.04],
        ]
    )
    np.testing.assert_array_equal(i2t_ranks(sims), [1, 0])
    # t2i: caption j -> own image j//5 among 2 images
    # c0: 0.90 vs 0.50 -> 0 ; c1: 0.10 vs 0.51 -> 1 ; c2 -> 1 ; c3 -> 1 ; c4 -> 1
    # c5: 0.99 vs 0.95 -> 0 ; c6: 0.01 vs 0.05 -> 1 ; c7..c9 -> 1
    np.testing.assert_array_equal(t2i_ranks(sims), [0, 1, 1, 1, 1, 0, 1, 1, 1, 1])
    m = evaluate(sims)
    assert m.i2t == DirectionMetrics(r1=50.0, r5=100.0, r10=100.0, medr=1.0, meanr=1.5)
    # t2i ranks: two 0s, eight 1s -> median 1 -> medr 2, mean 0.8 -> meanr 1.8
    assert m.t2i.r1 == 20.0
    assert m.t2i.r5 == 100.0
    assert m.t2i.r10 == 100.0
    assert m.t2i.medr == 2.0
    assert m.t2i.meanr == pytest.approx(1.8)
    assert m.rsum == pytest.approx(50 + 100 + 100 + 20 + 100 + 100)
    assert_matches_oracle(sims)


def test_perfect_retrieval():
    n = 12
    sims = np.zeros((n, 5 * n))
    for i in range(n):
        sims[i, 5 * i : 5 * i + 5] = 1.0 + np.arange(5) * 0.01
    m = evaluate(sims)
    for d in (m.i2t, m.t2i):
        assert (d.r1, d.r5, d.r10, d.medr, d.meanr) == (100.0, 100.0, 100.0, 1.0, 1.0)
    assert m.rsum == 600.0


def test_metrics_from_ranks_medr_floor():
    # median 2.5 -> floor 2 -> medr 3 ; mean 2.5 -> meanr 3.5
    d = metrics_from_ranks([0, 1, 4, 5])
    assert d == DirectionMetrics(25.0, 75.0, 100.0, 3.0, 3.5)
    with pytest.raises(MetricsError):
        metrics_from_ranks([])


# ---------------------------------------------------------------------------
# 5-fold
# ---------------------------------------------------------------------------


def test_fold5_mean_matches_original_and_rsum_is_sum_of_means():
    rng = np.random.default_rng(42)
    n = 50  # 5 folds of 10 images / 50 captions
    sims = np.round(rng.standard_normal((n, 5 * n)), 1)
    for i in range(n):
        sims[i, 5 * i : 5 * i + 5] += 1.0
    rows = oracle_fold5(sims)
    mean = rows.mean(axis=0).flatten()

    m = evaluate_fold5(sims)
    assert m.i2t.as_tuple() == tuple(float(x) for x in mean[0:5])
    assert m.t2i.as_tuple() == tuple(float(x) for x in mean[5:10])
    six = mean[0] + mean[1] + mean[2] + mean[5] + mean[6] + mean[7]
    assert m.rsum == pytest.approx(six)
    assert m.rsum == pytest.approx(mean[12])  # mean of the per-fold rsums
    # the original's printed value (mean(ar) * 6) differs: ours is not that
    assert not math.isclose(m.rsum, mean[10] * 6)
    assert m.to_dict()["rsum"] == m.rsum

    # per-fold results equal evaluate() on each sub-matrix (and the oracle)
    folds = evaluate_folds(sims)
    assert len(folds) == 5
    for i, f in enumerate(folds):
        sub = sims[i * 10 : (i + 1) * 10, i * 50 : (i + 1) * 50]
        assert f == evaluate(sub)
        assert f.i2t.as_tuple() == tuple(float(x) for x in rows[i, 0:5])
        assert f.t2i.as_tuple() == tuple(float(x) for x in rows[i, 5:10])


def test_fold5_differs_from_full():
    rng = np.random.default_rng(3)
    sims = rng.standard_normal((25, 125))
    assert evaluate_fold5(sims) != evaluate(sims)


def test_fold5_requires_divisible():
    sims = np.zeros((12, 60))
    with pytest.raises(MetricsError, match="divisible by 5"):
        evaluate_fold5(sims)


# ---------------------------------------------------------------------------
# Repeated-image layout helper
# ---------------------------------------------------------------------------


def test_dedupe_repeated_images():
    assert dedupe_repeated_images(5000, 5000) == 5
    assert dedupe_repeated_images(1000, 5000) == 1
    assert dedupe_repeated_images(60, 60) == 5
    assert dedupe_repeated_images(12, 60) == 1
    assert dedupe_repeated_images(1, 5) == 1
    assert dedupe_repeated_images(3, 3, captions_per_image=1) == 1


@pytest.mark.parametrize("rows,caps", [(1001, 5000), (7, 30), (12, 59), (0, 0), (4, 0)])
def test_dedupe_repeated_images_errors(rows, caps):
    with pytest.raises(MetricsError) as ei:
        dedupe_repeated_images(rows, caps)
    assert isinstance(ei.value, ValueError)
    msg = str(ei.value)
    assert str(rows) in msg and str(caps) in msg


def test_dedupe_repeated_not_divisible():
    with pytest.raises(MetricsError, match="7"):
        dedupe_repeated_images(7, 7)


# ---------------------------------------------------------------------------
# Validation errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [(10,), (2, 3, 15), (2, 9), (3, 3), (10, 2), (0, 0), (0, 5)],
)
def test_bad_shape_errors(shape):
    sims = np.zeros(shape)
    for fn in (evaluate, i2t_ranks, t2i_ranks, evaluate_fold5, validate_sims):
        with pytest.raises(MetricsError) as ei:
            fn(sims)
        assert isinstance(ei.value, ValueError)
        msg = str(ei.value)
        assert str(tuple(shape)) in msg
        assert "expected" in msg


def test_bad_shape_message_names_expected():
    with pytest.raises(MetricsError) as ei:
        evaluate(np.zeros((5, 20)))
    msg = str(ei.value)
    assert "(5, 20)" in msg and "(5, 25)" in msg and "(4, 20)" in msg


def test_repeated_layout_square_matrix_rejected():
    with pytest.raises(MetricsError, match="dedupe_repeated_images"):
        evaluate(np.zeros((10, 10)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_errors(bad):
    sims = np.zeros((2, 10))
    sims[1, 3] = bad
    with pytest.raises(MetricsError, match=r"non-finite.*|\(2, 10\)"):
        evaluate(sims)


def test_bad_dtype_errors():
    with pytest.raises(MetricsError, match="dtype"):
        evaluate(np.zeros((2, 10), dtype=bool))
    with pytest.raises(MetricsError, match="dtype"):
        evaluate(np.zeros((2, 10), dtype=complex))
    with pytest.raises(MetricsError):
        evaluate(np.zeros((2, 10)), captions_per_image=0)


# ---------------------------------------------------------------------------
# Golden sims from the reference model
# ---------------------------------------------------------------------------


def test_golden_sims_match_oracle():
    sims = np.load(GOLDEN_SIMS)
    assert sims.shape == (12, 60)
    m = assert_matches_oracle(sims)
    # also through the fold-free path with float32 (what a runtime may output)
    assert_matches_oracle(sims.astype(np.float32))
    d = m.to_dict()
    assert set(d) == {"i2t", "t2i", "rsum"}


# ---------------------------------------------------------------------------
# Containers, formatting, imports
# ---------------------------------------------------------------------------


def test_to_dict_and_frozen():
    rng = np.random.default_rng(9)
    m = evaluate(rng.standard_normal((8, 40)))
    d = m.to_dict()
    assert set(d["i2t"]) == {"r1", "r5", "r10", "medr", "meanr"}
    assert set(d["t2i"]) == {"r1", "r5", "r10", "medr", "meanr"}
    for v in list(d["i2t"].values()) + list(d["t2i"].values()) + [d["rsum"]]:
        assert type(v) is float
    assert d["rsum"] == pytest.approx(sum(d["i2t"][x] + d["t2i"][x] for x in ("r1", "r5", "r10")))
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.i2t.r1 = 0.0  # type: ignore[misc]
    assert isinstance(m, RecallMetrics)
    for v in m.i2t.as_tuple():
        assert type(v) is float


def test_format_table():
    m = RecallMetrics(
        i2t=DirectionMetrics(67.4, 90.3, 95.8, 1.0, 2.5),
        t2i=DirectionMetrics(48.6, 77.7, 85.2, 2.0, 8.1),
    )
    s = format_table(m, title="Flickr30K 1K test")
    lines = s.splitlines()
    assert lines[0] == "Flickr30K 1K test"
    for tok in ("R@1", "R@5", "R@10", "medr", "meanr"):
        assert tok in lines[1]
    i2t_line = next(l for l in lines if l.startswith("Image to text"))
    t2i_line = next(l for l in lines if l.startswith("Text to image"))
    assert i2t_line.split()[3:] == ["67.4", "90.3", "95.8", "1.0", "2.5"]
    assert t2i_line.split()[3:] == ["48.6", "77.7", "85.2", "2.0", "8.1"]
    assert "rsum: 465.0" in s
    assert format_table(m).splitlines()[0] == lines[1]


def test_does_not_import_torch():
    code = "import sys; import bench.metrics; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)
