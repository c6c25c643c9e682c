"""Small seeded SCAN checkpoints in the original layout, for tests that need a model of their own."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from export.checkpoint import save_checkpoint
from export.model import SCAN
from runtime.config import AGG_FUNCS, CROSS_ATTNS, RAW_FEATURE_NORMS, SCANConfig

WORDS = ["a", "dog", "cat", "man", "woman", "red", "blue", "on", "the", "beach", "grass", "running", "."]


def vocab_dict(words: list[str] = WORDS) -> dict:
    idx2word = ["<pad>", "<start>", "<end>", "<unk>", *words]
    return {
        "word2idx": {w: i for i, w in enumerate(idx2word)},
        "idx2word": {str(i): w for i, w in enumerate(idx2word)},
        "idx": len(idx2word),
    }


# Every option of the original: the head's (cross_attn, agg_func, raw_feature_norm) and the encoders'
# (bi_gru, num_layers, no_imgnorm, no_txtnorm, precomp_enc_type).
HEAD_OPTIONS = list(itertools.product(CROSS_ATTNS, AGG_FUNCS, RAW_FEATURE_NORMS))
ENCODER_OPTIONS = list(itertools.product((True, False), (1, 2), (False, True), (False, True), ("basic", "weight_norm")))


def option_config(cross_attn: str, agg_func: str, norm: str, case: int) -> SCANConfig:
    """A tiny model with these head options, encoder options ``case`` (cycled) and lambdas varied by case."""
    bi_gru, layers, no_imgnorm, no_txtnorm, enc = ENCODER_OPTIONS[case % len(ENCODER_OPTIONS)]
    return SCANConfig(
        vocab_size=20,
        img_dim=10,
        embed_size=8,
        word_dim=5,
        num_layers=layers,
        bi_gru=bi_gru,
        no_imgnorm=no_imgnorm,
        no_txtnorm=no_txtnorm,
        precomp_enc_type=enc,
        raw_feature_norm=norm,
        agg_func=agg_func,
        cross_attn=cross_attn,
        lambda_lse=20.0 if case % 2 else 6.0,
        lambda_softmax=(4.0, 9.0, 50.0)[case % 3],
    )


def small_config(**overrides) -> SCANConfig:
    base = dict(vocab_size=len(WORDS) + 4, img_dim=12, embed_size=8, word_dim=6, bi_gru=True)
    base.update(overrides)
    return SCANConfig(**base)


def original_opt(cfg: SCANConfig, **extra) -> argparse.Namespace:
    opt = dict(
        data_path="./data/",
        data_name="tiny_precomp",
        vocab_path="./vocab/",
        margin=0.2,
        max_violation=True,
        batch_size=128,
        num_epochs=30,
        **cfg.to_dict(),
    )
    opt.update(extra)
    return argparse.Namespace(**opt)


def write_checkpoint(
    folder: Path,
    cfg: SCANConfig | None = None,
    seed: int = 0,
    legacy: bool = False,
    with_vocab: bool = True,
    **opt_extra,
) -> Path:
    """``folder/model_best.pth.tar`` (+ ``folder/vocab/tiny_precomp_vocab.json``) in the original layout."""
    cfg = cfg or small_config()
    torch.manual_seed(seed)
    model = SCAN(cfg)
    path = save_checkpoint(folder / "model_best.pth.tar", model, original_opt(cfg, **opt_extra), epoch=1, iters=10)
    if legacy:  # the pre-zip serialization of old (PyTorch 0.3) checkpoints
        torch.save(torch.load(path, weights_only=False), path, _use_new_zipfile_serialization=False)
    if with_vocab:
        (folder / "vocab").mkdir(exist_ok=True)
        (folder / "vocab" / "tiny_precomp_vocab.json").write_text(json.dumps(vocab_dict()))
    return path


def minimal_manifest(folder: Path) -> Path:
    """``folder/scan.json``: a manifest that loads (schema and seal valid) but whose files do not exist, for
    tests that stop before any listed file is read."""
    from runtime.manifest import FORMAT, write_manifest

    fake = "0" * 64
    head = {"file": "scan.onnx", "sha256": fake, "inputs": [], "outputs": []}
    path = Path(folder) / "scan.json"
    write_manifest(
        path,
        {
            "format": FORMAT,
            "name": "scan",
            "config": small_config().to_dict(),
            "max_words": 24,
            "graphs": {"head": head},
            "vocab": {"file": "scan.vocab.json", "sha256": fake},
            "image_encoder_id": fake,
            "text_encoder_id": fake,
        },
    )
    return path


# Prepended to a subprocess's code: importing any of these raises ImportError, as on a machine that
# has only numpy (the array backend's promise: no torch, onnx or onnxruntime at serve time).
BLOCKED_IMPORTS = ("torch", "onnx", "onnxruntime", "onnxscript", "tensorrt")
BLOCK_IMPORTS_PREAMBLE = f"""
import sys
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED_IMPORTS!r}:
            raise ImportError(f"{{name}} is blocked in this test")
sys.meta_path.insert(0, _Blocked())
"""


# Tiny GEMMs on a shared 2-core machine: OpenBLAS's worker threads only add synchronisation (measured:
# a 1152x64x112 GEMM took 25 ms with 2 threads under load, 0.2 ms with 1), so test subprocesses use one.
QUIET_BLAS = {"OPENBLAS_NUM_THREADS": "1"}


def run_with_blocked_imports(code: str, *args: str, cwd=None, timeout: float = 300):
    """Run ``code`` in a fresh Python with torch/onnx/onnxruntime unimportable; returns CompletedProcess."""
    import os
    import subprocess
    import sys

    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", ""), **QUIET_BLAS}
    return subprocess.run(
        [sys.executable, "-c", BLOCK_IMPORTS_PREAMBLE + code, *args],
        capture_output=True,
        text=True,
        cwd=cwd or repo,
        env=env,
        timeout=timeout,
    )


def encode_texts(engine, captions: list[str]) -> tuple:
    """Word embeddings (Q, L, d) and lengths (Q,) of ``captions`` through ``engine``'s tokenizer and text graph."""
    ids, lengths = engine.tokenizer.encode_batch(captions)
    return engine.encode_ids(ids, lengths), lengths
