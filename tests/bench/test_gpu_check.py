"""bench/gpu_check.py on a machine without a GPU: every part reports why it was skipped."""

from __future__ import annotations

import json

import pytest

from bench.gpu_check import main


def test_skips_cleanly_without_gpu(tmp_path, exported, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: this test covers the CPU-only machine")
    manifest = next(iter(exported.values()))
    assert main(["--engine", str(manifest), "--json", str(tmp_path / "g.json")]) == 0
    report = json.loads((tmp_path / "g.json").read_text())
    assert report["torch_cuda_baseline"]["skipped"] == "no CUDA device visible to PyTorch"
    assert "skipped" in report["tensorrt"] or "failed" in report["tensorrt"]


@pytest.mark.gpu
def test_torch_cuda_baseline_runs_on_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from bench.gpu_check import torch_cuda_baseline

    out = torch_cuda_baseline(n=64, q=4, repeats=2)
    assert out["t2i_float16"]["pairs_per_s"] > 0 and out["i2t_float32"]["pairs_per_s"] > 0
