"""bench/load.py --quick drives a real server process and reports every figure; no timing thresholds."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("torch")  # the random model is exported with PyTorch
pytest.importorskip("onnx")
pytest.importorskip("uvicorn")

from bench import load


def test_quick_load_run_reports_every_cell(tmp_path):
    out = tmp_path / "load.json"
    rc = load.main(
        [
            "--quick",
            "--duration",
            "0.6",
            "--warmup",
            "0.2",
            "--images",
            "30",
            "--concurrency",
            "1,3",
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "load.png"),
            "--cache",
            str(tmp_path / "cache"),
        ]
    )
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["schema"] == load.SCHEMA and r["quick"] is True and r["gallery_images"] == 30
    assert r["load_average_at_start"] is None or len(r["load_average_at_start"]) == 3
    assert set(r["configs"]) == {"1", "8"}
    for mb, cfg in r["configs"].items():
        assert cfg["shutdown"]["exit_code"] == 0  # SIGTERM: a clean exit
        assert [c["concurrency"] for c in cfg["cells"]] == [1, 3]
        for c in cfg["cells"]:
            assert c["requests"] > 0 and c["errors"] == 0
            assert c["p50_ms"] <= c["p95_ms"] <= c["p99_ms"] and math.isclose(
                c["requests_per_s"], c["requests"] / c["seconds"]
            )
            b = c["batch_sizes"]
            # the server executed about as many queries during the cell as completed in it: each client has at
            # most one request straddling each edge of the window (and without batching a batch is one query)
            assert abs(b["queries"] - c["requests"]) <= 2 * c["concurrency"]
            assert sum(b["by_size_le"].values()) == b["batches"]
            if mb == "1":
                assert b["by_size_le"] == {"1": b["batches"]}
            assert c["rss"]["samples"] >= 1
    assert r["plot"]["status"] == "written" and (tmp_path / "load.png").stat().st_size > 0
    assert r["targets"] and all("met" in t for t in r["targets"])


def test_metrics_parsing():
    before = (
        'scan_batch_size_bucket{kind="text",le="1.0"} 2.0\nscan_batch_size_bucket{kind="text",le="2.0"} 3.0\n'
        'scan_batch_size_bucket{kind="text",le="+Inf"} 3.0\nscan_batch_size_count{kind="text"} 3.0\n'
        'scan_batch_size_sum{kind="text"} 4.0\nscan_batch_size_count{kind="images"} 9.0\n'
    )
    after = (
        before.replace('le="1.0"} 2.0', 'le="1.0"} 5.0')
        .replace('le="2.0"} 3.0', 'le="2.0"} 8.0')
        .replace('le="+Inf"} 3.0', 'le="+Inf"} 9.0')
        .replace('count{kind="text"} 3.0', 'count{kind="text"} 9.0')
        .replace('sum{kind="text"} 4.0', 'sum{kind="text"} 17.0')
    )
    d = load.batch_distribution(load.batch_histogram(before), load.batch_histogram(after))
    assert d == {"batches": 6, "queries": 13, "mean": 13 / 6, "by_size_le": {"1": 3, "2": 2, "+Inf": 1}}
