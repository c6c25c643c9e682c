"""bench/formats.py --quick runs end to end: every contender measured, exact formats agree with float32; no
timing thresholds."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")  # the random models are exported with PyTorch


def test_quick_run_reports_every_format(tmp_path, capsys):
    from bench.formats import CONTENDERS, REFERENCE, main

    out = tmp_path / "formats.json"
    args = ["--quick", "--images", "200", "--rounds", "2", "--agreement-queries", "8"]
    assert main([*args, "--json", str(out), "--cache", str(tmp_path)]) == 0
    r = json.loads(out.read_text())
    assert len(r["load_before"]) == 3 and len(r["load_after"]) == 3
    assert set(r["contenders"]) == set(CONTENDERS)
    assert r["bytes"]["float16"] < r["bytes"]["float32"] and r["bytes"]["int8"] < r["bytes"]["float32"]
    assert r["contenders"][REFERENCE]["top10_agreement"] == 1.0
    for name, c in r["contenders"].items():
        assert c["p50_ms"] > 0 and c["seconds"]["n"] >= 2, name
        if c["format"] == "float32":  # the same values: the same results, to float32 rounding of the backends
            assert c["max_abs_score_diff"] <= 1e-5, name
        elif c["format"] == "float16" and c["exact"]:  # float16 values scored in float32: to half rounding
            assert c["max_abs_score_diff"] <= 5e-3, name
        # 200 random unit-vector images (near ties) and int8's per-component error: a measured ~0.95; an int8
        # search that lost its scales agrees by chance only (~10 of 200).
        assert c["top10_agreement"] >= (0.9 if c["exact"] else 0.8), name
    rerank = r["rerank"]
    assert rerank["float32"]["top10_agreement"] == 1.0 and rerank["float16"]["top10_agreement"] >= 0.9
    assert rerank["int8"]["top10_agreement"] >= 0.8 and rerank["int8"]["p50_ms"] > 0
    assert "int8/onnxruntime" in capsys.readouterr().out
