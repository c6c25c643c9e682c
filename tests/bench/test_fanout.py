"""bench/fanout.py on a tiny model and gallery, on the session's local Ray instance: the local searcher and
every shard count asked for answer every request alike, both directions; no timing thresholds."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ray", reason="needs the 'cluster' extra (pip install -e '.[cluster]')")
pytest.importorskip("torch")  # tests.runtime.conftest (the Ray fixture) exports its models with PyTorch

from bench import fanout
from tests.runtime.conftest import ray_cluster  # noqa: F401  (the session's one local Ray instance)

pytestmark = pytest.mark.ray


def test_tiny_fanout_reports_every_contender(ray_cluster, tiny_demo, tmp_path):  # noqa: F811
    out = tmp_path / "r.json"
    args = ["--engine", str(tiny_demo / "engines" / "scan.json"), "--work", str(tmp_path / "work")]
    args += ["--images", "30", "--captions", "40", "--regions", "5", "--shards", "1", "2"]
    assert fanout.main([*args, "--requests", "3", "--warmup", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["settings"]["contenders"] == {
        "local": {"threads": 1},
        "S=1": {"shards": 1, "threads_per_shard": 1},
        "S=2": {"shards": 2, "threads_per_shard": 1},
    }
    assert len(r["load_average_before"]) == 3 and len(r["load_average_after"]) == 3
    for direction in ("text", "images"):
        d = r[direction]
        assert d["mismatches"] == 0  # every shard count answers as the local searcher
        assert set(d["latency_ms"]) == set(d["samples_ms"]) == {"local", "S=1", "S=2"}
        assert all(len(v) == 3 and min(v) > 0 for v in d["samples_ms"].values())  # --requests each
        assert set(d["info_round_trip_ms"]) == set(d["vs_local"]) == {"S=1", "S=2"}
        assert all(v["p50_ratio"] > 0 for v in d["vs_local"].values())
    assert (tmp_path / "work" / "shards-2" / "shards.json").is_file()
