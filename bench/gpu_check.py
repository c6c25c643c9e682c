"""One short GPU check: the CuPy array backend, TensorRT engines vs ONNX Runtime float32, the PyTorch CUDA baseline.

    python bench/gpu_check.py [--engine engines/scan.json] [--out-dir bench/results/gpu]

* With CuPy and a GPU (``cupy_check``, under 4 minutes on an H200): parity of the CuPy backend (fp32
  and fp16) against the numpy backend float32 on the golden cases of the original code and on a
  full-size synthetic model; head throughput (pairs/s) of CuPy fp32/fp16 against the batched PyTorch
  head on CUDA and against the float16 tensor-core GEMM rate measured in the same run; query latency
  (encode + score + top-k, ``ArrayModel.blocks_topk``) of 1 and 32 captions against 100K and 1M
  images (embed 1024, float16 resident, generated on the GPU from a seed instead of encoded).

* With TensorRT and a GPU: builds the engines for ``--engine`` (export/build_engine.py), checks the
  TensorRT head, text and image engines against ONNX Runtime float32 on seeded inputs, and times the
  head (pairs/s).
* With PyTorch + CUDA (with or without TensorRT): runs the batched reference head of
  ``export/model.py`` on the GPU in float32 and float16 on full-size synthetic shapes and records
  pairs/s: the project's one GPU baseline (``torch_cuda_head``; bench/latency.py reports it beside the
  CPU contenders). Each dtype also times a plain GEMM of the head's shape ``(N*R, d) @ (d, Q*L)`` on
  the same device: the ceiling the head is measured against.
Each part is skipped, with the reason in the JSON, when what it needs is missing; a part that fails
records its error and the others still run. Writes ``gpu_check.json`` and ``gpu_check.txt`` into
``--out-dir`` (atomically).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from bench import harness
from bench.synthetic import MODES, unit_rows
from runtime import atomic
from runtime.config import SCANConfig
from runtime.install import install_command
from runtime.options import EngineOptions

logger = logging.getLogger(__name__)

DTYPES = {"torch_cuda_fp32": "float32", "torch_cuda_fp16": "float16"}


def unavailable() -> str | None:
    """Why the baseline cannot run here (no PyTorch, no CUDA device), or None."""
    torch = harness.optional_torch()
    if torch is None:
        return f"PyTorch is not installed ({install_command('export')})"
    if not torch.cuda.is_available():
        return "no CUDA device visible to PyTorch"
    return None


def torch_cuda_head(
    images: np.ndarray,
    image_gram: np.ndarray | None,
    captions: np.ndarray,
    lengths: np.ndarray,
    cfg: SCANConfig,
    timing: dict[str, Any],
    ref: np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """``{name: figures}`` for ``torch_cuda_fp32`` and ``torch_cuda_fp16``, each skipped or failed with the reason.

    ``images`` (N, R, d), ``captions`` (Q, L, d), ``lengths`` (Q,) on the host; ``image_gram`` (N, R, R) or None
    (t2i: made on the GPU before timing; i2t: the head makes the caption Gram itself, as it serves). A
    measured entry holds ``throughput``'s figures, ``shape``, ``gemm_pairs_per_s`` and ``gemm_gflops``, and
    ``max_abs_diff_vs_batched`` against ``ref`` (N, Q) when given. ``timing``: ``time_calls`` arguments.
    """
    reason = unavailable()
    if reason:
        return {name: harness.skipped(reason) for name in DTYPES}
    torch = harness.optional_torch()
    out: dict[str, dict[str, Any]] = {}
    for name, dtype in DTYPES.items():
        try:
            feeds = (images, image_gram, captions, lengths)
            out[name] = _time_on_gpu(torch, getattr(torch, dtype), feeds, cfg, timing, ref)
        except Exception as e:  # report a broken GPU path, keep the other figures
            logger.warning("%s failed: %s", name, e)
            out[name] = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
    return out


def _time_on_gpu(
    torch, dtype, feeds: tuple, cfg: SCANConfig, timing: dict[str, Any], ref: np.ndarray | None
) -> dict[str, Any]:
    from export.model import batched_sims, gram

    images, image_gram, captions, lengths = feeds  # host arrays, as torch_cuda_head takes them
    n, r, d = images.shape
    q, length = captions.shape[:2]
    pairs = n * q
    dev = torch.device("cuda")
    ti, tc = (torch.from_numpy(np.ascontiguousarray(x)).to(dev, dtype) for x in (images, captions))
    tl = torch.from_numpy(np.asarray(lengths, np.int64)).to(dev)
    tg = None
    if image_gram is not None:
        tg = torch.from_numpy(np.ascontiguousarray(image_gram)).to(dev, dtype)
    elif cfg.cross_attn == "t2i":
        tg = gram(ti)
    a, b = ti.reshape(n * r, d), tc.reshape(q * length, d).T
    with torch.no_grad():
        got = batched_sims(ti, tg, tc, tl, None, cfg).float().cpu().numpy()
        sync = torch.cuda.synchronize
        times = harness.time_calls(lambda: batched_sims(ti, tg, tc, tl, None, cfg), sync=sync, **timing)
        gemm_times = harness.time_calls(lambda: a @ b, sync=sync, **timing)
    gemm_s = float(np.median(gemm_times))
    out = {
        **harness.throughput(times, pairs),
        "shape": [n, q, length],
        "gemm_pairs_per_s": pairs / gemm_s,
        "gemm_gflops": 2.0 * n * r * d * q * length / gemm_s / 1e9,
    }
    if ref is not None:
        out["max_abs_diff_vs_batched"] = float(np.abs(got - ref).max())
    return out


def torch_cuda_baseline(
    n: int = 4096, q: int = 32, length: int = 14, r: int = 36, d: int = 1024, repeats: int = 10
) -> dict[str, Any]:
    """pairs/s of the exact batched head in PyTorch on CUDA (``torch_cuda_head``), fp32 and fp16, both
    cross_attn modes, on seeded random unit-norm embeddings of full size."""
    reason = unavailable()
    if reason:
        return {"skipped": reason}
    rng = np.random.default_rng(0)
    images, captions = unit_rows(rng, (n, r, d)), unit_rows(rng, (q, length, d))
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


# lambda_softmax values of the fp16 check: the unnormalised attention weights reach e^lambda, past float16's
# 65504 from lambda 11.1, so the float16 heads subtract the max (export/model.py) or keep them in float32.
FP16_LAMBDAS = (1.0, 4.0, 9.0, 11.0, 12.0, 20.0, 30.0)


def fp16_lambda_check(
    torch_device: str | None = "cuda", xp=None, n: int = 64, q: int = 8, length: int = 12, r: int = 36, d: int = 256
) -> dict[str, Any]:
    """The float16 heads in real float16 arithmetic for every lambda_softmax up to 30 against float32.

    ``torch_device``: the PyTorch head of export/model.py (what the fp16 graphs are traced from) in
    ``.half()`` on that device (None: skipped); ``xp``: the array model (runtime/array_model.py) with
    float16 storage and float16 GEMMs on that array module, as ``--backend cupy --precision fp16`` runs
    (None: CuPy when it can run). Both directions, every norm and aggregation, seeded unit vectors,
    captions of 2..``length`` words. Per (head, mode, lambda): the largest |fp16 - fp32| over the norms and
    aggregations; ``passed``: all finite and within the exporter's fp16 tolerance.
    """
    from export.exporter import FP16_ATOL, FP16_RTOL
    from runtime import array_model
    from runtime.config import AGG_FUNCS, RAW_FEATURE_NORMS

    if xp is None:
        from runtime.backends.arrays import cupy_status

        if cupy_status() is None:
            import cupy as xp
    rng = np.random.default_rng(0)
    images, captions = unit_rows(rng, (n, r, d)), unit_rows(rng, (q, length, d))
    lengths = rng.integers(2, length + 1, q).astype(np.int64)
    lengths[0] = length
    captions *= (np.arange(length)[None, :] < lengths[:, None])[..., None]
    heads: dict[str, Any] = {}
    if torch_device is not None:
        torch = harness.optional_torch()
        if torch is None or (torch_device == "cuda" and not torch.cuda.is_available()):
            heads["torch"] = {"skipped": unavailable() or "no PyTorch"}
        else:
            from export.model import batched_sims, gram

            dev = torch.device(torch_device)
            ti, tc, tl = (torch.from_numpy(x).to(dev) for x in (images, captions, lengths))

            def torch_sims(cfg, half: bool):
                im, cap = (ti.half(), tc.half()) if half else (ti, tc)
                with torch.no_grad():
                    return batched_sims(im, gram(im), cap, tl, None, cfg).float().cpu().numpy()

            heads["torch"] = torch_sims
    if xp is not None:
        xi, xc, xl = (xp.asarray(x) for x in (images, captions, lengths))
        host = getattr(xp, "asnumpy", np.asarray)

        def array_sims(cfg, half: bool):
            dtype = xp.float16 if half else xp.float32
            return host(array_model.sims(xp, xi.astype(dtype), None, xc.astype(dtype), xl, cfg, dtype))

        heads["array_model"] = array_sims
    else:
        heads["array_model"] = {"skipped": "no CuPy device (and no array module given)"}
    out: dict[str, Any] = {"shape": {"N": n, "Q": q, "L": length, "R": r, "d": d}, "tolerance": FP16_ATOL}
    t0 = time.perf_counter()
    for name, run in heads.items():
        if isinstance(run, dict):
            out[name] = run
            continue
        cells, passed = {}, True
        for mode in MODES:
            for lam in FP16_LAMBDAS:
                worst = 0.0
                for norm in RAW_FEATURE_NORMS:
                    for agg in AGG_FUNCS:
                        cfg = SCANConfig(
                            vocab_size=10, embed_size=d, cross_attn=mode, raw_feature_norm=norm, agg_func=agg,
                            lambda_softmax=lam,
                        )  # fmt: skip
                        want, got = run(cfg, False), run(cfg, True)
                        ok = bool(np.isfinite(got).all()) and np.allclose(got, want, atol=FP16_ATOL, rtol=FP16_RTOL)
                        passed = passed and ok
                        worst = max(worst, float(np.abs(got - want).max()) if ok else float("inf"))
                cells[f"{mode}_{lam:g}"] = worst
        out[name] = {"max_abs_err": cells, "passed": passed}
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


RESULTS = Path(__file__).resolve().parent / "results" / "gpu"
# Full-size SCAN (the paper's Flickr30K model): the shapes every GPU figure is measured at.
FULL = dict(vocab_size=10000, img_dim=2048, embed_size=1024, word_dim=300, num_layers=1, bi_gru=True)
# --quick: the same code on tiny shapes (the CPU tests run it against a numpy stand-in for CuPy).
QUICK = dict(vocab_size=50, img_dim=64, embed_size=32, word_dim=16, num_layers=1, bi_gru=True)


def _guarded(fn) -> dict[str, Any]:
    """Run one part; an exception is recorded (type, message, traceback tail), never fatal."""
    try:
        return fn()
    except Exception as e:  # the check must finish and report whatever else it measured
        return {"failed": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}


def _free_torch() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _timed(fn, sync, repeats: int, warmup: int = 2) -> dict[str, Any]:
    times = harness.time_calls(fn, warmup, repeats, repeats, 0.0, sync)
    return {**harness.percentiles(times, (50, 10, 90, 99), unit="_s", median="median"), "n": len(times)}


def synthetic_weights(cfg, seed: int = 0):
    """Random full-size weights with PyTorch's initial scales (uniform +-1/sqrt(fan)), no torch needed."""
    from runtime.weights import ScanWeights, expected_shapes

    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in expected_shapes(cfg).items():
        if name == "text.embed":
            arrays[name] = rng.uniform(-0.1, 0.1, shape).astype(np.float32)  # the original's init_weights
        else:
            fan = cfg.img_dim if name.startswith("image.") else cfg.embed_size
            arrays[name] = rng.uniform(-1, 1, shape).astype(np.float32) / np.float32(np.sqrt(fan))
    return ScanWeights.from_arrays(cfg, arrays)


def golden_root() -> Path | None:
    repo = Path(__file__).resolve().parents[1]
    for candidate in (os.environ.get("SCAN_GOLDEN_DIR"), repo / "tests" / "golden", repo.parent / "shared" / "golden"):
        if candidate and (Path(candidate) / "README.md").is_file():
            return Path(candidate)
    return None


def cupy_parity_golden() -> dict[str, Any]:
    """CuPy fp32/fp16 and numpy fp32 against the original code's similarity matrices."""
    root = golden_root()
    if root is None:
        return {"skipped": "no golden cases (tests/golden, ../shared/golden or $SCAN_GOLDEN_DIR)"}
    try:
        from export.checkpoint import load_checkpoint, load_vocab
        from export.weights import encoder_arrays
    except ImportError as e:
        return {"skipped": f"loading the golden checkpoints needs PyTorch ({e})"}
    from runtime.backends.arrays import ArrayModel
    from runtime.captions import read_captions
    from runtime.weights import ScanWeights

    out: dict[str, Any] = {}
    for case in sorted(p for p in root.iterdir() if (p / "case.json").is_file()):
        ckpt = load_checkpoint(case / "ckpt.pth.tar")
        weights = ScanWeights.from_arrays(ckpt.config, encoder_arrays(ckpt.model))
        ids, lengths, out["tokenizer"] = _golden_ids(
            load_vocab(case / "vocab.json", ckpt.config), read_captions(case / "test_caps.txt")
        )
        regions = np.load(case / "test_ims.npy")
        expected = np.load(case / "expected_sims.npy")
        errs = {}
        for module, precision in (("numpy", "fp32"), ("cupy", "fp32"), ("cupy", "fp16")):
            m = ArrayModel(weights, module, precision)
            images, gram = m.encode_images(regions)
            sims = m.sims(images, gram, m.encode_ids(ids, lengths), lengths)
            errs[f"{module}_{precision}"] = float(np.abs(sims - expected).max())
        passed = errs["numpy_fp32"] <= 1e-5 and errs["cupy_fp32"] <= 1e-5 and errs["cupy_fp16"] <= 5e-3
        out[case.name] = {"max_abs_err_vs_original": errs, "passed": passed}
    return out


def _golden_ids(vocab, captions: list[str]) -> tuple[np.ndarray, np.ndarray, str]:
    """Token ids of the golden captions: the runtime's tokenizer, or without nltk (a GPU image may lack it)
    lower-cased whitespace splitting, which tests/golden/README.md states is the same for these captions."""
    try:
        from runtime.tokenizer import Tokenizer
    except ImportError:
        return (*whitespace_ids(vocab, captions), "whitespace split (nltk not installed)")
    return (*Tokenizer(vocab).encode_batch(captions), "runtime.tokenizer")


def whitespace_ids(vocab, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from runtime.vocab import END_ID, PAD_ID, START_ID

    rows = [[START_ID, *(vocab(w) for w in c.lower().split()), END_ID] for c in captions]
    lengths = np.array([len(r) for r in rows], np.int64)
    ids = np.full((len(rows), int(lengths.max())), PAD_ID, np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    return ids, lengths


def cupy_parity_full_size(dims: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """CuPy fp32/fp16 against numpy fp32 on a random full-size model, both modes, encoders and head."""
    from runtime.backends.arrays import ArrayModel
    from runtime.config import SCANConfig

    rng = np.random.default_rng(seed)
    regions = rng.standard_normal((48, 36, dims["img_dim"])).astype(np.float32)
    regions[:, -3:] = 0  # all-zero regions exist in real data
    # No 1-word caption: t2i normalises each region's logits over the words, which for one word is the
    # sign of the logit, so float16 rounding of a near-zero logit flips its weight from e^-9 to e^9; the
    # golden cases and the CPU tests cover 1-word captions in float32.
    lengths = np.array([14, 3, 9, 30, 5, 14, 2, 20], np.int64)
    ids = rng.integers(4, dims["vocab_size"], (len(lengths), int(lengths.max()))).astype(np.int64)
    ids[np.arange(ids.shape[1])[None, :] >= lengths[:, None]] = 0
    out = {}
    for mode, opts in MODES.items():
        weights = synthetic_weights(SCANConfig(**dims, **opts), seed)
        ref = ArrayModel(weights, "numpy")
        r_images, r_gram = ref.encode_images(regions)
        r_words = ref.encode_ids(ids, lengths)
        r_sims = ref.sims(r_images, r_gram, r_words, lengths)
        errs = {}
        for precision in ("fp32", "fp16"):
            m = ArrayModel(weights, "cupy", precision)
            images, gram = m.encode_images(regions)
            words = m.encode_ids(ids, lengths)
            errs[precision] = {
                "images": float(np.abs(images.astype(np.float32) - r_images).max()),
                "captions": float(np.abs(words.astype(np.float32) - r_words).max()),
                "sims": float(np.abs(m.sims(images, gram, words, lengths) - r_sims).max()),
                "sims_same_inputs": float(np.abs(m.sims(r_images, r_gram, r_words, lengths) - r_sims).max()),
            }
        out[mode] = {
            "max_abs_err_vs_numpy_fp32": errs,
            "passed": errs["fp32"]["sims"] <= 1e-5 and errs["fp16"]["sims"] <= 5e-3,
        }
    return out


def gemm_rates(
    cp, n: int, q: int, length: int, r: int, d: int, square: int = 8192, repeats: int = 10
) -> dict[str, Any]:
    """float16 (tensor cores, float32 accumulation) and float32 GEMM rates: the head's shape and a square one."""
    sync = cp.cuda.Device().synchronize
    out = {}
    for name, (m_, k_, n_) in {"head_shape": (q * length, d, n * r), "square": (square, square, square)}.items():
        for dtype in (cp.float16, cp.float32):
            a = cp.random.standard_normal((m_, k_), dtype=cp.float32).astype(dtype)
            b = cp.random.standard_normal((k_, n_), dtype=cp.float32).astype(dtype)
            t = _timed(functools.partial(cp.matmul, a, b), sync, repeats=repeats)
            out[f"{name}_{np.dtype(dtype).name}"] = {
                "shape": [m_, k_, n_],
                **t,
                "tflops": 2.0 * m_ * k_ * n_ / t["median_s"] / 1e12,
            }
    return out


def cupy_head_throughput(
    cp, dims: dict[str, Any], n: int, q: int = 32, length: int = 14, r: int = 36, seed: int = 0, repeats: int = 10
) -> dict[str, Any]:
    """pairs/s of ArrayModel.sims_on_device (device arrays in and out) for both modes and precisions."""
    from runtime.backends.arrays import ArrayModel
    from runtime.config import SCANConfig

    sync = cp.cuda.Device().synchronize
    d = dims["embed_size"]
    rs = cp.random.RandomState(seed)
    out: dict[str, Any] = {"shapes": {"N": n, "Q": q, "L": length, "R": r, "d": d}}
    for mode, opts in MODES.items():
        weights = synthetic_weights(SCANConfig(**dims, **opts), seed)
        for precision in ("fp32", "fp16"):
            m = ArrayModel(weights, "cupy", precision)
            images = _unit(cp, rs.standard_normal((n, r, d), dtype=cp.float32)).astype(m.storage)
            gram = cp.matmul(images, images.transpose(0, 2, 1)).astype(m.storage)
            captions = _unit(cp, rs.standard_normal((q, length, d), dtype=cp.float32)).astype(m.storage)
            lengths = cp.full((q,), length, dtype=cp.int64)
            t = _timed(functools.partial(m.sims_on_device, images, gram, captions, lengths), sync, repeats=repeats)
            out[f"{mode}_{precision}"] = {**t, "pairs_per_s": n * q / t["median_s"]}
        cp.get_default_memory_pool().free_all_blocks()
    return out


def _unit(cp, x):
    x /= cp.sqrt((x * x).sum(axis=-1, keepdims=True))
    return x


def resident_gallery(cp, model, n: int, r: int = 36, seed: int = 0, chunk: int = 8192):
    """(images (n, r, d), image_gram (n, r, r) or None): a float16 gallery generated on the GPU from a seed."""
    d = model.config.embed_size
    rs = cp.random.RandomState(seed)
    images = cp.empty((n, r, d), cp.float16)
    gram = cp.empty((n, r, r), cp.float16) if model.config.cross_attn == "t2i" else None
    for a in range(0, n, chunk):
        x = _unit(cp, rs.standard_normal((min(chunk, n - a), r, d), dtype=cp.float32)).astype(cp.float16)
        images[a : a + len(x)] = x
        if gram is not None:
            gram[a : a + len(x)] = cp.matmul(x, x.transpose(0, 2, 1))
        del x
    return images, gram


def gallery_blocks(images, gram, block: int) -> list:
    """Blocks as the head backend holds an uploaded gallery: views of the resident arrays, no copies."""
    return [
        (a, {"images": images[a : a + block], **({"image_gram": gram[a : a + block]} if gram is not None else {})})
        for a in range(0, len(images), block)
    ]


def cupy_latency(
    cp,
    dims: dict[str, Any],
    galleries: list[int],
    deadline: float,
    block_sizes: tuple[int, int],
    k: int = 10,
    length: int = 14,
    seed: int = 0,
    chunk: int = 8192,
    repeats: int = 10,
) -> dict:
    """Wall time of one search (ids -> text encoder -> every gallery block -> top-k on the host).

    ``block_sizes``: images per block for 1 and for 32 queries (bounding the (q L, block R) float32 logits).
    """
    from runtime.backends.arrays import ArrayModel
    from runtime.config import SCANConfig

    weights = synthetic_weights(SCANConfig(**dims, **MODES["t2i"]), seed)
    model = ArrayModel(weights, "cupy", "fp16")
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {
        "model": "t2i LogSumExp, float16 resident gallery",
        "k": k,
        "caption_len": length,
        "cells": [],
    }
    pool = cp.get_default_memory_pool()
    for n in galleries:
        if time.monotonic() > deadline:
            out["cells"].append({"gallery": n, "skipped": "the check's time budget is spent"})
            continue
        t0 = time.perf_counter()
        try:
            images, gram = resident_gallery(cp, model, n, seed=seed, chunk=chunk)
        except cp.cuda.memory.OutOfMemoryError as e:
            out["cells"].append({"gallery": n, "skipped": f"out of GPU memory for the gallery ({e})"})
            pool.free_all_blocks()
            continue
        cp.cuda.Device().synchronize()
        gen_s = time.perf_counter() - t0
        blocks = None
        for q in (1, 32):
            if time.monotonic() > deadline:
                out["cells"].append({"gallery": n, "queries": q, "skipped": "the check's time budget is spent"})
                continue
            ids = rng.integers(4, dims["vocab_size"], (q, length)).astype(np.int64)
            lengths = np.full(q, length, np.int64)
            block = block_sizes[0] if q == 1 else block_sizes[1]

            blocks = gallery_blocks(images, gram, block)
            search = functools.partial(_search, model, blocks, ids, lengths, k)

            _, found = search()
            try:
                reps = max(1, repeats // 2) if n >= 1000000 else repeats
                t = _timed(search, lambda: None, repeats=reps, warmup=1)
            except cp.cuda.memory.OutOfMemoryError as e:
                out["cells"].append({"gallery": n, "queries": q, "skipped": f"out of GPU memory ({e})"})
                continue
            out["cells"].append(
                {
                    "gallery": n,
                    "queries": q,
                    "block": block,
                    **t,
                    "queries_per_s": q / t["median_s"],
                    "gallery_bytes": int(images.nbytes + (gram.nbytes if gram is not None else 0)),
                    "generate_s": round(gen_s, 2),
                    "valid_ids": bool((found >= 0).all()),
                }
            )
        del images, gram, blocks
        pool.free_all_blocks()
    return out


def _search(model, blocks: list, ids: np.ndarray, lengths: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One text -> image search from token ids: upload, encode, score every block, merge the top-k."""
    from runtime.topk import RunningTopK

    lengths_dev = model.upload(lengths, np.int64, "lengths")
    words = model.text_on_device(model.upload(ids, np.int64, "ids"), lengths_dev)
    top = RunningTopK(len(ids), k)
    for s, rows in model.blocks_topk(blocks, {"captions": words, "lengths": lengths_dev}, k, axis=0):
        top.merge(s, rows)
    return top.result()


def cupy_check(n: int, galleries: list[int], deadline: float, quick: bool = False) -> dict[str, Any]:
    from runtime.backends.arrays import cupy_status

    reason = cupy_status()
    if reason is not None:
        return {"skipped": reason}
    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(0)
    out: dict[str, Any] = {
        "cupy": cp.__version__,
        "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
        "device": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
        "memory_bytes": int(props["totalGlobalMem"]),
    }
    dims = QUICK if quick else FULL
    out["dims"] = dims
    out["parity_golden"] = _guarded(cupy_parity_golden)
    out["parity_full_size"] = _guarded(lambda: cupy_parity_full_size(dims))
    reps = 2 if quick else 10
    out["gemm"] = _guarded(
        lambda: gemm_rates(cp, n, 32, 14, 36, dims["embed_size"], square=128 if quick else 8192, repeats=reps)
    )
    out["head"] = _guarded(lambda: cupy_head_throughput(cp, dims, n, repeats=reps))
    cp.get_default_memory_pool().free_all_blocks()
    # 1M images: 74 GB of float16 images + 2.6 GB of Gram matrices; blocks bound the float32 logits to ~4 GB
    block_sizes, chunk = ((7, 5), 16) if quick else ((65536, 8192), 8192)
    out["latency"] = _guarded(
        lambda: cupy_latency(cp, dims, galleries, deadline, block_sizes, chunk=chunk, repeats=reps)
    )
    cp.get_default_memory_pool().free_all_blocks()
    return out


# The H200 targets: CuPy head >= 50% of the fp16 tensor-core GEMM rate and >= 3x the batched
# PyTorch CUDA head; 1 query vs 1M images <= 30 ms, 32 queries <= 150 ms.
TARGETS = {
    "head_fraction_of_fp16_gemm": 0.5,
    "head_over_torch_cuda": 3.0,
    "latency_1m_q1_ms": 30.0,
    "latency_1m_q32_ms": 150.0,
}


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Ratios measured in this run (CuPy over PyTorch CUDA, fraction of the fp16 GEMM) against TARGETS."""
    c, t = report.get("cupy", {}), report.get("torch_cuda_baseline", {})
    head, gemm = c.get("head", {}), c.get("gemm", {})
    out: dict[str, Any] = {"targets": TARGETS}
    fp16_tflops = gemm.get("head_shape_float16", {}).get("tflops")
    d = c.get("dims", {}).get("embed_size")
    for key, v in head.items():
        if not (isinstance(v, dict) and "pairs_per_s" in v):
            continue
        mode, precision = key.split("_")
        entry: dict[str, Any] = {"pairs_per_s": v["pairs_per_s"]}
        if fp16_tflops and d:  # the logits GEMM's share of the head's work: 2 d R L flop per pair
            entry["fraction_of_fp16_gemm"] = v["pairs_per_s"] * 2.0 * d * 36 * 14 / 1e12 / fp16_tflops
        torch_key = f"{mode}_{'float32' if precision == 'fp32' else 'float16'}"
        if "pairs_per_s" in t.get(torch_key, {}) and t.get("shapes", {}).get("d") == d:
            entry["over_torch_cuda_same_precision"] = v["pairs_per_s"] / t[torch_key]["pairs_per_s"]
        out[f"head_{key}"] = entry
    for cell in c.get("latency", {}).get("cells", []):
        if "median_s" in cell:
            out[f"latency_{cell['gallery']}_q{cell['queries']}_ms"] = 1e3 * cell["median_s"]
    return out


def format_report(report: dict[str, Any]) -> str:
    """A short text summary; the JSON holds every figure."""
    lines = [
        f"GPU check {report['started']}, {report.get('wall_seconds')} s; load at end "
        f"{report.get('load_average_at_end')}"
    ]
    c = report.get("cupy", {})
    if "skipped" in c or "failed" in c:
        lines.append(f"cupy: {c.get('skipped') or c.get('failed')}")
    else:
        lines.append(f"cupy {c['cupy']} (CUDA runtime {c['cuda_runtime']}) on {c['device']}")
        for name in ("parity_golden", "parity_full_size"):
            part = c.get(name, {})
            for case, v in part.items():
                if isinstance(v, dict):
                    errs = v.get("max_abs_err_vs_original") or v.get("max_abs_err_vs_numpy_fp32")
                    lines.append(f"  {name} {case}: {json.dumps(errs)} passed={v.get('passed')}")
                else:
                    lines.append(f"  {name}: {case} {v}"[:300])
        g, h = c.get("gemm", {}), c.get("head", {})
        for key, v in g.items():
            if isinstance(v, dict):
                lines.append(f"  GEMM {key} {v['shape']}: {v['tflops']:.1f} TFLOP/s")
        ceiling = g.get("head_shape_float16", {}).get("tflops")
        for key, v in h.items():
            if key != "shapes" and isinstance(v, dict) and "pairs_per_s" in v:
                flop = 2.0 * c["dims"]["embed_size"] * 36 * 14  # the logits GEMM per pair
                frac = ""
                if ceiling:
                    frac = f", {100 * v['pairs_per_s'] * flop / 1e12 / ceiling:.0f}% of the fp16 GEMM rate"
                lines.append(f"  head {key}: {v['pairs_per_s']:,.0f} pairs/s{frac}")
        if "failed" in h:
            lines.append(f"  head: {h['failed']}")
        for cell in c.get("latency", {}).get("cells", []):
            if "skipped" in cell:
                queries = cell.get("queries", "-")
                lines.append(f"  latency {cell['gallery']:,} images, {queries} queries: {cell['skipped']}")
            else:
                lines.append(
                    f"  latency {cell['gallery']:,} images, {cell['queries']} queries: p50 "
                    f"{1e3 * cell['median_s']:.1f} ms, p90 {1e3 * cell['p90_s']:.1f} ms"
                )
        if "failed" in c.get("latency", {}):
            lines.append(f"  latency: {c['latency']['failed']}")
    t = report.get("torch_cuda_baseline", {})
    if "skipped" in t or "failed" in t:
        lines.append(f"torch CUDA baseline: {t.get('skipped') or t.get('failed')}")
    else:
        for key, v in t.items():
            if isinstance(v, dict) and "pairs_per_s" in v:
                lines.append(f"torch CUDA batched head {key}: {v['pairs_per_s']:,.0f} pairs/s")
    f16 = report.get("fp16_lambdas", {})
    for name in ("torch", "array_model"):
        v = f16.get(name, {})
        if "max_abs_err" in v:
            errs = ", ".join(f"{k} {e:.1e}" for k, e in v["max_abs_err"].items())
            lines.append(f"fp16 for every lambda, {name}: passed={v['passed']}; max |fp16 - fp32|: {errs}")
        elif v or "failed" in f16:
            lines.append(f"fp16 for every lambda, {name}: {v.get('skipped') or f16.get('failed')}")
    if "tensorrt" in report:
        lines.append(f"tensorrt: {json.dumps(report['tensorrt'])[:300]}")
    for key, v in report.get("summary", {}).items():
        if key.startswith("head_") and "over_torch_cuda_same_precision" in v:
            lines.append(
                f"{key}: {v['over_torch_cuda_same_precision']:.2f}x the PyTorch CUDA head "
                f"(target {TARGETS['head_over_torch_cuda']}x)"
            )
    return "\n".join(lines)


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
        ScanEngine.open(manifest_path, EngineOptions(backend="onnxruntime")) as ref,
        ScanEngine.open(manifest_path, EngineOptions(backend="tensorrt")) as trt,
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
        times = harness.time_calls(lambda: trt.sims(images_ref, gram_ref, words_ref, lengths), 0, 20, 20, 0.0)
        result["head_pairs_per_s_host_roundtrip"] = sims_ref.size / float(np.median(times))
    return result


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, quick="tiny shapes: a smoke run of the same code", seed=False)
    p.add_argument("--engine", help="manifest scan.json to build TensorRT engines for")
    p.add_argument("--out", default=None, help="engine output folder (default: the manifest's folder)")
    p.add_argument("--out-dir", default=str(RESULTS), help=f"where gpu_check.json/.txt go (default {RESULTS})")
    p.add_argument("--n", type=int, default=4096, help="gallery images for the head throughput cells")
    p.add_argument("--galleries", default="100000,1000000", help="image gallery sizes of the latency cells")
    p.add_argument(
        "--budget", type=float, default=200.0, help="seconds; latency cells that would start later are skipped"
    )
    args = p.parse_args(argv)
    t0 = time.monotonic()
    report: dict[str, Any] = {"started": harness.started(), "machine": harness.describe()}
    galleries = harness.ints(args.galleries, "galleries")
    report["cupy"] = _guarded(
        lambda: cupy_check(n=args.n, galleries=galleries, deadline=t0 + args.budget, quick=args.quick)
    )
    report["torch_cuda_baseline"] = _guarded(lambda: torch_cuda_baseline(n=args.n))
    report["fp16_lambdas"] = _guarded(fp16_lambda_check)
    _free_torch()
    if args.engine:
        manifest = Path(args.engine)
        report["tensorrt"] = _guarded(lambda: tensorrt_check(manifest, Path(args.out) if args.out else manifest.parent))
    report["summary"] = summarize(report)
    report["load_average_at_end"] = harness.load_average()
    report["wall_seconds"] = round(time.monotonic() - t0, 1)
    text = format_report(report)
    out_dir = Path(args.out_dir)
    atomic.write_json(out_dir / "gpu_check.json", report)
    atomic.write_bytes(out_dir / "gpu_check.txt", (text + "\n").encode("utf-8"))
    harness.finish(report, text, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
