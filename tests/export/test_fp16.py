"""FP16 graphs (for TensorRT) against float32, on the CPU in ONNX Runtime.

Tolerance: 5e-3 on similarities (10 float16 ulps at 1.0; the errors seen are < 5e-4), and the ranking
must agree: the float16 top-1 is the float32 top-1 wherever float32's top-2 gap exceeds that tolerance,
and top-5 sets overlap by at least 4 of 5.

Every lambda_softmax: the float16 head must not overflow for lambda up to 30 (the unnormalised attention
weights reach e^lambda; float16 stops at 65504 < e^11.1). ONNX Runtime's CPU provider computes float16
GEMMs in float32, so it cannot show that overflow; the grid runs the fp16 head in real float16
arithmetic instead: PyTorch's float16 CPU kernels, the exported graph in onnx's reference evaluator (the
exporter's own check, ``check_parity``), and the numpy array model with float16 storage and GEMMs.
Tolerance: the exporter's FP16_ATOL/FP16_RTOL (5e-3, above) unchanged; errors seen over the whole grid
are <= 4.4e-3 absolute, all on Sum over 50-word captions where the similarity is ~5 (rtol's part).
"""

from __future__ import annotations

import functools
import itertools
import json

import numpy as np
import onnx
import pytest
import torch

import export.model as model_module
from bench.evaluation import full_sims, load_split
from export.exporter import FP16_ATOL, FP16_RTOL, ParityError, check_parity, export_graph, graph_specs
from export.model import SCAN, batched_sims, gram, slow_sims
from runtime import array_model
from runtime.config import AGG_FUNCS, CROSS_ATTNS, RAW_FEATURE_NORMS, SCANConfig
from runtime.engine import ScanEngine
from runtime.options import EngineOptions
from tests.conftest import golden_expected
from tests.helpers import small_config
from tests.runtime.conftest import export_small, random_captions, random_regions

LAMBDAS = (1.0, 4.0, 9.0, 11.0, 12.0, 20.0, 30.0)
GRID = list(itertools.product(CROSS_ATTNS, RAW_FEATURE_NORMS, AGG_FUNCS, LAMBDAS))
# The default suite exports a representative slice: every norm at lambda 30 (the largest unnormalised
# weights) and every aggregation at lambda 12 (the first NaN before the fix), both directions.
FAST_EXPORTS = {(c, n, "LogSumExp", 30.0) for c in CROSS_ATTNS for n in RAW_FEATURE_NORMS} | {
    (c, "clipped_l2norm", a, 12.0) for c in CROSS_ATTNS for a in AGG_FUNCS
}


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


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: hand-offs between PyTorch's threads cost more than the work (100x on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _unit_features(seed: int, d: int = 16):
    """Unit image regions and word vectors (zero past each length), a one-word caption included."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(3, 9, d, generator=gen), dim=-1)
    captions = torch.nn.functional.normalize(torch.randn(4, 7, d, generator=gen), dim=-1)
    lengths = torch.tensor([7, 4, 2, 1])
    return images, captions * (torch.arange(7) < lengths.unsqueeze(1)).unsqueeze(2), lengths


@pytest.mark.parametrize("lambda_softmax", LAMBDAS)
@pytest.mark.parametrize("cross_attn", CROSS_ATTNS)
def test_float16_heads_are_finite_and_close_for_every_lambda(cross_attn, lambda_softmax, one_torch_thread):
    """The PyTorch head in float16 (the code the fp16 graphs are traced from) and the numpy array model
    with float16 storage and float16 GEMMs (CuPy's path) against the original in float32, every norm
    and aggregation. Before the head subtracted the max, PyTorch's gave NaN here from lambda 11 (t2i)."""
    images, captions, lengths = _unit_features(int(lambda_softmax))
    for norm, agg in itertools.product(RAW_FEATURE_NORMS, AGG_FUNCS):
        cfg = SCANConfig(
            vocab_size=10, embed_size=16, cross_attn=cross_attn, raw_feature_norm=norm, agg_func=agg,
            lambda_softmax=lambda_softmax,
        )  # fmt: skip
        want = slow_sims(images, captions, lengths, cfg).numpy()
        half = batched_sims(images.half(), gram(images.half()), captions.half(), lengths, None, cfg).numpy()
        im16, cap16 = images.half().numpy(), captions.half().numpy()
        arrays = array_model.sims(np, im16, None, cap16, lengths.numpy(), cfg, np.float16)
        for name, got in (("torch float16", half), ("array model float16", arrays)):
            assert np.isfinite(got).all(), f"{name} {cfg}"
            np.testing.assert_allclose(got, want, atol=FP16_ATOL, rtol=FP16_RTOL, err_msg=f"{name} {cfg}")


@functools.cache
def _fp16_head_parity(cross_attn: str, norm: str, agg: str, lambda_softmax: float) -> dict:
    torch.manual_seed(0)
    cfg = small_config(cross_attn=cross_attn, raw_feature_norm=norm, agg_func=agg, lambda_softmax=lambda_softmax)
    model = SCAN(cfg).eval()
    (head,) = [spec for spec in graph_specs(model, "fp16") if spec.graph == "head"]
    return check_parity(model, "head", export_graph(head), "fp16")


@pytest.mark.parametrize(
    "cross_attn,norm,agg,lambda_softmax",
    [pytest.param(*case, marks=() if case in FAST_EXPORTS else pytest.mark.slow) for case in GRID],
)
def test_fp16_head_graph_passes_the_exporters_check_for_every_lambda(
    cross_attn, norm, agg, lambda_softmax, one_torch_thread
):
    """The exporter's own parity check of the fp16 head (ONNX Runtime and float16 arithmetic), on its
    shapes: a one-word caption, 50-word captions, 36 regions."""
    parity = _fp16_head_parity(cross_attn, norm, agg, lambda_softmax)
    assert parity["passed"] and len(parity["runners"]) == 2


def test_the_exporters_fp16_check_fails_on_unshifted_attention_weights(monkeypatch, one_torch_thread):
    """The check can fail: with the max subtraction switched off (the head before the fix) the float16
    Gram product overflows at lambda 12 and the check refuses the graph, though ONNX Runtime passes it."""
    unshifted = model_module._attention_weights
    monkeypatch.setattr(model_module, "_attention_weights", lambda *a: unshifted(*a[:6], False))
    torch.manual_seed(0)
    model = SCAN(small_config(lambda_softmax=12.0)).eval()  # t2i, clipped_l2norm, one-word parity case
    (head,) = [spec for spec in graph_specs(model, "fp16") if spec.graph == "head"]
    with pytest.raises(ParityError, match=r"in float16 arithmetic .* non-finite values \(inf/NaN: an overflow\)"):
        check_parity(model, "head", export_graph(head), "fp16")
