"""bench/gpu_check.py on a machine without a GPU: every part reports why it was skipped."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.gpu_check import main


def test_skips_cleanly_without_gpu(tmp_path, exported, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: this test covers the CPU-only machine")
    manifest = next(iter(exported.values()))
    assert main(["--engine", str(manifest), "--json", str(tmp_path / "g.json"), "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "g.json").read_text())
    assert report == json.loads((tmp_path / "gpu_check.json").read_text())
    from runtime.backends.arrays import cupy_status

    assert report["cupy"]["skipped"] == cupy_status()  # no CuPy, or no device: the reason, not an error
    assert "cupy:" in (tmp_path / "gpu_check.txt").read_text()
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


CUPY_PATH_SCRIPT = """
import json, sys
from tests.fake_cupy import install
install()
from bench.gpu_check import main
sys.exit(main(["--quick", "--n", "8", "--galleries", "20,45", "--out-dir", sys.argv[1]]))
"""


def test_cupy_path_runs_end_to_end_on_a_numpy_stand_in(tmp_path):
    """Every CuPy code path of the check (parity, GEMM, head, resident galleries, latency cells) runs
    on tiny shapes with numpy standing in for CuPy, so the script is known to run before a GPU is lent."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    from tests.helpers import QUIET_BLAS

    proc = subprocess.run(
        [sys.executable, "-c", CUPY_PATH_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo), **QUIET_BLAS},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (tmp_path / "gpu_check.txt").read_text().startswith("GPU check")
    c = report["cupy"]
    for part in ("parity_full_size", "gemm", "head", "latency"):
        assert "failed" not in c[part], c[part]
    for mode in ("t2i", "i2t"):
        assert c["parity_full_size"][mode]["passed"], c["parity_full_size"][mode]
        assert c["head"][f"{mode}_fp16"]["pairs_per_s"] > 0
    assert "failed" not in c["parity_golden"], c["parity_golden"]
    if "skipped" not in c["parity_golden"]:  # the golden cases need torch to load their checkpoints
        cases = {k: v for k, v in c["parity_golden"].items() if isinstance(v, dict)}
        assert len(cases) >= 2 and all(v["passed"] for v in cases.values()), c["parity_golden"]
    cells = c["latency"]["cells"]
    assert [(x["gallery"], x["queries"]) for x in cells] == [(20, 1), (20, 32), (45, 1), (45, 32)]
    assert all(x["valid_ids"] for x in cells)


def test_whitespace_ids_equal_the_tokenizer_on_the_golden_captions(golden):
    """gpu_check's fallback for a GPU image without nltk gives the golden captions the runtime's ids."""
    from bench.gpu_check import whitespace_ids
    from runtime.captions import read_captions
    from runtime.tokenizer import Tokenizer
    from runtime.vocab import Vocabulary

    vocab = Vocabulary.from_json(golden / "vocab.json")
    captions = read_captions(golden / "test_caps.txt")
    ids, lengths = whitespace_ids(vocab, captions)
    want_ids, want_lengths = Tokenizer(vocab).encode_batch(captions)
    np.testing.assert_array_equal(lengths, want_lengths)
    np.testing.assert_array_equal(ids, want_ids)


def test_fp16_lambda_check_runs_on_the_cpu():
    """The GPU check's float16-for-every-lambda part on tiny shapes: PyTorch float16 on the CPU and the
    numpy array model in place of CuPy; every cell is finite and within the exporter's fp16 tolerance."""
    torch = pytest.importorskip("torch")
    from bench.gpu_check import FP16_LAMBDAS, format_report, fp16_lambda_check

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread hand-offs would cost more than the work
    try:
        out = fp16_lambda_check("cpu", np, n=3, q=3, length=4, r=5, d=16)
    finally:
        torch.set_num_threads(threads)
    for name in ("torch", "array_model"):
        assert out[name]["passed"], out[name]
        assert len(out[name]["max_abs_err"]) == 2 * len(FP16_LAMBDAS)
        assert 0 < max(out[name]["max_abs_err"].values()) < 5e-3
    text = format_report({"started": "now", "cupy": {"skipped": "-"}, "fp16_lambdas": out})
    assert "fp16 for every lambda, torch: passed=True" in text and "t2i_30" in text


@pytest.mark.gpu
def test_fp16_lambda_check_passes_on_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from bench.gpu_check import fp16_lambda_check

    out = fp16_lambda_check("cuda")
    assert out["torch"]["passed"], out["torch"]
    assert out["array_model"].get("passed", True), out["array_model"]  # skipped without CuPy
