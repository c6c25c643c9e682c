"""export/to_onnx.py: graphs, manifest, parity on unseen shapes, TensorRT-friendliness, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import export.exporter as exporter
from export.to_onnx import main
from tests.helpers import small_config, write_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(
            cross_attn="i2t",
            raw_feature_norm="softmax",
            agg_func="LogSumExp",
            lambda_lse=20.0,
            bi_gru=False,
            num_layers=2,
            precomp_enc_type="weight_norm",
            no_txtnorm=True,
        ),
        dict(cross_attn="t2i", raw_feature_norm="softmax", agg_func="Max", bi_gru=True, num_layers=2, no_imgnorm=True),
        dict(cross_attn="t2i", raw_feature_norm="clipped_l1norm", agg_func="Sum", bi_gru=False),
    ],
)
def test_export_variants_pass_parity_and_write_manifest(tmp_path, capsys, overrides):
    ckpt = write_checkpoint(tmp_path / "run", small_config(**overrides))
    assert main([str(ckpt), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "checking head graph" in out and "done" in out
    manifest = json.loads((tmp_path / "out" / "scan.json").read_text())
    assert manifest["config"] == small_config(**overrides).to_dict()
    for kind in ("image", "text", "head"):
        g = manifest["graphs"][kind]
        assert g["parity"]["passed"] and g["parity"]["max_abs_err"] <= exporter.PARITY_ATOL
        assert (tmp_path / "out" / g["file"]).is_file()
        model = onnx.load(tmp_path / "out" / g["file"])
        ops = {n.op_type for n in model.graph.node}
        assert "ReduceLogSumExp" not in ops
        # every batch/length/block dimension is symbolic, not frozen to the export example
        for io in g["inputs"]:
            if io["name"] in ("regions", "images", "captions", "ids", "image_gram"):
                assert all(isinstance(d, str) for d in io["shape"][:2]), io
    text_ops = {n.op_type for n in onnx.load(tmp_path / "out" / "scan.text.onnx").graph.node}
    assert "GRU" in text_ops and "Loop" not in text_ops
    head_inputs = [i["name"] for i in manifest["graphs"]["head"]["inputs"]]
    expected = (
        ["images", "image_gram", "captions", "lengths"]
        if overrides["cross_attn"] == "t2i"
        else ["images", "captions", "lengths"]
    )
    assert head_inputs == expected


def test_parity_failure_names_the_graph_and_writes_nothing(tmp_path, monkeypatch, capsys):
    ckpt = write_checkpoint(tmp_path / "run")
    real = exporter.reference

    def skewed(model, kind, feeds):
        out = real(model, kind, feeds)
        return [o + 1e-3 for o in out] if kind == "text" else out

    monkeypatch.setattr(exporter, "reference", skewed)
    assert main([str(ckpt), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "text graph" in err and "differs from the PyTorch reference" in err
    assert not (tmp_path / "out" / "scan.json").exists()


def test_missing_vocab_and_refused_checkpoint_exit_nonzero(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "run", with_vocab=False)
    assert main([str(ckpt), "--out", str(tmp_path / "out")]) == 1
    assert "--vocab" in capsys.readouterr().err


@pytest.mark.slow
def test_full_size_export(tmp_path, capsys):
    cfg = small_config(img_dim=2048, embed_size=1024, word_dim=300, vocab_size=10000)
    ckpt = write_checkpoint(tmp_path / "run", cfg, with_vocab=False)
    vocab = {"word2idx": {}, "idx2word": {}, "idx": 10000}
    for i in range(10000):
        w = ["<pad>", "<start>", "<end>", "<unk>"][i] if i < 4 else f"w{i}"
        vocab["word2idx"][w] = i
        vocab["idx2word"][str(i)] = w
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    t0 = time.perf_counter()
    assert main([str(ckpt), "--vocab", str(tmp_path / "vocab.json"), "--out", str(tmp_path / "out")]) == 0
    print(f"full-size export took {time.perf_counter() - t0:.1f} s")
    manifest = json.loads((tmp_path / "out" / "scan.json").read_text())
    assert manifest["config"]["embed_size"] == 1024
    assert np.isfinite(manifest["graphs"]["head"]["parity"]["max_abs_err"])


def test_help_imports_neither_torch_nor_the_runtime_cli() -> None:
    """``--help`` answers without torch (seconds to import), and no export imports runtime/cli.py (which
    pulls in the engine, galleries and searcher)."""
    code = (
        "import sys, runpy\n"
        "sys.argv = ['export/to_onnx.py', '--help']\n"
        "try:\n    runpy.run_path('export/to_onnx.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "import export.build_engine\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m == 'runtime.cli'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: to_onnx.py" in out.stdout and out.stdout.strip().endswith("[]")
