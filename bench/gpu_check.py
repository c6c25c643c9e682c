"""One short GPU check: TensorRT engines vs ONNX Runtime float32, and the PyTorch CUDA baseline.

    python bench/gpu_check.py --engine engines/scan.json [--json gpu_check.json]

* With TensorRT and a GPU: builds the engines for ``--engine`` (export/build_engine.py), checks the
  TensorRT head, text and image engines against ONNX Runtime float32 on seeded inputs, and times the
  head (pairs/s).
* With PyTorch + CUDA (with or without TensorRT): runs the batched reference head of
  ``export/model.py`` on the GPU in float32 and float16 on full-size synthetic shapes and records
  pairs/s: the GPU baseline the benchmark compares against.
Each part is skipped, with the reason in the JSON, when what it needs is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.torch_cuda import torch_cuda_head, unavailable
from runtime import atomic
from runtime.config import SCANConfig


def torch_cuda_baseline(
    n: int = 4096, q: int = 32, length: int = 14, r: int = 36, d: int = 1024, repeats: int = 10
) -> dict[str, Any]:
    """pairs/s of the exact batched head in PyTorch on CUDA (bench/torch_cuda.py), fp32 and fp16, both
    cross_attn modes, on seeded random unit-norm embeddings of full size."""
    reason = unavailable()
    if reason:
        return {"skipped": reason}
    rng = np.random.default_rng(0)
    images = rng.standard_normal((n, r, d), dtype=np.float32)
    images /= np.linalg.norm(images, axis=-1, keepdims=True)
    captions = rng.standard_normal((q, length, d), dtype=np.float32)
    captions /= np.linalg.norm(captions, axis=-1, keepdims=True)
    lengths = np.full(q, length, np.int64)
    timing = dict(warmup=3, min_repeats=repeats, max_repeats=repeats, budget_s=0.0)
    out: dict[str, Any] = {"shapes": {"N": n, "Q": q, "L": length, "R": r, "d": d}}
    for mode, agg, lam in (("t2i", "LogSumExp", 9.0), ("i2t", "Mean", 4.0)):
        cfg = SCANConfig(vocab_size=10, embed_size=d, cross_attn=mode, agg_func=agg, lambda_softmax=lam)
        for name, c in torch_cuda_head(images, None, captions, lengths, cfg, timing).items():
            key = f"{mode}_{'float32' if name.endswith('fp32') else 'float16'}"
            if c["status"] != "measured":
                out[key] = {"failed": c["reason"]}
                continue
            s = c["seconds"]
            out[key] = {
                "pairs_per_s": c["pairs_per_s"],
                "median_s": s["median"],
                "p10_s": s["p10"],
                "p90_s": s["p90"],
                "gemm_gflops": c["gemm_gflops"],
            }
    import torch

    out["device"] = torch.cuda.get_device_name(0)
    return out


def tensorrt_check(manifest_path: Path, out_dir: Path) -> dict[str, Any]:
    """Build the engines, compare them with ONNX Runtime float32, time the head."""
    from runtime.backends import tensorrt_available

    if not tensorrt_available():
        return {"skipped": "TensorRT is not installed"}
    from export.build_engine import main as build
    from runtime.engine import ScanEngine

    rc = build([str(manifest_path), "--out", str(out_dir)])
    if rc != 0:
        return {"failed": f"build_engine.py exited {rc}"}
    result: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    with (
        ScanEngine.open(manifest_path, backend="onnxruntime") as ref,
        ScanEngine.open(manifest_path, backend="tensorrt") as trt,
    ):
        cfg = ref.config
        regions = rng.standard_normal((64, 36, cfg.img_dim)).astype(np.float32)
        ids = rng.integers(4, cfg.vocab_size, (16, 14))
        lengths = rng.integers(3, 15, 16).astype(np.int64)
        lengths[0] = 14
        ids[np.arange(14)[None, :] >= lengths[:, None]] = 0
        images_ref, gram_ref = ref.encode_images(regions)
        images_trt, gram_trt = trt.encode_images(regions)
        words_ref = ref.encode_ids(ids, lengths)
        words_trt = trt.encode_ids(ids, lengths)
        sims_ref = ref.sims(images_ref, gram_ref, words_ref, lengths)
        sims_trt = trt.sims(images_ref, gram_ref, words_ref, lengths)
        result["max_abs_err"] = {
            "image": float(np.abs(images_ref - images_trt).max()),
            "image_gram": float(np.abs(gram_ref - gram_trt).max()),
            "text": float(np.abs(words_ref - words_trt).max()),
            "head": float(np.abs(sims_ref - sims_trt).max()),
        }
        result["top1_agreement"] = float((sims_ref.argmax(0) == sims_trt.argmax(0)).mean())
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            trt.sims(images_ref, gram_ref, words_ref, lengths)
            times.append(time.perf_counter() - t0)
        result["head_pairs_per_s_host_roundtrip"] = sims_ref.size / float(np.median(times))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", help="manifest scan.json to build TensorRT engines for")
    p.add_argument("--out", default=None, help="engine output folder (default: the manifest's folder)")
    p.add_argument("--json", default="gpu_check.json")
    p.add_argument("--n", type=int, default=4096, help="gallery images for the PyTorch CUDA baseline")
    args = p.parse_args(argv)
    report: dict[str, Any] = {"torch_cuda_baseline": torch_cuda_baseline(n=args.n)}
    if args.engine:
        manifest = Path(args.engine)
        report["tensorrt"] = tensorrt_check(manifest, Path(args.out) if args.out else manifest.parent)
    atomic.write_json(args.json, report)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
