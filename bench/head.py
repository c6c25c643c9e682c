"""Similarity-head throughput (pairs/s) of every contender on the same encoded images and captions.

Contenders: the original per-caption loop (``slow_sims``, PyTorch CPU), the batched PyTorch head, the
exported head in ONNX Runtime on the CPU, and where present PyTorch CUDA fp32/fp16 (bench/gpu_check.py)
and ONNX Runtime CUDA. Each is given as a multiple of the original loop and as a fraction of the GEMM
ceiling: a plain float32 GEMM of the head's own shape ``(N*R, d) @ (d, Q*L)`` timed in numpy and in a
one-node ONNX Runtime graph (the faster sets the ceiling).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from bench import harness
from bench.gpu_check import torch_cuda_head
from bench.harness import skipped, stats, throughput, time_calls
from bench.synthetic import MODES, Sizes, rng_for
from runtime.backends.onnxruntime import open_session
from runtime.config import SCANConfig
from runtime.engine import ScanEngine
from runtime.install import TORCH_CPU, install_command
from runtime.options import EngineOptions

logger = logging.getLogger(__name__)

# Issue 19's target: the head's achieved FLOP/s at least this fraction of the GEMM ceiling of the same run.
TARGET_FRACTION = 0.8
CONTENDERS = ("slow_torch_cpu", "batched_torch_cpu", "ort_cpu", "torch_cuda_fp32", "torch_cuda_fp16", "ort_cuda")


def gemm_flop(m: int, k: int, n: int) -> float:
    return 2.0 * m * k * n


def head_flop_per_pair(cfg: SCANConfig, regions: int, length: int) -> float:
    """The GEMM (2 d R L) plus the weighted-context norm through the Gram matrix (docs/design.md section 7)."""
    extra = 2.0 * regions * regions * length if cfg.cross_attn == "t2i" else 2.0 * length * length * regions
    return 2.0 * cfg.embed_size * regions * length + extra


def ort_matmul_session(threads: int | None, device: str = "cpu"):
    """A one-node ONNX MatMul graph: ONNX Runtime's own GEMM, the ceiling its head could reach."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "gemm",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["M", "K"]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["K", "N"]),
        ],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["M", "N"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every ONNX Runtime >= 1.10 reads, whatever onnx wrote by default
    onnx.checker.check_model(model)
    return open_session(model.SerializeToString(), device=device, threads=threads)


def ort_gemm(a: np.ndarray, b: np.ndarray, c: np.ndarray, threads: int | None):
    """A call of ONNX Runtime's GEMM ``c = a @ b``, with IO binding and the preallocated ``c``: the
    ceiling should not pay for allocating C every call."""
    sess = ort_matmul_session(threads)
    binding = sess.io_binding()
    binding.bind_cpu_input("a", a)
    binding.bind_cpu_input("b", b)
    binding.bind_output("c", "cpu", 0, np.float32, list(c.shape), c.ctypes.data)
    return lambda: sess.run_with_iobinding(binding)


def head_inputs(engine: ScanEngine, sizes: Sizes, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """(images (N, R, d), image_gram, captions (Q, L, d), lengths, GEMM operands (N*R, d) and (d, Q*L)):
    real encoder outputs of random regions and ids, so the attention sees the values it would serve."""
    n, q, length, r = sizes.head_images, sizes.head_captions, sizes.head_len, sizes.regions
    images, image_gram = engine.encode_images(rng.standard_normal((n, r, sizes.img_dim), dtype=np.float32))
    lengths = np.full(q, length, np.int64)
    ids = rng.integers(4, sizes.vocab_size, (q, length)).astype(np.int64)
    ids[:, 0], ids[:, -1] = 1, 2  # <start> ... <end>
    captions = engine.encode_ids(ids, lengths)
    d = captions.shape[2]
    a = np.ascontiguousarray(images.reshape(n * r, d))
    return images, image_gram, captions, lengths, a, np.ascontiguousarray(captions.reshape(q * length, d).T)


def measure_gemm(a: np.ndarray, b: np.ndarray, sizes: Sizes, threads: int | None) -> dict[str, Any]:
    """Plain float32 GEMM of the head's shape in numpy and in ONNX Runtime; the faster is the ceiling."""
    m, k = a.shape
    n = b.shape[1]
    flop = gemm_flop(m, k, n)
    out: dict[str, Any] = {"shape": [m, k, n], "flop": flop}
    c = np.empty((m, n), np.float32)
    times = time_calls(lambda: np.matmul(a, b, out=c), **sizes.head_timing())
    out["numpy"] = {"status": "measured", "seconds": stats(times), "gflops": flop / float(np.median(times)) / 1e9}
    try:
        times = time_calls(ort_gemm(a, b, c, threads), **sizes.head_timing())
        out["onnxruntime"] = {
            "status": "measured",
            "seconds": stats(times),
            "gflops": flop / float(np.median(times)) / 1e9,
        }
    except Exception as e:  # no onnx package, or an ORT without IO binding: numpy alone sets the ceiling
        logger.warning("ONNX Runtime GEMM not measured: %s", e)
        out["onnxruntime"] = {"status": "skipped", "reason": f"{type(e).__name__}: {e}"}
    best = max(
        (name for name in ("numpy", "onnxruntime") if out[name]["status"] == "measured"),
        key=lambda name: out[name]["gflops"],
    )
    out["ceiling"] = {"backend": best, "gflops": out[best]["gflops"], "seconds": out[best]["seconds"]["median"]}
    return out


def bench_head(
    mode: str, manifest: Path, sizes: Sizes, seed: int, threads: int | None, cpu_ceiling: dict[str, Any] | None
) -> dict[str, Any]:
    """Pairs/s of every contender on the same encoded images and captions."""
    n, q, length, r = sizes.head_images, sizes.head_captions, sizes.head_len, sizes.regions
    rng = rng_for(seed, 1, list(MODES).index(mode))
    timing = sizes.head_timing()
    with ScanEngine.open(manifest, EngineOptions(backend="onnxruntime", precision="fp32", threads=threads)) as engine:
        cfg = engine.config
        images, image_gram, captions, lengths, a, b = head_inputs(engine, sizes, rng)
        d = captions.shape[2]
        result: dict[str, Any] = {
            "config": cfg.to_dict(),
            "flop_per_pair": head_flop_per_pair(cfg, r, length),
            "gemm_flop_per_pair": gemm_flop(r, d, length),
            "contenders": {},
        }
        if cpu_ceiling is None:
            cpu_ceiling = measure_gemm(a, b, sizes, threads)
        result["gemm_ceiling"] = cpu_ceiling
        ceiling_pairs = n * q / cpu_ceiling["ceiling"]["seconds"]
        result["ceiling_pairs_per_s"] = ceiling_pairs
        contenders: dict[str, dict[str, Any]] = result["contenders"]

        ort_sims = engine.sims(images, image_gram, captions, lengths)
        times = time_calls(lambda: engine.sims(images, image_gram, captions, lengths), **timing)
        contenders["ort_cpu"] = {**throughput(times, n * q), "shape": [n, q, length]}

        torch = harness.optional_torch()
        gram_or_none = image_gram if cfg.cross_attn == "t2i" else None  # i2t: the head makes the caption Gram
        ref = None
        if torch is None:
            for name in ("slow_torch_cpu", "batched_torch_cpu"):
                contenders[name] = skipped(f"PyTorch is not installed ({TORCH_CPU}; {install_command('export')})")
        else:
            ref = _torch_cpu(torch, contenders, (images, gram_or_none, captions, lengths), cfg, sizes, timing)
            contenders["ort_cpu"]["max_abs_diff_vs_batched"] = float(np.abs(ort_sims - ref).max())
        ceilings = result.setdefault("gpu_ceilings", {})
        for name, c in torch_cuda_head(images, gram_or_none, captions, lengths, cfg, timing, ref).items():
            if c["status"] == "measured":
                ceilings[name] = c.pop("gemm_pairs_per_s")
                ceilings[f"{name}_gemm_gflops"] = c.pop("gemm_gflops")
                c["ceiling"] = name
            contenders[name] = c
        contenders["ort_cuda"] = _ort_cuda(
            manifest,
            threads,
            (images, image_gram, captions, lengths),
            ort_sims,
            timing,
            n * q,
            [n, q, length],
            (a, b),
            result,
        )
    if not result["gpu_ceilings"]:
        del result["gpu_ceilings"]
    slow_rate = contenders["slow_torch_cpu"].get("pairs_per_s")
    for c in contenders.values():
        if c["status"] != "measured":
            continue
        c["speedup_vs_slow"] = c["pairs_per_s"] / slow_rate if slow_rate else None
        ceiling_name = c.get("ceiling", "cpu")
        ceiling = ceiling_pairs if ceiling_name == "cpu" else result.get("gpu_ceilings", {}).get(ceiling_name)
        c["ceiling"] = ceiling_name
        c["fraction_of_ceiling"] = c["pairs_per_s"] / ceiling if ceiling else None
        c["meets_target"] = c["fraction_of_ceiling"] >= TARGET_FRACTION if ceiling else None
        c["gflops"] = c["pairs_per_s"] * result["flop_per_pair"] / 1e9
    result["contenders"] = {k: contenders[k] for k in CONTENDERS}
    result["target_fraction_of_ceiling"] = TARGET_FRACTION
    return result


def _torch_cpu(
    torch, contenders: dict[str, Any], feeds: tuple, cfg: SCANConfig, sizes: Sizes, timing: dict[str, Any]
) -> np.ndarray:
    """The original loop on a slice and the batched PyTorch head on the CPU; returns the batched sims (N, Q)."""
    from export.model import batched_sims, slow_sims

    ti, tg, tc, tl = (None if x is None else torch.from_numpy(x) for x in feeds)
    n, q, length = ti.shape[0], tc.shape[0], tc.shape[1]
    sn, sq = sizes.slow_images, sizes.slow_captions
    with torch.no_grad():
        ref = batched_sims(ti, tg, tc, tl, None, cfg).numpy()
        slow = slow_sims(ti[:sn], tc[:sq], tl[:sq], cfg).numpy()
        times = time_calls(lambda: slow_sims(ti[:sn], tc[:sq], tl[:sq], cfg), **timing)
        contenders["slow_torch_cpu"] = {
            **throughput(times, sn * sq),
            "shape": [sn, sq, length],
            "max_abs_diff_vs_batched": float(np.abs(slow - ref[:sn, :sq]).max()),
        }
        times = time_calls(lambda: batched_sims(ti, tg, tc, tl, None, cfg), **timing)
        contenders["batched_torch_cpu"] = {**throughput(times, n * q), "shape": [n, q, length]}
    return ref


def _ort_cuda(
    manifest: Path,
    threads: int | None,
    feeds: tuple,
    ref: np.ndarray,
    timing: dict[str, Any],
    pairs: int,
    shape: list[int],
    gemm: tuple,
    result: dict[str, Any],
) -> dict[str, Any]:
    if "CUDAExecutionProvider" not in harness.ort_providers():
        return skipped("ONNX Runtime has no CUDAExecutionProvider (needs onnxruntime-gpu and a GPU)")
    try:
        with ScanEngine.open(
            manifest, EngineOptions(backend="onnxruntime", precision="fp32", device="cuda", threads=threads)
        ) as eng:
            got = eng.sims(*feeds)
            # Host arrays in, host array out: this includes the transfers, as the runtime serves today.
            times = time_calls(lambda: eng.sims(*feeds), **timing)
        sess = ort_matmul_session(threads, device="cuda")
        a, b = gemm
        gemm_times = time_calls(lambda: sess.run(None, {"a": a, "b": b}), **timing)
        result.setdefault("gpu_ceilings", {})["ort_cuda"] = pairs / float(np.median(gemm_times))
        return {
            **throughput(times, pairs),
            "shape": shape,
            "ceiling": "ort_cuda",
            "max_abs_diff_vs_batched": float(np.abs(got - ref).max()) if ref is not None else None,
        }
    except Exception as e:
        logger.warning("ort_cuda failed: %s", e)
        return {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
