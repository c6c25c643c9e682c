"""bench/max_shift.py: the contender really is the shifted head, and the quick run writes its figures."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")


def test_the_contender_graph_subtracts_the_max_and_agrees(tmp_path):
    from bench.max_shift import head_graph, main
    from runtime.config import SCANConfig

    cfg = SCANConfig(vocab_size=10, embed_size=4, lambda_softmax=9.0)  # t2i, clipped_l2norm: unshifted in float32
    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, 3, 4)).astype(np.float32)
    feeds = {
        "images": images,
        "image_gram": images @ images.transpose(0, 2, 1),
        "captions": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "lengths": np.array([3, 2]),
    }

    def reduce_max(blob: bytes) -> int:
        return sum(n.op_type == "ReduceMax" for n in onnx.load_from_string(blob).graph.node)

    assert reduce_max(head_graph(cfg, feeds, shifted=True)) == reduce_max(head_graph(cfg, feeds, shifted=False)) + 1
    assert main(["--quick", "--json", str(tmp_path / "m.json")]) == 0
    report = json.loads((tmp_path / "m.json").read_text())
    for mode in ("t2i", "i2t"):
        assert report[mode]["shifted_over_unshifted"] > 0
        assert report[mode]["max_abs_diff"] <= 1e-5  # exact in real arithmetic: float32 rounding only
    assert report["load_average_before"] is not None
