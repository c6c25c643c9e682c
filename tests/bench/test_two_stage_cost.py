"""bench/two_stage_cost.py on a tiny model and galleries: every size and M asked for reported, the whole
process run at the sizes asked for; no timing thresholds."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("faiss", reason="the galleries' candidate index needs faiss (pip install 'scan-runtime[scale]')")

from bench import two_stage_cost


def test_tiny_run_reports_every_size_and_m(tiny_demo, tmp_path):
    out = tmp_path / "r.json"
    args = ["--demo", str(tiny_demo), "--cache", str(tmp_path / "cache"), "--json", str(out)]
    args += ["--sizes", "60,120", "--candidates", "20,50", "--queries", "3", "--rounds", "1"]
    assert two_stage_cost.main([*args, "--whole-gallery", "80", "--whole-queries", "6"]) == 0
    r = json.loads(out.read_text())
    assert r["schema"] == two_stage_cost.SCHEMA and r["target"] == two_stage_cost.TARGET
    assert len(r["load_average_at_start"]) == 3 and len(r["load_average_at_end"]) == 3
    rows = r["rows"]
    assert [(x["gallery"], x["mode"], x.get("candidates")) for x in rows] == [
        (n, mode, m) for n in (60, 120) for mode, m in (("exact", None), ("two_stage", 20), ("two_stage", 50))
    ]
    for x in rows:
        assert x["single_p50_ms"] > 0 and x["batched_s"] > 0 and len(x["load_average"]) == 3
        if x["mode"] == "two_stage":
            assert 0.0 <= x["overlap_at_10"] <= 1.0
            assert x["single_speedup"] > 0 and x["batched_speedup"] > 0
            assert sum(x["single_plans"].values()) == 3  # one plan per timed single-query search
            assert x["single_plan"] in x["single_plans"]
    w = r["whole_process"]
    assert (w["gallery"], w["queries"]) == (80, 6)
    assert all(len(w["seconds"][m]) == 1 and w["seconds"][m][0] > 0 for m in ("exact", "two_stage"))
    assert 0.0 <= w["overlap_at_10"] <= 1.0 and w["speedup"] > 0
    assert w["met"] is False  # the target is met only at its own sizes


def test_too_many_queries_for_the_smallest_gallery_exit_2(tiny_demo, tmp_path, capsys):
    args = ["--demo", str(tiny_demo), "--cache", str(tmp_path), "--sizes", "10", "--whole-queries", "51"]
    assert two_stage_cost.main(args) == 2
    assert "--whole-queries" in capsys.readouterr().err
