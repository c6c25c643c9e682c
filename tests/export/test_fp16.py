"""FP16 graphs (for TensorRT) against float32, on the CPU in ONNX Runtime.

Tolerance: 5e-3 on similarities (10 float16 ulps at 1.0; the errors seen are < 5e-4), and the ranking
must agree: the float16 top-1 is the float32 top-1 wherever float32's top-2 gap exceeds that tolerance,
and top-5 sets overlap by at least 4 of 5.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from bench.evaluation import full_sims, load_split
from export.exporter import FP16_ATOL
from runtime.engine import ScanEngine
from runtime.options import EngineOptions
from tests.conftest import golden_expected
from tests.runtime.conftest import export_small, random_captions, random_regions


def assert_rankings_agree(s16: np.ndarray, s32: np.ndarray) -> None:
    for a, b in ((s16, s32), (s16.T, s32.T)):  # both search directions
        order32 = np.argsort(-b, axis=1, kind="stable")
        gap = np.take_along_axis(b, order32[:, :1], 1)[:, 0] - np.take_along_axis(b, order32[:, 1:2], 1)[:, 0]
        clear = gap > FP16_ATOL
        assert (np.argmax(a, axis=1)[clear] == order32[clear, 0]).all()
        top5_16 = np.argsort(-a, axis=1, kind="stable")[:, :5]
        overlap = [len(set(x) & set(y)) for x, y in zip(top5_16, order32[:, :5])]
        assert min(overlap) >= 4


def test_golden_fp16_matches_float32(golden, exported):
    with ScanEngine.open(exported[golden.name], EngineOptions(backend="onnxruntime", precision="fp16")) as engine:
        assert engine.head_dtype == np.float16
        regions, captions = load_split(golden, "test", engine.config.img_dim)
        s16 = full_sims(engine, regions, captions, image_block=5, caption_batch=7, progress=False)
    expected = golden_expected(golden)
    assert np.isfinite(s16).all()
    assert np.abs(s16 - expected).max() <= FP16_ATOL
    assert_rankings_agree(s16, expected)


@pytest.mark.parametrize("cross_attn", ["i2t", "t2i"])
def test_lambda_lse_20_does_not_overflow_in_fp16(tmp_path, cross_attn):
    """exp(20 * cos) overflows float16 (max 65504 < e^20); the graph's max-subtracted float32 LSE must not."""
    manifest = export_small(
        tmp_path, cross_attn=cross_attn, agg_func="LogSumExp", lambda_lse=20.0, no_imgnorm=True
    )  # unnormalised features: larger logits
    regions, captions = random_regions(9, seed=3) * 5, random_captions(20, seed=4)
    with ScanEngine.open(manifest, EngineOptions(backend="onnxruntime")) as e32:
        s32 = full_sims(e32, regions, captions, progress=False)
    with ScanEngine.open(manifest, EngineOptions(backend="onnxruntime", precision="fp16")) as e16:
        s16 = full_sims(e16, regions, captions, progress=False)
    assert np.isfinite(s16).all()
    assert np.abs(s16 - s32).max() <= FP16_ATOL * max(1.0, np.abs(s32).max())
    assert_rankings_agree(s16, s32)


def test_fp16_graphs_are_typed_fp16_with_fp32_islands(golden, exported):
    manifest_path = exported[golden.name]
    manifest = json.loads(manifest_path.read_text())
    head = manifest["graphs"]["head.fp16"]
    expected = {"images": "float16", "captions": "float16", "lengths": "int64"}
    if manifest["config"]["cross_attn"] == "t2i":
        expected["image_gram"] = "float16"
    assert {i["name"]: i["dtype"] for i in head["inputs"]} == expected
    assert head["outputs"][0]["dtype"] == "float32"
    model = onnx.load(manifest_path.parent / head["file"])
    matmul_inputs = {n.input[0] for n in model.graph.node if n.op_type == "MatMul"}
    assert matmul_inputs  # the GEMMs exist and get float16 operands (inputs are float16)
    ops = {n.op_type for n in model.graph.node}
    assert "Cast" in ops and "ReduceLogSumExp" not in ops
    text = manifest["graphs"]["text.fp16"]
    assert text["outputs"][0]["dtype"] == "float16"
    gru_types = {n.op_type for n in onnx.load(manifest_path.parent / text["file"]).graph.node}
    assert "GRU" in gru_types
