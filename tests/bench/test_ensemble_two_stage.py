"""bench/ensemble_two_stage.py on two tiny models: exact and every M and candidate source in both
directions; where M holds the whole gallery two-stage is exact; no timing thresholds."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("faiss", reason="the galleries' candidate indexes need faiss (pip install 'scan-runtime[scale]')")

from bench import ensemble_two_stage
from runtime.options import CANDIDATE_SOURCES


def test_tiny_ensemble_reports_every_m_and_source(tiny_demo, tiny_member, tmp_path):
    out = tmp_path / "r.json"
    args = ["--engine", str(tiny_demo / "engines" / "scan.json"), "--engine", str(tiny_member)]
    args += ["--images", "200", "--captions", "300", "--queries", "5", "--timed", "2", "--candidates", "20,300"]
    assert ensemble_two_stage.main([*args, "--cache", str(tmp_path), "--json", str(out), "--no-progress"]) == 0
    r = json.loads(out.read_text())
    assert (r["images"], r["captions"], r["queries"], len(r["engines"])) == (200, 300, 5, 2)
    assert len(r["machine"]["load_average_at_start"]) == 3 and len(r["load_average_at_end"]) == 3
    expected = [
        (d, n, mode, m, source)
        for d, n in (("text_to_image", 200), ("image_to_text", 300))
        for mode, m, source in [("exact", None, None)]
        + [("two_stage", m, s) for m in (20, 300) for s in CANDIDATE_SOURCES]
    ]
    rows = r["rows"]
    assert [(x["direction"], x["gallery"], x["mode"], x["candidates"], x["source"]) for x in rows] == expected
    for x in rows:
        n, m = x["gallery"], x["candidates"]
        assert x["p50_ms"] > 0 and 0.0 <= x["overlap_at_10"] <= 1.0
        if m is None or m >= n:  # the exact ensemble, or every item a candidate: exact
            assert x["overlap_at_10"] == 1.0 and x["scored_per_query"] == n
        elif x["source"] == "first":
            assert x["scored_per_query"] == m
        else:  # the union of both members' M candidates
            assert m <= x["scored_per_query"] <= 2 * m


def test_more_captions_than_the_first_chunk_exit_2(tiny_demo, tmp_path, capsys):
    args = ["--engine", str(tiny_demo / "engines" / "scan.json"), "--cache", str(tmp_path), "--no-progress"]
    assert ensemble_two_stage.main([*args, "--images", "10", "--captions", "50000"]) == 2
    assert "--captions" in capsys.readouterr().err
