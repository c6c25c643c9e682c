"""bench/latency.py --quick runs end to end and reports every figure; no timing thresholds (CI machines vary)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from bench import latency
from bench.head import CONTENDERS
from bench.latency import SCHEMA, Deadline, estimate_seconds, skip_reason
from bench.random_models import prepare_model
from bench.synthetic import MODES, QUICK

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")  # the random models are exported with PyTorch
pytest.importorskip("onnx")

HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    rc = latency.main(["--quick", "--json", str(tmp / "x.json"), "--plots", str(tmp), "--cache", str(tmp / "cache")])
    return rc, tmp, json.loads((tmp / "x.json").read_text())


def test_quick_run_writes_every_figure(quick, capsys):
    rc, tmp, r = quick
    assert rc == 0
    assert r["schema"] == SCHEMA and r["quick"] is True
    for key in ("cpu_model", "cores", "numpy", "onnxruntime", "torch", "gpus", "load_average_at_start"):
        assert key in r["machine"]
    assert set(r["export"]) == {"t2i", "i2t"}
    assert all(Path(e["manifest"]).is_file() for e in r["export"].values())

    head = r["head"]
    ceiling = head["gemm_ceiling"]
    assert ceiling["numpy"]["status"] == "measured" and _positive(ceiling["numpy"]["gflops"])
    assert ceiling["onnxruntime"]["status"] == "measured" and _positive(ceiling["onnxruntime"]["gflops"])
    assert _positive(ceiling["ceiling"]["gflops"])
    assert set(head["modes"]) == {"t2i", "i2t"}
    for mode, h in head["modes"].items():
        assert h["config"]["cross_attn"] == mode
        assert _positive(h["ceiling_pairs_per_s"]) and _positive(h["flop_per_pair"])
        assert set(h["contenders"]) == set(CONTENDERS)
        for name in ("slow_torch_cpu", "batched_torch_cpu", "ort_cpu"):
            c = h["contenders"][name]
            assert c["status"] == "measured", (mode, name, c)
            for key in (
                "pairs_per_s",
                "pairs_per_s_p10",
                "pairs_per_s_p90",
                "speedup_vs_slow",
                "fraction_of_ceiling",
                "gflops",
            ):
                assert _positive(c[key]), (mode, name, key, c[key])
            s = c["seconds"]
            assert s["n"] >= 3 and 0 < s["p10"] <= s["median"] <= s["p90"]
        # every contender answers the same question: the head agrees with the PyTorch reference
        assert h["contenders"]["ort_cpu"]["max_abs_diff_vs_batched"] <= 1e-4
        assert h["contenders"]["slow_torch_cpu"]["max_abs_diff_vs_batched"] <= 1e-4
        for c in h["contenders"].values():
            if c["status"] != "measured":
                assert c["status"] in ("skipped", "failed") and c["reason"]

    lat = r["latency"]
    sizes = r["plan"]
    for key, galleries in (("text_to_image", sizes["image_galleries"]), ("image_to_text", sizes["caption_galleries"])):
        cells = lat[key]
        assert {(c["gallery_size"], c["batch"]) for c in cells} == {(g, b) for g in galleries for b in sizes["batches"]}
        for c in cells:
            assert _positive(c["estimate_s"])
            if c["status"] == "measured":
                for k in ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "queries_per_s"):
                    assert _positive(c[k]), (key, c)
                assert c["p50_ms"] <= c["p95_ms"] <= c["p99_ms"] and c["n"] >= 3
            else:
                assert c["status"] == "skipped" and c["reason"]
                assert "p50_ms" not in c  # never an invented number
        assert any(c["status"] == "measured" for c in cells)

    build = r["gallery_build"]
    for dtype in ("float32", "float16"):
        assert _positive(build[dtype]["images_per_s"]) and _positive(build[dtype]["bytes_per_image"])
    assert build["float16"]["bytes_per_image"] < build["float32"]["bytes_per_image"]
    assert _positive(r["memory"]["peak_rss_bytes"]) and _positive(r["wall_seconds"])

    names = {t["name"] for t in r["targets"]}
    assert {
        "head_speedup_vs_slow_t2i",
        "head_speedup_vs_slow_i2t",
        "head_fraction_of_ceiling_t2i",
        "head_fraction_of_ceiling_i2t",
        "text_query_1k_p50_ms",
        "text_query_50k_p50_ms",
    } <= names
    for t in r["targets"]:
        assert t["met"] is None if t["measured"] is None else isinstance(t["met"], bool)
        if t["measured"] is None:
            assert t["note"]

    if HAS_MPL:
        assert r["plots"]["status"] == "written"
        for name in ("latency_vs_gallery.png", "throughput_vs_batch.png", "head_throughput.png"):
            assert (tmp / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert r["plots"]["status"] == "skipped" and "matplotlib" in r["plots"]["reason"]


def test_rerun_reuses_the_cached_export(quick, tmp_path):
    _, tmp, first = quick
    manifests = {m: e["manifest"] for m, e in first["export"].items()}
    for mode in MODES:
        path, info = prepare_model(QUICK, mode, 0, tmp / "cache")
        assert info["cached"] is True and str(path) == manifests[mode]


def test_cells_over_the_cap_or_budget_are_skipped_with_a_reason():
    sizes = QUICK
    far = Deadline(end=float("inf"))
    assert skip_reason(0.01, sizes, far) is None
    assert "per-cell cap" in skip_reason(sizes.cell_cap_s * 2, sizes, far)
    import time

    assert "run budget" in skip_reason(1.0, sizes, Deadline(end=time.monotonic() + 2.0))
    assert "memory" in skip_reason(0.01, sizes, far, extra_bytes=10 * 2**30, available_bytes=2**30)


def test_estimates_scale_from_the_nearest_measured_cell():
    done = [
        {"status": "measured", "gallery_size": 1000, "batch": 1, "p50_ms": 20.0},
        {"status": "measured", "gallery_size": 1000, "batch": 8, "p50_ms": 80.0},
        {"status": "skipped", "gallery_size": 1000, "batch": 32},
    ]
    assert estimate_seconds(done, 10000, 1, 1e9) == pytest.approx(0.2)
    assert estimate_seconds(done, 1000, 32, 1e9) == pytest.approx(0.32)
    assert estimate_seconds([], 100, 2, 1000.0) == pytest.approx(0.2)
