"""bench/cpu_backends.py --quick runs end to end: every figure present, the backends agree; no timing thresholds."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")  # the random models are exported with PyTorch


def test_quick_run_reports_both_backends(tmp_path, capsys):
    from bench.cpu_backends import main

    out = tmp_path / "cpu.json"
    assert main(["--quick", "--json", str(out), "--text", str(tmp_path / "cpu.txt"), "--cache", str(tmp_path)]) == 0
    r = json.loads(out.read_text())
    assert r["faster"] in ("numpy", "onnxruntime")
    assert len(r["load_before"]) == 3 and len(r["load_after"]) == 3
    for mode in ("t2i", "i2t"):
        h = r["head"][mode]
        assert h["max_abs_diff_numpy_vs_onnxruntime"] <= 1e-5
        for name in ("gemm_numpy", "gemm_onnxruntime", "numpy", "onnxruntime"):
            assert math.isfinite(h[name]["pairs_per_s"]) and h[name]["pairs_per_s"] > 0
        assert h["numpy"]["fraction_of_ceiling"] > 0 and h["ceiling"] in ("gemm_numpy", "gemm_onnxruntime")
    e = r["evaluation"]
    assert e["max_abs_diff_numpy_vs_onnxruntime"] <= 1e-5 and e["captions"] == 5 * e["images"]
    text = (tmp_path / "cpu.txt").read_text()
    assert "numpy / onnxruntime" in text and "faster on this CPU" in capsys.readouterr().out
