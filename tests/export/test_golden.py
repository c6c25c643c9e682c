"""The golden cases from the original SCAN code, reproduced three ways (max abs error <= 1e-5).

The original runs in float32 and the expected matrices are its float64 copies, so a faithful
float32 implementation agrees to ~1e-7; 1e-5 leaves room for other summation orders only.
"""

from __future__ import annotations

import numpy as np
import torch

from bench.evaluation import full_sims, load_split
from export.checkpoint import load_checkpoint, load_vocab
from runtime.engine import ScanEngine
from runtime.options import EngineOptions
from runtime.tokenizer import Tokenizer
from tests.conftest import golden_expected

TOL = 1e-5


def _encode(golden):
    ckpt = load_checkpoint(golden / "ckpt.pth.tar")
    tok = Tokenizer(load_vocab(golden / "vocab.json", ckpt.config))
    ids, lengths = tok.encode_batch(
        [line.strip() for line in (golden / "test_caps.txt").read_text(encoding="utf-8").splitlines()]
    )
    regions = torch.from_numpy(np.load(golden / "test_ims.npy"))
    return ckpt, regions, torch.from_numpy(ids), torch.from_numpy(lengths)


def test_slow_reference_reproduces_original(golden):
    ckpt, regions, ids, lengths = _encode(golden)
    sims = ckpt.model.sims(regions, ids, lengths, slow=True).numpy()
    assert np.abs(sims - golden_expected(golden)).max() <= TOL


def test_batched_reference_reproduces_original(golden):
    ckpt, regions, ids, lengths = _encode(golden)
    sims = ckpt.model.sims(regions, ids, lengths, slow=False).numpy()
    assert np.abs(sims - golden_expected(golden)).max() <= TOL


def test_onnx_graphs_reproduce_original_from_raw_files(golden, exported):
    with ScanEngine.open(exported[golden.name], EngineOptions(backend="onnxruntime")) as engine:
        regions, captions = load_split(golden, "test", engine.config.img_dim)
        # small blocks and batches so several blocks and length buckets are exercised
        sims = full_sims(engine, regions, captions, image_block=5, caption_batch=7, progress=False)
    assert sims.shape == golden_expected(golden).shape
    assert np.abs(sims - golden_expected(golden)).max() <= TOL
