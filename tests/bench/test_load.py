"""bench/load.py --quick drives a real server process and reports every figure; no timing thresholds."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("torch")  # the random model is exported with PyTorch
pytest.importorskip("onnx")
pytest.importorskip("uvicorn")

from bench import load
from runtime.stages import STAGES


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
            "--variant",
            "greedy:--max-delay-ms 0",
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
    assert set(r["models"]) == {"quick"}
    m = r["models"]["quick"]
    assert m["in_process"]["queries"] >= 20 and m["in_process"]["p50_ms"] > 0
    assert list(m["configs"]) == ["ours", "plain", "greedy"]
    for name, cfg in m["configs"].items():
        assert cfg["shutdown"]["exit_code"] == 0  # SIGTERM: a clean exit
        assert [c["concurrency"] for c in cfg["cells"]] == [1, 3]
        for c in cfg["cells"]:
            assert c["requests"] > 0 and c["errors"] == 0
            assert c["p50_ms"] <= c["p95_ms"] <= c["p99_ms"] and math.isclose(
                c["requests_per_s"], c["requests"] / c["seconds"]
            )
            # every stage of a search request was timed, once per request the server answered in the cell
            # (each client has at most one request straddling each edge of the window)
            assert list(c["stages"]) == list(STAGES)
            for stage in c["stages"].values():
                assert abs(stage["requests"] - c["requests"]) <= 2 * c["concurrency"]
                assert stage["mean_ms"] >= 0 and stage["median_ms"] >= 0
            b = c["batch_sizes"]
            if name == "plain":  # no batcher
                assert b["batches"] == 0
                continue
            # the server executed about as many queries during the cell as completed in it
            assert abs(b["queries"] - c["requests"]) <= 2 * c["concurrency"]
            assert sum(b["by_size_le"].values()) == b["batches"]
            assert c["rss"]["samples"] >= 1
    assert r["plot"]["status"] == "written" and (tmp_path / "load.png").stat().st_size > 0
    t = {x["target"].split(" <=")[0].split(" >=")[0]: x for x in m["targets"]}
    assert t["HTTP p50, 1 client"]["met"] in (True, False)  # measured: 1 client and the in-process baseline
    assert t["throughput, 16 clients"]["met"] is None  # no 16-client cell in this run: not measured, not "met"


def test_stage_breakdown_reads_medians_from_buckets():
    def exposition(counts: dict[str, float], total: float) -> str:
        lines = [f'scan_stage_seconds_bucket{{kind="text",le="{le}",stage="score"}} {n}' for le, n in counts.items()]
        lines += [
            f'scan_stage_seconds_count{{kind="text",stage="score"}} {counts["+Inf"]}',
            f'scan_stage_seconds_sum{{kind="text",stage="score"}} {total}',
            'scan_stage_seconds_count{kind="images",stage="score"} 99.0',
        ]
        return "\n".join(lines)

    before = exposition({"0.01": 1.0, "0.02": 1.0, "+Inf": 1.0}, 0.005)
    # 4 more: 1 in (0, 10 ms], 3 in (10, 20 ms]; the median (the 2nd of 4) is 1/3 into the second bucket
    after = exposition({"0.01": 2.0, "0.02": 5.0, "+Inf": 5.0}, 0.065)
    d = load.stage_breakdown(load.stage_histograms(before), load.stage_histograms(after))
    assert list(d) == ["score"] and d["score"]["requests"] == 4
    assert math.isclose(d["score"]["mean_ms"], 15.0) and math.isclose(d["score"]["median_ms"], 10 + 10 / 3)


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
