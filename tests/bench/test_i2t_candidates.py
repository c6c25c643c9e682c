"""bench/i2t_candidates.py on a tiny model and 300 captions: every approach at every M asked for; where M
holds every caption each approach reranks them all, so it agrees with exact search; no timing thresholds."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip(
    "faiss", reason="the caption gallery's candidate index needs faiss (pip install 'scan-runtime[scale]')"
)

from bench import i2t_candidates


def test_tiny_run_reports_every_approach(tiny_demo, tmp_path):
    queries = tmp_path / "queries.npy"  # the tiny model's img_dim, the demo's 36 regions
    np.save(queries, np.random.default_rng(0).standard_normal((4, 36, 12)).astype(np.float32))
    out = tmp_path / "r.json"
    args = ["--engine", str(tiny_demo / "engines" / "scan.json"), "--cache", str(tmp_path / "cache")]
    args += ["--captions", "300", "--queries", "3", "--candidates", "20,300", "--timed", "2"]
    assert i2t_candidates.main([*args, "--query-images", str(queries), "--json", str(out), "--no-progress"]) == 0
    r = json.loads(out.read_text())
    assert (r["captions"], r["queries"], r["timed_m"]) == (300, 3, 300)
    assert r["words"] > r["captions"] and r["index"]["kind"] == "flat"
    assert r["kmeans_codebook"] is None  # a flat index is its own k-means source: no k-means rows
    assert len(r["machine"]["load_average_at_start"]) == 3 and len(r["load_average_at_end"]) == 3
    names = [x["approach"] for x in r["rows"]]
    assert names == ["index", "dense", "codebook", "codebook+refine2", "codebook+refine4", "codebook+refine8"]
    for x in r["rows"]:
        assert set(x["overlap_at_10"]) == {"20", "300"} and x["ms_per_query"] > 0
        assert 0.0 <= x["overlap_at_10"]["20"] <= 1.0
        assert x["overlap_at_10"]["300"] == 1.0, x["approach"]  # every caption reranked exactly
    assert r["exact_batched_ms_per_query"] > 0 and r["exact_p50_ms"] > 0 and r["two_stage_p50_ms"] > 0
    assert r["two_stage_overlap"] == 1.0  # M = every caption


def test_no_captions_exit_2(tiny_demo, tmp_path, capsys):
    args = ["--engine", str(tiny_demo / "engines" / "scan.json"), "--cache", str(tmp_path), "--no-progress"]
    assert i2t_candidates.main([*args, "--captions", "0"]) == 2
    assert "--captions" in capsys.readouterr().err
