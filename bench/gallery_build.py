"""Gallery build throughput through ``build_image_gallery``: images/s and bytes per cached image (float32, float16)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.plan import Plan
from bench.synthetic import rng_for
from runtime.engine import ScanEngine
from runtime.gallery import build_image_gallery
from runtime.options import WriteOptions


def bench_build(engine: ScanEngine, plan: Plan, seed: int) -> dict[str, Any]:
    regions = rng_for(seed, 5).standard_normal((plan.build_images, plan.regions, plan.img_dim), dtype=np.float32)
    out: dict[str, Any] = {"images": plan.build_images, "regions": plan.regions, "img_dim": plan.img_dim}
    with tempfile.TemporaryDirectory(prefix="scan-bench-") as tmp:
        # Warm the image session on a small batch so the first dtype does not pay for ORT's first run.
        build_image_gallery(engine, regions[:4], Path(tmp) / "warm", options=WriteOptions(progress=False))
        for dtype in ("float32", "float16"):
            folder = Path(tmp) / dtype
            t0 = time.perf_counter()
            g = build_image_gallery(engine, regions, folder, options=WriteOptions(dtype=dtype, progress=False))
            seconds = time.perf_counter() - t0
            disk = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
            out[dtype] = {
                "seconds": seconds,
                "images_per_s": plan.build_images / seconds,
                "bytes_per_image": float(g.nbytes_per_item()),
                "disk_bytes_per_image": disk / len(g),
            }
            del g
    return out
