"""The PyTorch CUDA baseline: the exact batched head of ``export/model.py`` on a GPU, in float32 and float16.

The one GPU baseline of the project: ``bench/latency.py`` reports it beside the CPU contenders and
``bench/gpu_check.py`` runs it on full-size shapes. Each dtype also times a plain GEMM of the head's shape
``(N*R, d) @ (d, Q*L)`` on the same device: the ceiling the head is measured against.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from bench.machine import optional_torch
from bench.timing import skipped, throughput, time_calls
from runtime.config import SCANConfig

logger = logging.getLogger(__name__)

DTYPES = {"torch_cuda_fp32": "float32", "torch_cuda_fp16": "float16"}


def unavailable() -> str | None:
    """Why the baseline cannot run here (no PyTorch, no CUDA device), or None."""
    torch = optional_torch()
    if torch is None:
        return "PyTorch is not installed (pip install 'scan-runtime[export]')"
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
        return {name: skipped(reason) for name in DTYPES}
    torch = optional_torch()
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
        times = time_calls(lambda: batched_sims(ti, tg, tc, tl, None, cfg), sync=torch.cuda.synchronize, **timing)
        gemm_times = time_calls(lambda: a @ b, sync=torch.cuda.synchronize, **timing)
    gemm_s = float(np.median(gemm_times))
    out = {
        **throughput(times, pairs),
        "shape": [n, q, length],
        "gemm_pairs_per_s": pairs / gemm_s,
        "gemm_gflops": 2.0 * n * r * d * q * length / gemm_s / 1e9,
    }
    if ref is not None:
        out["max_abs_diff_vs_batched"] = float(np.abs(got - ref).max())
    return out
