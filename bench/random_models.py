"""Randomly initialised SCAN models at full size, written as original checkpoints and exported once.

Each model is exported with ``export_all`` into a cache folder keyed by its configuration, seed and the
exporter's source, so reruns reuse it; a damaged cache entry is exported again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from bench.synthetic import MODES, Sizes, vocab_json
from runtime.config import SCANConfig
from runtime.engine import ScanEngine
from runtime.options import EngineOptions

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path("~/.cache/scan-runtime/bench").expanduser()
# Files whose change must invalidate a cached export: the graphs are built from them.
EXPORT_SOURCES = ("export/model.py", "export/graphs.py", "export/exporter.py", "runtime/manifest.py")
# Part of the cache key (the latency report's schema when the cache was made): changing it re-exports.
CACHE_SCHEMA = "scan-runtime-bench-latency/1"


def model_config(sizes: Sizes, mode: str) -> SCANConfig:
    return SCANConfig(
        vocab_size=sizes.vocab_size,
        img_dim=sizes.img_dim,
        embed_size=sizes.embed_size,
        word_dim=sizes.word_dim,
        num_layers=1,
        bi_gru=True,
        raw_feature_norm="clipped_l2norm",
        **MODES[mode],
    )


def cache_key(cfg: SCANConfig, seed: int) -> str:
    digest = hashlib.sha256(
        json.dumps({"config": cfg.to_dict(), "seed": seed, "schema": CACHE_SCHEMA}, sort_keys=True).encode()
    )
    for rel in EXPORT_SOURCES:
        p = REPO / rel
        digest.update(p.read_bytes() if p.is_file() else b"")
    return digest.hexdigest()[:16]


def prepare_model(sizes: Sizes, mode: str, seed: int, cache: Path) -> tuple[Path, dict[str, Any]]:
    """The manifest of a randomly initialised model for ``mode``, exported once into ``cache``."""
    cfg = model_config(sizes, mode)
    model_seed = seed * 100 + list(MODES).index(mode)
    folder = cache / f"{mode}-{cfg.embed_size}-{cache_key(cfg, model_seed)}"
    manifest = folder / "scan.json"
    if manifest.is_file():
        try:
            ScanEngine.open(
                manifest, EngineOptions(backend="onnxruntime")
            ).close()  # verifies every listed file's sha256
            return manifest, {"manifest": str(manifest), "cached": True, "export_seconds": 0.0}
        except Exception as e:  # a damaged cache entry is re-exported, not fatal
            logger.warning("cached export %s unusable (%s); exporting again", folder, e)
    t0 = time.perf_counter()
    logger.info("exporting a random %s model (embed %d) into %s", mode, cfg.embed_size, folder)
    _export(cfg, model_seed, folder, sizes)
    return manifest, {"manifest": str(manifest), "cached": False, "export_seconds": time.perf_counter() - t0}


def _export(cfg: SCANConfig, seed: int, folder: Path, sizes: Sizes) -> None:
    import torch

    from export.checkpoint import load_checkpoint, save_checkpoint
    from export.exporter import export_all
    from export.model import SCAN

    torch.manual_seed(seed)
    opt = argparse.Namespace(
        data_path="./data/",
        data_name="bench_precomp",
        vocab_path="./vocab/",
        margin=0.2,
        max_violation=True,
        **cfg.to_dict(),
    )
    # The original layout, so the export goes through the same loader as a user's checkpoint.
    ckpt = save_checkpoint(folder / "model_best.pth.tar", SCAN(cfg), opt)
    export_all(
        load_checkpoint(ckpt),
        vocab_json(sizes.vocab_size),
        folder,
        name="scan",
        progress=lambda s: logger.info("%s: %s", cfg.cross_attn, s),
    )
