"""Small exported models (t2i and i2t) and seeded data for the runtime tests."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.options import EngineOptions, WriteOptions
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


def make_gallery(engine_path, folder, n_images: int = 23, n_captions: int = 29, dtype: str = "float32"):
    """A gallery folder (images/ with names, captions/) as runtime/search.py lays it out, built in two appends."""
    from runtime.engine import ScanEngine
    from runtime.gallery import build_caption_gallery, build_image_gallery

    regions, captions = random_regions(n_images, seed=11), random_captions(n_captions, seed=12)
    names = [f"img{i}" for i in range(n_images)]
    with ScanEngine.open(engine_path, EngineOptions(backend="onnxruntime")) as engine:
        for a, b in ((0, n_images // 2), (n_images // 2, n_images)):
            build_image_gallery(
                engine,
                regions[a:b],
                folder / "images",
                names=names[a:b],
                options=WriteOptions(dtype=dtype, append=True, progress=False),
            )
        for a, b in ((0, n_captions // 2), (n_captions // 2, n_captions)):
            build_caption_gallery(
                engine,
                captions[a:b],
                folder / "captions",
                options=WriteOptions(dtype=dtype, append=True, progress=False),
            )
    return folder


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance (2 CPUs) for the whole session: starting Ray takes seconds."""
    pytest.importorskip("ray", reason="needs the 'cluster' extra (pip install -e '.[cluster]')")
    import ray

    from runtime.cluster import connect

    started = connect(num_cpus=2)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def engine_t2i(small_engines):
    return small_engines["t2i"]


@pytest.fixture(scope="module")
def gallery(engine_t2i, tmp_path_factory):
    """The service tests' gallery (tests/runtime/serve_support.py), built once per module."""
    from tests.runtime.serve_support import build_gallery

    return build_gallery(engine_t2i, tmp_path_factory.mktemp("serve_gallery"))
