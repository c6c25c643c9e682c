"""bench/scale.py: the machinery on a tiny model (default suite), --quick on the demo model (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("faiss", reason="bench/scale.py needs faiss (pip install 'scan-runtime[scale]')")

from bench import scale
from bench.harness import overlap_at
from tests.runtime.conftest import export_small


def _check_report(report: dict, sizes: list[int], ms: list[int]) -> None:
    rows = report["rows"]
    assert {r["gallery"] for r in rows} == set(sizes)
    for n in sizes:
        exact = [r for r in rows if r["gallery"] == n and r["mode"] == "exact"]
        assert len(exact) == 1 and exact[0]["candidates"] is None
        two = [r for r in rows if r["gallery"] == n and r["mode"] == "two_stage"]
        assert sorted(r["candidates"] for r in two) == sorted(m for m in ms if m < n)
        for r in two + exact:
            for key in (
                "gallery",
                "mode",
                "candidates",
                "p50_ms",
                "overlap_at_10",
                "disk_bytes_per_image",
                "index",
                "index_build_s",
            ):
                assert key in r
        if exact[0]["p50_ms"] is not None:
            assert all(0.0 <= r["overlap_at_10"] <= 1.0 for r in two) and exact[0]["overlap_at_10"] == 1.0
            assert all(r["p50_ms"] > 0 for r in two)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """A tiny model standing in for the demo's (img_dim 12, 5 regions), in the demo's layout."""
    folder = tmp_path_factory.mktemp("tiny_demo")
    export_small(folder)
    return str(folder)


def test_scale_machinery_on_a_tiny_model(tiny_demo, tmp_path, capsys):
    args = [
        "--sizes",
        "150,400",
        "--candidates",
        "20,60,1000",
        "--queries",
        "4",
        "--demo",
        tiny_demo,
        "--cache",
        str(tmp_path / "cache"),
        "--json",
        str(tmp_path / "r.json"),
        "--plot",
        str(tmp_path / "p.png"),
        "--chunk",
        "200",
        "--no-progress",
    ]
    assert scale.main(args) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["schema"] == scale.SCHEMA and report["queries"] == 4
    _check_report(report, [150, 400], [20, 60, 1000])
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert "gallery" in capsys.readouterr().out
    # a rerun reuses the features and the galleries (index files unchanged)
    index = sorted((tmp_path / "cache").rglob("candidates.*.faiss"))
    stamp = [p.stat().st_mtime_ns for p in index]
    assert (
        scale.main(
            [*args[:-5], "--chunk", "200", "--no-progress", "--first-answer", "--json", str(tmp_path / "r2.json")]
        )
        == 0
    )
    assert [p.stat().st_mtime_ns for p in index] == stamp
    rows = json.loads((tmp_path / "r2.json").read_text())["rows"]
    for r in rows:
        assert r["build"]["gallery_build_s"] > 0 and r["build"]["generator"]["seed"] == 0
        if r["mode"] == "two_stage":  # the ratio the lead checks: two-stage never slower than exact
            assert r["exact_over_two_stage"] > 0
        else:
            warm = r["first_answer"]["warm"]
            assert warm["images"] == r["gallery"] and warm["total_s"] > 0 and len(warm["top10"]) == 10
    # the exact top-10 of the overlap was recorded by the first run, not searched again
    assert len(list((tmp_path / "cache").rglob("exact_top10.*.json"))) == 2


def test_exact_is_skipped_over_the_cap_with_a_reason(tiny_demo, tmp_path):
    args = [
        "--sizes",
        "100,300",
        "--candidates",
        "20",
        "--queries",
        "3",
        "--demo",
        tiny_demo,
        "--cache",
        str(tmp_path / "cache"),
        "--json",
        str(tmp_path / "r.json"),
        "--chunk",
        "100",
        "--exact-cap-s",
        "1e-9",
        "--no-progress",
    ]
    assert scale.main([*args, "--overlap-cap-s", "1e-9"]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    big = [r for r in rows if r["gallery"] == 300]
    assert big[0]["mode"] == "exact" and big[0]["p50_ms"] is None and "over the cap" in big[0]["skipped"]
    assert big[1]["overlap_at_10"] is None and "only where exact ran" in big[1]["overlap_note"]
    # exact latency skipped, but the overlap's exact top-10 computed offline
    assert scale.main(args) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    big = [r for r in rows if r["gallery"] == 300]
    assert big[0]["p50_ms"] is None and "offline" in big[0]["overlap_note"]
    assert 0.0 <= big[1]["overlap_at_10"] <= 1.0


def test_bad_sizes_exit_2(capsys):
    assert scale.main(["--sizes", "10,x"]) == 2
    assert "--sizes" in capsys.readouterr().err


def test_overlap_at():
    a = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    b = np.array([[4, 3, 9, 9], [5, 6, 7, 8]])
    assert overlap_at(a, b, k=4) == pytest.approx((0.5 + 1.0) / 2)


@pytest.mark.slow
def test_quick_on_the_demo_model(tmp_path):
    """``--quick`` end to end on the trained demo model (trains it into demo/ first if missing); seeded
    data and queries. Measured (20 queries): overlap@10 1.0 at M=250 for 2K and 20K images, 0.91 at
    M=100 for 20K; asserted with margin."""
    assert scale.main(["--quick", "--json", str(tmp_path / "r.json"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    _check_report(report, [2000, 20000], [100, 250, 500, 1000])
    at = {(r["gallery"], r["candidates"]): r["overlap_at_10"] for r in report["rows"] if r["mode"] == "two_stage"}
    assert at[2000, 250] >= 0.9 and at[20000, 250] >= 0.9
    assert at[20000, 100] >= 0.75
