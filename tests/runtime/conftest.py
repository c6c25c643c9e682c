"""Small exported models (t2i and i2t) and seeded data for the runtime tests."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import WORDS, small_config, write_checkpoint


def export_small(folder, seed=0, **overrides):
    from export.to_onnx import main

    ckpt = write_checkpoint(folder / "run", small_config(**overrides), seed=seed)
    assert main([str(ckpt), "--out", str(folder / "engines"), "--max-words", "24"]) == 0
    return folder / "engines" / "scan.json"


@pytest.fixture(scope="session")
def small_engines(tmp_path_factory):
    return {
        mode: export_small(
            tmp_path_factory.mktemp(f"small_{mode}"),
            seed=int(mode == "i2t"),
            cross_attn=mode,
            agg_func="LogSumExp" if mode == "t2i" else "Mean",
        )
        for mode in ("t2i", "i2t")
    }


@pytest.fixture(scope="session", params=["t2i", "i2t"])
def engine_path(request, small_engines):
    return small_engines[request.param]


def random_captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS[:-1], size=rng.integers(1, 12))) + " ." for _ in range(n)]


def random_regions(n: int, seed: int = 0, r: int = 5, img_dim: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, r, img_dim)).astype(np.float32)
