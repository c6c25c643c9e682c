"""Throughput and latency of the SCAN runtime on synthetic full-size data, with targets to compare against.

    python bench/latency.py [--quick] [--json FILE] [--plots DIR] [--threads N] [--seed S] [--cache DIR]

Everything is measured in one process, so every figure shares the machine state:

1. Similarity-head throughput (pairs/s) for both ``cross_attn`` modes (the paper's Flickr30K settings):
   the original per-caption loop (``slow_sims``), the batched PyTorch head, the exported head in ONNX
   Runtime on the CPU, and, where present, PyTorch CUDA fp32/fp16 and ONNX Runtime CUDA. Each is given
   as a multiple of the original loop and as a fraction of the GEMM ceiling: a plain float32 GEMM of the
   head's own shape ``(N*R, d) @ (d, Q*L)`` timed in numpy and in a one-node ONNX Runtime graph.
2. Query latency end to end through ``Searcher.search`` (tokenise, encode, score, top-k): text -> image
   against image galleries and image -> text against caption galleries, for several query batch sizes.
3. Gallery build throughput (``build_image_gallery``), bytes per cached image, peak resident memory.

Models are randomly initialised at full size (embed 1024, 36 regions x 2048, word_dim 300, vocab
10000, 1-layer bi-GRU), written as original-layout checkpoints and exported once with ``export_all``
into ``--cache`` (keyed by configuration, seed and the exporter's source), so reruns skip the export.
Large galleries are not encoded (far too slow on a CPU): their cache arrays are built directly with
random unit-norm embeddings, exactly in the layout the gallery module stores.

The default run fits in about ten minutes on a 2-core machine: every latency cell has a time budget,
cells whose estimated single-batch cost exceeds a cap (or the run's remaining budget, or the free
memory) are not run and are recorded as skipped with the estimate and the reason; no figure is ever
extrapolated. ``--quick`` is a seconds-long smoke run with tiny dimensions and the same JSON keys.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import machine  # noqa: E402
from runtime import atomic  # noqa: E402
from runtime.config import SCANConfig  # noqa: E402
from runtime.engine import ScanEngine  # noqa: E402
from runtime.gallery import FORMAT as GALLERY_FORMAT  # noqa: E402
from runtime.gallery import CaptionGallery, ImageGallery, build_image_gallery  # noqa: E402
from runtime.searcher import Searcher  # noqa: E402

logger = logging.getLogger(__name__)

SCHEMA = "scan-runtime-bench-latency/1"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path("~/.cache/scan-runtime/bench").expanduser()
# Files whose change must invalidate a cached export: the graphs are built from them.
EXPORT_SOURCES = ("export/model.py", "export/graphs.py", "export/exporter.py", "runtime/manifest.py")

# The paper's Flickr30K settings (Lee et al. 2018, section 4.2): t-i LSE and i-t AVG.
MODES: dict[str, dict[str, Any]] = {
    "t2i": dict(cross_attn="t2i", agg_func="LogSumExp", lambda_softmax=9.0, lambda_lse=6.0),
    "i2t": dict(cross_attn="i2t", agg_func="Mean", lambda_softmax=4.0, lambda_lse=6.0),
}
CONTENDERS = ("slow_torch_cpu", "batched_torch_cpu", "ort_cpu", "torch_cuda_fp32", "torch_cuda_fp16", "ort_cuda")
TARGETS = {"head_speedup": 10.0, "head_fraction_of_ceiling": 0.8, "text_1k_p50_ms": 20.0, "text_50k_p50_ms": 1000.0}


@dataclass(frozen=True)
class Plan:
    """Sizes, repeats and budgets of one run (full or quick)."""

    embed_size: int
    img_dim: int
    regions: int
    word_dim: int
    vocab_size: int
    # head throughput: N images x Q captions of head_len ids; the slow loop runs on a slice
    head_images: int
    head_captions: int
    head_len: int
    slow_images: int
    slow_captions: int
    head_warmup: int
    head_min_repeats: int
    head_max_repeats: int
    head_budget_s: float
    # query latency
    image_galleries: tuple[int, ...]
    caption_galleries: tuple[int, ...]
    batches: tuple[int, ...]
    k: int
    cell_warmup: int
    cell_min_repeats: int
    cell_max_repeats: int
    cell_budget_s: float
    cell_cap_s: float
    # gallery build
    build_images: int
    # the whole run; latency cells that would overrun it are skipped
    run_budget_s: float


FULL = Plan(embed_size=1024, img_dim=2048, regions=36, word_dim=300, vocab_size=10000,
            head_images=256, head_captions=32, head_len=14, slow_images=64, slow_captions=8,
            head_warmup=2, head_min_repeats=5, head_max_repeats=60, head_budget_s=3.0,
            image_galleries=(1000, 10000, 50000), caption_galleries=(5000, 50000), batches=(1, 8, 32, 128), k=10,
            cell_warmup=1, cell_min_repeats=3, cell_max_repeats=200, cell_budget_s=5.0, cell_cap_s=10.0,
            build_images=512, run_budget_s=570.0)
QUICK = Plan(embed_size=64, img_dim=128, regions=36, word_dim=32, vocab_size=200,
             head_images=32, head_captions=8, head_len=14, slow_images=8, slow_captions=4,
             head_warmup=1, head_min_repeats=3, head_max_repeats=5, head_budget_s=0.05,
             image_galleries=(100, 200), caption_galleries=(100, 200), batches=(1, 8), k=5,
             cell_warmup=1, cell_min_repeats=3, cell_max_repeats=10, cell_budget_s=0.05, cell_cap_s=5.0,
             build_images=32, run_budget_s=120.0)


# ----------------------------------------------------------------------------------------- statistics


def stats(samples: Sequence[float]) -> dict[str, Any]:
    x = np.asarray(samples, dtype=np.float64)
    p = np.percentile(x, [10, 25, 50, 75, 90, 95, 99])
    keys = ("p10", "p25", "median", "p75", "p90", "p95", "p99")
    out: dict[str, Any] = {"n": int(x.size), **{k: float(v) for k, v in zip(keys, p)}}
    out.update(mean=float(x.mean()), min=float(x.min()), max=float(x.max()))
    return out


def time_calls(fn: Callable[[], Any], warmup: int, min_repeats: int, max_repeats: int, budget_s: float,
               sync: Callable[[], None] | None = None) -> list[float]:
    """Seconds per call after ``warmup`` calls: at least ``min_repeats``, then until ``budget_s`` or ``max_repeats``."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_repeats and (len(samples) < min_repeats or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append(time.perf_counter() - t0)
    return samples


# ----------------------------------------------------------------------------------------- synthetic data


def rng_for(seed: int, *stream: int) -> np.random.Generator:
    """Independent, reproducible streams per phase, so adding a phase does not change another's data."""
    return np.random.default_rng([seed, *stream])


def caption_words(rng: np.random.Generator, n: int) -> np.ndarray:
    """Words per caption, Flickr30K-like: ~12 words, clipped to 3..40 (ids add <start>/<end>)."""
    return np.clip(np.rint(rng.normal(12.0, 4.0, n)), 3, 40).astype(np.int64)


def vocab_json(size: int) -> dict[str, Any]:
    words = ["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(size - 4)]
    return {"word2idx": {w: i for i, w in enumerate(words)}, "idx2word": {str(i): w for i, w in enumerate(words)},
            "idx": len(words)}


def caption_texts(rng: np.random.Generator, n: int, vocab_size: int) -> list[str]:
    """Query strings of in-vocabulary words (``w17 w4051 ...``) with Flickr30K-like lengths."""
    lengths = caption_words(rng, n)
    return [" ".join(f"w{i}" for i in rng.integers(0, vocab_size - 4, int(m))) for m in lengths]


def unit_rows(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.standard_normal(shape, dtype=np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x


class VectorPool:
    """Random unit-norm vectors drawn from a fixed pool of Gaussian directions.

    Drawing 1.8G fresh normals for a 50K-image gallery takes about a minute here; gathering rows of a
    64K-vector pool is a memory copy. Every gallery row is still its own memory (a copy, not a view),
    so the search reads the same bytes as it would from a real cache; only the values repeat.
    """

    SIZE = 65536

    def __init__(self, seed: int, dim: int) -> None:
        self.vectors = unit_rows(rng_for(seed, 9), (self.SIZE, dim))

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...], out: np.ndarray | None = None) -> np.ndarray:
        idx = rng.integers(0, self.SIZE, shape)
        return np.take(self.vectors, idx, axis=0, out=out)


def gram_into(x: np.ndarray, out: np.ndarray) -> None:
    """Per-image Gram matrices (B, R, d) -> (B, R, R) into ``out``.

    numpy's stacked matmul with a transposed operand falls off BLAS (about 100x slower than a loop);
    PyTorch's bmm is the fast path when it is installed, einsum the fallback.
    """
    torch = _import_torch()
    if torch is not None:
        t = torch.from_numpy(x)
        torch.bmm(t, t.transpose(1, 2), out=torch.from_numpy(out))
    else:
        np.einsum("nrd,nsd->nrs", x, x, out=out, optimize=True)


def mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class ImageStore:
    """Random unit-norm region embeddings and their Grams, grown on demand; galleries are prefix views.

    Rows are drawn in fixed chunks with per-chunk seeds, so row i is the same whatever the final size.
    """

    CHUNK = 1024

    def __init__(self, seed: int, regions: int, dim: int) -> None:
        self.seed, self.regions, self.dim = seed, regions, dim
        self.pool: VectorPool | None = None
        self.images = np.zeros((0, regions, dim), np.float32)
        self.gram = np.zeros((0, regions, regions), np.float32)

    def bytes_for(self, n: int) -> int:
        return n * self.regions * (self.dim + self.regions) * 4

    def ensure(self, n: int) -> None:
        have = len(self.images)
        if n <= have:
            return
        if self.pool is None:
            self.pool = VectorPool(self.seed, self.dim)
        images = np.empty((n, self.regions, self.dim), np.float32)
        gram = np.empty((n, self.regions, self.regions), np.float32)
        images[:have], gram[:have] = self.images, self.gram
        self.images, self.gram = images, gram  # the old arrays are freed here, before the new rows are drawn
        for c in range(have // self.CHUNK, math.ceil(n / self.CHUNK)):
            a, b = max(c * self.CHUNK, have), min((c + 1) * self.CHUNK, n)
            rng = rng_for(self.seed, 10, c)
            idx = rng.integers(0, VectorPool.SIZE, (self.CHUNK, self.regions))[a - c * self.CHUNK:b - c * self.CHUNK]
            np.take(self.pool.vectors, idx, axis=0, out=images[a:b])
            gram_into(images[a:b], gram[a:b])

    def gallery(self, n: int) -> ImageGallery:
        self.ensure(n)
        manifest = {"format": GALLERY_FORMAT, "kind": "images", "synthetic": True, "count": n, "dtype": "float32",
                    "regions": self.regions, "embed_size": self.dim}
        return ImageGallery(Path("<synthetic>"), self.images[:n], self.gram[:n], np.arange(n, dtype=np.int64), None,
                            manifest)


def synthetic_caption_gallery(rng: np.random.Generator, n: int, dim: int,
                              pool: VectorPool | None = None) -> CaptionGallery:
    """Ragged, length-sorted caption cache laid out exactly as ``build_caption_gallery`` stores it."""
    lengths = caption_words(rng, n) + 2  # ids per caption, <start>/<end> included, as the encoder sees them
    order = np.argsort(lengths, kind="stable")  # build_caption_gallery: stored sorted by length, stable
    sorted_lengths = lengths[order]
    offsets = np.concatenate([[0], np.cumsum(sorted_lengths)]).astype(np.int64)
    total = int(offsets[-1])
    words = pool.draw(rng, (total,)) if pool is not None else unit_rows(rng, (total, dim))
    texts = [f"synthetic caption {i}" for i in range(n)]
    manifest = {"format": GALLERY_FORMAT, "kind": "captions", "synthetic": True, "count": n, "dtype": "float32",
                "embed_size": dim}
    return CaptionGallery(Path("<synthetic>"), words, offsets, sorted_lengths, order.astype(np.int64), texts, manifest)


# ----------------------------------------------------------------------------------------- models


def model_config(plan: Plan, mode: str) -> SCANConfig:
    return SCANConfig(vocab_size=plan.vocab_size, img_dim=plan.img_dim, embed_size=plan.embed_size,
                      word_dim=plan.word_dim, num_layers=1, bi_gru=True, raw_feature_norm="clipped_l2norm",
                      **MODES[mode])


def cache_key(cfg: SCANConfig, seed: int) -> str:
    digest = hashlib.sha256(json.dumps({"config": cfg.to_dict(), "seed": seed, "schema": SCHEMA},
                                       sort_keys=True).encode())
    for rel in EXPORT_SOURCES:
        p = REPO / rel
        digest.update(p.read_bytes() if p.is_file() else b"")
    return digest.hexdigest()[:16]


def prepare_model(plan: Plan, mode: str, seed: int, cache: Path) -> tuple[Path, dict[str, Any]]:
    """The manifest of a randomly initialised model for ``mode``, exported once into ``cache``."""
    cfg = model_config(plan, mode)
    model_seed = seed * 100 + list(MODES).index(mode)
    folder = cache / f"{mode}-{cfg.embed_size}-{cache_key(cfg, model_seed)}"
    manifest = folder / "scan.json"
    if manifest.is_file():
        try:
            ScanEngine.open(manifest, backend="onnxruntime").close()  # verifies every listed file's sha256
            return manifest, {"manifest": str(manifest), "cached": True, "export_seconds": 0.0}
        except Exception as e:  # a damaged cache entry is re-exported, not fatal
            logger.warning("cached export %s unusable (%s); exporting again", folder, e)
    t0 = time.perf_counter()
    logger.info("exporting a random %s model (embed %d) into %s", mode, cfg.embed_size, folder)
    _export(cfg, model_seed, folder, plan)
    return manifest, {"manifest": str(manifest), "cached": False, "export_seconds": time.perf_counter() - t0}


def _export(cfg: SCANConfig, seed: int, folder: Path, plan: Plan) -> None:
    import torch

    from export.checkpoint import load_checkpoint
    from export.exporter import export_all
    from export.model import SCAN

    torch.manual_seed(seed)
    model = SCAN(cfg)
    opt = argparse.Namespace(data_path="./data/", data_name="bench_precomp", vocab_path="./vocab/", margin=0.2,
                             max_violation=True, **cfg.to_dict())
    ckpt_path = folder / "model_best.pth.tar"
    folder.mkdir(parents=True, exist_ok=True)
    # The original layout, so the export goes through the same loader as a user's checkpoint.
    with atomic.atomic_path(ckpt_path) as tmp:
        torch.save({"epoch": 0, "model": [model.img_enc.state_dict(), model.txt_enc.state_dict()],
                    "best_rsum": 0.0, "opt": opt, "Eiters": 0}, tmp)
    ckpt = load_checkpoint(ckpt_path)
    export_all(ckpt, vocab_json(plan.vocab_size), folder, name="scan",
               progress=lambda s: logger.info("%s: %s", cfg.cross_attn, s))


# ----------------------------------------------------------------------------------------- head throughput


def gemm_flop(m: int, k: int, n: int) -> float:
    return 2.0 * m * k * n


def ort_matmul_session(threads: int | None, device: str = "cpu"):
    """A one-node ONNX MatMul graph: ONNX Runtime's own GEMM, the ceiling its head could reach."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from runtime.backends.onnxruntime import default_threads

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["M", "K"]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, ["K", "N"])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["M", "N"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every ONNX Runtime >= 1.10 reads, whatever onnx wrote by default
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=providers)


def measure_gemm(a: np.ndarray, b: np.ndarray, plan: Plan, threads: int | None) -> dict[str, Any]:
    """Plain float32 GEMM of the head's shape in numpy and in ONNX Runtime; the faster is the ceiling."""
    m, k = a.shape
    n = b.shape[1]
    flop = gemm_flop(m, k, n)
    out: dict[str, Any] = {"shape": [m, k, n], "flop": flop}
    c = np.empty((m, n), np.float32)
    times = time_calls(lambda: np.matmul(a, b, out=c), plan.head_warmup, plan.head_min_repeats,
                       plan.head_max_repeats, plan.head_budget_s)
    out["numpy"] = {"status": "measured", "seconds": stats(times), "gflops": flop / float(np.median(times)) / 1e9}
    try:
        sess = ort_matmul_session(threads)
        # IO binding with a preallocated output: the ceiling should not pay for allocating C every call.
        binding = sess.io_binding()
        binding.bind_cpu_input("a", a)
        binding.bind_cpu_input("b", b)
        binding.bind_output("c", "cpu", 0, np.float32, [m, n], c.ctypes.data)
        times = time_calls(lambda: sess.run_with_iobinding(binding), plan.head_warmup, plan.head_min_repeats,
                           plan.head_max_repeats, plan.head_budget_s)
        out["onnxruntime"] = {"status": "measured", "seconds": stats(times),
                              "gflops": flop / float(np.median(times)) / 1e9}
    except Exception as e:  # no onnx package, or an ORT without IO binding: numpy alone sets the ceiling
        logger.warning("ONNX Runtime GEMM not measured: %s", e)
        out["onnxruntime"] = {"status": "skipped", "reason": f"{type(e).__name__}: {e}"}
    best = max((name for name in ("numpy", "onnxruntime") if out[name]["status"] == "measured"),
               key=lambda name: out[name]["gflops"])
    out["ceiling"] = {"backend": best, "gflops": out[best]["gflops"], "seconds": out[best]["seconds"]["median"]}
    return out


def head_flop_per_pair(cfg: SCANConfig, regions: int, length: int) -> float:
    """The GEMM (2 d R L) plus the weighted-context norm through the Gram matrix (DESIGN.md 6)."""
    extra = 2.0 * regions * regions * length if cfg.cross_attn == "t2i" else 2.0 * length * length * regions
    return 2.0 * cfg.embed_size * regions * length + extra


def _import_torch():
    try:
        import torch

        return torch
    except ImportError:
        return None


def _contender(times: list[float], pairs: int) -> dict[str, Any]:
    s = stats(times)
    return {"status": "measured", "pairs": pairs, "seconds": s, "pairs_per_s": pairs / s["median"],
            "pairs_per_s_p10": pairs / s["p90"], "pairs_per_s_p90": pairs / s["p10"]}


def _skip(reason: str, **extra: Any) -> dict[str, Any]:
    return {"status": "skipped", "reason": reason, **extra}


def bench_head(mode: str, manifest: Path, plan: Plan, seed: int, threads: int | None,
               cpu_ceiling: dict[str, Any] | None) -> dict[str, Any]:
    """Pairs/s of every contender on the same encoded images and captions."""
    n, q, length, r = plan.head_images, plan.head_captions, plan.head_len, plan.regions
    rng = rng_for(seed, 1, list(MODES).index(mode))
    engine = ScanEngine.open(manifest, backend="onnxruntime", precision="fp32", threads=threads)
    try:
        cfg = engine.config
        # Real encoder outputs (not random vectors), so the attention sees the values it would serve.
        images, image_gram = engine.encode_images(rng.standard_normal((n, r, plan.img_dim), dtype=np.float32))
        lengths = np.full(q, length, np.int64)
        ids = rng.integers(4, plan.vocab_size, (q, length)).astype(np.int64)
        ids[:, 0], ids[:, -1] = 1, 2  # <start> ... <end>
        captions = engine.encode_ids(ids, lengths)
        d = captions.shape[2]
        a = np.ascontiguousarray(images.reshape(n * r, d))
        b = np.ascontiguousarray(captions.reshape(q * length, d).T)
        result: dict[str, Any] = {
            "config": cfg.to_dict(), "flop_per_pair": head_flop_per_pair(cfg, r, length),
            "gemm_flop_per_pair": gemm_flop(r, d, length), "contenders": {}}
        if cpu_ceiling is None:
            cpu_ceiling = measure_gemm(a, b, plan, threads)
        result["gemm_ceiling"] = cpu_ceiling
        ceiling_pairs = n * q / cpu_ceiling["ceiling"]["seconds"]
        result["ceiling_pairs_per_s"] = ceiling_pairs
        contenders: dict[str, dict[str, Any]] = result["contenders"]
        timing = dict(warmup=plan.head_warmup, min_repeats=plan.head_min_repeats, max_repeats=plan.head_max_repeats,
                      budget_s=plan.head_budget_s)

        ort_sims = engine.sims(images, image_gram, captions, lengths)
        times = time_calls(lambda: engine.sims(images, image_gram, captions, lengths), **timing)
        contenders["ort_cpu"] = {**_contender(times, n * q), "shape": [n, q, length]}

        torch = _import_torch()
        if torch is None:
            for name in ("slow_torch_cpu", "batched_torch_cpu", "torch_cuda_fp32", "torch_cuda_fp16"):
                contenders[name] = _skip("PyTorch is not installed (pip install 'scan-runtime[export]')")
        else:
            from export.model import batched_sims, slow_sims

            ti, tg, tc, tl = (torch.from_numpy(x) for x in (images, image_gram, captions, lengths))
            tg_or_none = tg if cfg.cross_attn == "t2i" else None  # i2t: the head makes the caption Gram itself
            sn, sq = plan.slow_images, plan.slow_captions
            with torch.no_grad():
                ref = batched_sims(ti, tg_or_none, tc, tl, None, cfg).numpy()
                slow = slow_sims(ti[:sn], tc[:sq], tl[:sq], cfg).numpy()
                times = time_calls(lambda: slow_sims(ti[:sn], tc[:sq], tl[:sq], cfg), **timing)
                contenders["slow_torch_cpu"] = {**_contender(times, sn * sq), "shape": [sn, sq, length],
                                                "max_abs_diff_vs_batched": float(np.abs(slow - ref[:sn, :sq]).max())}
                times = time_calls(lambda: batched_sims(ti, tg_or_none, tc, tl, None, cfg), **timing)
                contenders["batched_torch_cpu"] = {**_contender(times, n * q), "shape": [n, q, length]}
            contenders["ort_cpu"]["max_abs_diff_vs_batched"] = float(np.abs(ort_sims - ref).max())
            _cuda_contenders(torch, contenders, (ti, tg_or_none, tc, tl), cfg, ref, timing, n * q, [n, q, length],
                             (a, b), result)
        contenders["ort_cuda"] = _ort_cuda(manifest, threads, (images, image_gram, captions, lengths), ort_sims,
                                           timing, n * q, [n, q, length], (a, b), result)
    finally:
        engine.close()
    slow_rate = contenders["slow_torch_cpu"].get("pairs_per_s")
    for name, c in contenders.items():
        if c["status"] != "measured":
            continue
        c["speedup_vs_slow"] = c["pairs_per_s"] / slow_rate if slow_rate else None
        ceiling_name = c.get("ceiling", "cpu")
        ceiling = ceiling_pairs if ceiling_name == "cpu" else result.get("gpu_ceilings", {}).get(ceiling_name)
        c["ceiling"] = ceiling_name
        c["fraction_of_ceiling"] = c["pairs_per_s"] / ceiling if ceiling else None
        c["gflops"] = c["pairs_per_s"] * result["flop_per_pair"] / 1e9
    result["contenders"] = {k: contenders[k] for k in CONTENDERS}
    return result


def _cuda_contenders(torch, contenders: dict[str, Any], feeds: tuple, cfg: SCANConfig, ref: np.ndarray,
                     timing: dict[str, Any], pairs: int, shape: list[int], gemm: tuple, result: dict[str, Any]) -> None:
    if not torch.cuda.is_available():
        for name in ("torch_cuda_fp32", "torch_cuda_fp16"):
            contenders[name] = _skip("no CUDA device visible to PyTorch")
        return
    from export.model import batched_sims

    ceilings = result.setdefault("gpu_ceilings", {})
    for name, dtype in (("torch_cuda_fp32", torch.float32), ("torch_cuda_fp16", torch.float16)):
        try:
            dev = torch.device("cuda")
            ti, tg, tc, tl = (None if x is None else x.to(dev, dtype) if x.is_floating_point() else x.to(dev)
                              for x in feeds)
            a, b = (torch.from_numpy(x).to(dev, dtype) for x in gemm)
            with torch.no_grad():
                got = batched_sims(ti, tg, tc, tl, None, cfg).float().cpu().numpy()
                times = time_calls(lambda: batched_sims(ti, tg, tc, tl, None, cfg), sync=torch.cuda.synchronize,
                                   **timing)
                gemm_times = time_calls(lambda: a @ b, sync=torch.cuda.synchronize, **timing)
            ceilings[name] = pairs / float(np.median(gemm_times))
            ceilings[f"{name}_gemm_gflops"] = gemm_flop(*a.shape, b.shape[1]) / float(np.median(gemm_times)) / 1e9
            contenders[name] = {**_contender(times, pairs), "shape": shape, "ceiling": name,
                                "max_abs_diff_vs_batched": float(np.abs(got - ref).max())}
        except Exception as e:  # report a broken GPU path, keep the CPU figures
            logger.warning("%s failed: %s", name, e)
            contenders[name] = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}


def _ort_cuda(manifest: Path, threads: int | None, feeds: tuple, ref: np.ndarray, timing: dict[str, Any],
              pairs: int, shape: list[int], gemm: tuple, result: dict[str, Any]) -> dict[str, Any]:
    if "CUDAExecutionProvider" not in machine.ort_providers():
        return _skip("ONNX Runtime has no CUDAExecutionProvider (needs onnxruntime-gpu and a GPU)")
    try:
        with ScanEngine.open(manifest, backend="onnxruntime", precision="fp32", device="cuda", threads=threads) as eng:
            got = eng.sims(*feeds)
            # Host arrays in, host array out: this includes the transfers, as the runtime serves today.
            times = time_calls(lambda: eng.sims(*feeds), **timing)
        sess = ort_matmul_session(threads, device="cuda")
        a, b = gemm
        gemm_times = time_calls(lambda: sess.run(None, {"a": a, "b": b}), **timing)
        result.setdefault("gpu_ceilings", {})["ort_cuda"] = pairs / float(np.median(gemm_times))
        return {**_contender(times, pairs), "shape": shape, "ceiling": "ort_cuda",
                "max_abs_diff_vs_batched": float(np.abs(got - ref).max())}
    except Exception as e:
        logger.warning("ort_cuda failed: %s", e)
        return {"status": "failed", "reason": f"{type(e).__name__}: {e}"}


# ----------------------------------------------------------------------------------------- query latency


@dataclass
class Deadline:
    end: float

    def left(self) -> float:
        return self.end - time.monotonic()


def estimate_seconds(done: list[dict[str, Any]], gallery: int, batch: int, pairs_per_s: float) -> float:
    """Single-batch cost predicted from the nearest measured cell (cost ~ linear in gallery x batch)."""
    measured = [c for c in done if c["status"] == "measured"]
    same_batch = [c for c in measured if c["batch"] == batch and c["gallery_size"] <= gallery]
    if same_batch:
        c = max(same_batch, key=lambda c: c["gallery_size"])
        return c["p50_ms"] / 1e3 * gallery / c["gallery_size"]
    same_gallery = [c for c in measured if c["gallery_size"] == gallery and c["batch"] <= batch]
    if same_gallery:
        c = max(same_gallery, key=lambda c: c["batch"])
        return c["p50_ms"] / 1e3 * batch / c["batch"]
    return gallery * batch / pairs_per_s


def skip_reason(estimate_s: float, plan: Plan, deadline: Deadline, extra_bytes: int = 0,
                available_bytes: int | None = None) -> str | None:
    """Why a cell must not run, or None. ``estimate_s`` is one batch; a cell runs warm-up + min repeats."""
    if estimate_s > plan.cell_cap_s:
        return (f"estimated single-batch cost {estimate_s:.3g} s exceeds the per-cell cap {plan.cell_cap_s:g} s "
                f"(a cell runs {plan.cell_warmup} warm-up + at least {plan.cell_min_repeats} timed batches)")
    cost = estimate_s * (plan.cell_warmup + plan.cell_min_repeats)
    if cost > deadline.left():
        return (f"estimated cell cost {cost:.3g} s exceeds the {max(deadline.left(), 0):.0f} s left "
                f"of the run budget ({plan.run_budget_s:g} s)")
    if available_bytes is not None and extra_bytes > 0.8 * available_bytes:
        return (f"the gallery needs {extra_bytes / 2**30:.1f} GiB more memory; only "
                f"{available_bytes / 2**30:.1f} GiB available")
    return None


def _cell(direction: str, gallery: int, batch: int) -> dict[str, Any]:
    return {"direction": direction, "gallery_size": gallery, "batch": batch}


def measure_cell(search: Callable[[int], Any], batch: int, plan: Plan, deadline: Deadline) -> dict[str, Any]:
    calls = iter(range(1 << 30))
    budget = min(plan.cell_budget_s, max(deadline.left() / 4, 0.0))
    times = time_calls(lambda: search(next(calls)), plan.cell_warmup, plan.cell_min_repeats, plan.cell_max_repeats,
                       budget)
    s = stats(times)
    return {"status": "measured", "n": s["n"], "p50_ms": s["median"] * 1e3, "p95_ms": s["p95"] * 1e3,
            "p99_ms": s["p99"] * 1e3, "mean_ms": s["mean"] * 1e3, "min_ms": s["min"] * 1e3,
            "max_ms": s["max"] * 1e3, "queries_per_s": batch / s["mean"]}


def bench_text_to_image(engine: ScanEngine, plan: Plan, seed: int, deadline: Deadline,
                        pairs_per_s: float) -> list[dict[str, Any]]:
    pool = caption_texts(rng_for(seed, 2), 4 * max(plan.batches), plan.vocab_size)
    store = ImageStore(seed, plan.regions, plan.embed_size)
    cells: list[dict[str, Any]] = []
    try:
        for g in plan.image_galleries:
            for batch in plan.batches:
                cell = _cell("text_to_image", g, batch)
                est = estimate_seconds(cells, g, batch, pairs_per_s)
                # growing copies the rows drawn so far into a new array: both exist for a moment
                extra = store.bytes_for(g) if g > len(store.images) else 0
                reason = skip_reason(est, plan, deadline, extra, mem_available())
                if reason:
                    cells.append({**cell, "status": "skipped", "estimate_s": est, "reason": reason})
                    logger.info("text->image %d x %d: skipped (%s)", g, batch, reason)
                    continue
                t0 = time.perf_counter()
                gallery = store.gallery(g)
                made = time.perf_counter() - t0
                searcher = Searcher(engine, images=gallery)

                def search(i: int, batch: int = batch, searcher: Searcher = searcher) -> Any:
                    start = (i * batch) % len(pool)
                    return searcher.search([pool[(start + j) % len(pool)] for j in range(batch)], plan.k)

                result = measure_cell(search, batch, plan, deadline)
                cells.append({**cell, **result, "estimate_s": est, "gallery_seconds": made})
                logger.info("text->image %d x %d: p50 %.1f ms", g, batch, result["p50_ms"])
    finally:
        del store
    return cells


def bench_image_to_text(engine: ScanEngine, plan: Plan, seed: int, deadline: Deadline,
                        pairs_per_s: float) -> list[dict[str, Any]]:
    rng = rng_for(seed, 3)
    pool = rng.standard_normal((max(2 * max(plan.batches), 16), plan.regions, plan.img_dim), dtype=np.float32)
    cells: list[dict[str, Any]] = []
    vectors: VectorPool | None = None
    for g in plan.caption_galleries:
        gallery: CaptionGallery | None = None
        for batch in plan.batches:
            cell = _cell("image_to_text", g, batch)
            est = estimate_seconds(cells, g, batch, pairs_per_s)
            need = 0 if gallery is not None else int(g * 14 * plan.embed_size * 4)
            reason = skip_reason(est, plan, deadline, need, mem_available())
            if reason:
                cells.append({**cell, "status": "skipped", "estimate_s": est, "reason": reason})
                logger.info("image->text %d x %d: skipped (%s)", g, batch, reason)
                continue
            t0 = time.perf_counter()
            if gallery is None:
                vectors = vectors or VectorPool(seed, plan.embed_size)
                gallery = synthetic_caption_gallery(rng_for(seed, 4, g), g, plan.embed_size, vectors)
            made = time.perf_counter() - t0
            searcher = Searcher(engine, captions=gallery)

            def search(i: int, batch: int = batch, searcher: Searcher = searcher) -> Any:
                start = (i * batch) % len(pool)
                idx = (start + np.arange(batch)) % len(pool)
                return searcher.search(pool[idx], plan.k)

            result = measure_cell(search, batch, plan, deadline)
            cells.append({**cell, **result, "estimate_s": est, "gallery_seconds": made})
            logger.info("image->text %d x %d: p50 %.1f ms", g, batch, result["p50_ms"])
        del gallery  # free one caption gallery before drawing the next
    return cells


# ----------------------------------------------------------------------------------------- gallery build


def bench_build(engine: ScanEngine, plan: Plan, seed: int) -> dict[str, Any]:
    regions = rng_for(seed, 5).standard_normal((plan.build_images, plan.regions, plan.img_dim), dtype=np.float32)
    out: dict[str, Any] = {"images": plan.build_images, "regions": plan.regions, "img_dim": plan.img_dim}
    with tempfile.TemporaryDirectory(prefix="scan-bench-") as tmp:
        # Warm the image session on a small batch so the first dtype does not pay for ORT's first run.
        build_image_gallery(engine, regions[:4], Path(tmp) / "warm", progress=False)
        for dtype in ("float32", "float16"):
            folder = Path(tmp) / dtype
            t0 = time.perf_counter()
            g = build_image_gallery(engine, regions, folder, dtype=dtype, progress=False)
            seconds = time.perf_counter() - t0
            disk = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
            out[dtype] = {"seconds": seconds, "images_per_s": plan.build_images / seconds,
                          "bytes_per_image": float(g.nbytes_per_item()), "disk_bytes_per_image": disk / len(g)}
            del g
    return out


# ----------------------------------------------------------------------------------------- report


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Measured vs target, for reading; nothing here fails a run."""
    rows = []
    for mode, h in report["head"]["modes"].items():
        c = h["contenders"]["ort_cpu"]
        rows.append({"name": f"head_speedup_vs_slow_{mode}", "op": ">=", "target": TARGETS["head_speedup"],
                     "what": f"ONNX Runtime CPU head vs the original loop ({mode})",
                     "measured": c.get("speedup_vs_slow"), "unit": "x"})
        rows.append({"name": f"head_fraction_of_ceiling_{mode}", "op": ">=", "target": TARGETS["head_fraction_of_ceiling"],
                     "what": f"ONNX Runtime CPU head vs GEMM ceiling ({mode})",
                     "measured": c.get("fraction_of_ceiling"), "unit": "fraction"})
    cells = {(c["gallery_size"], c["batch"]): c for c in report["latency"]["text_to_image"]}
    for size, key, label in ((1000, "text_1k_p50_ms", "1K"), (50000, "text_50k_p50_ms", "50K")):
        c = cells.get((size, 1))
        row = {"name": f"text_query_{label.lower()}_p50_ms", "what": f"one text query vs {label} images, p50",
               "op": "<=", "target": TARGETS[key], "unit": "ms", "measured": None}
        if c is None:
            row["note"] = f"no {label}-image gallery in this run" + (" (--quick)" if report["quick"] else "")
        elif c["status"] != "measured":
            row["note"] = f"skipped: {c['reason']}"
        else:
            row["measured"] = c["p50_ms"]
        rows.append(row)
    for row in rows:
        m = row["measured"]
        row["met"] = None if m is None else (m >= row["target"] if row["op"] == ">=" else m <= row["target"])
    return rows


def _fmt(x: Any, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def format_report(report: dict[str, Any]) -> str:
    lines = [f"SCAN runtime benchmark{' (--quick)' if report['quick'] else ''}: seed {report['seed']}, "
             f"threads {report['threads'] or 'all'}, {report['wall_seconds']:.0f} s",
             "machine: " + machine.summary_line(report["machine"]),
             f"sizes: embed {report['plan']['embed_size']}, {report['plan']['regions']} regions x "
             f"{report['plan']['img_dim']}, word_dim {report['plan']['word_dim']}, "
             f"vocab {report['plan']['vocab_size']}"]
    for mode, ex in report["export"].items():
        how = "cached" if ex["cached"] else f"exported in {ex['export_seconds']:.0f} s"
        lines.append(f"model {mode}: {how} ({ex['manifest']})")
    for mode, h in report["head"]["modes"].items():
        g = report["head"]["gemm_ceiling"]
        m, k, n = g["shape"]
        gem = ", ".join(f"{b} {g[b]['gflops']:.1f} GFLOP/s" for b in ("numpy", "onnxruntime")
                        if g[b]["status"] == "measured")
        lines += ["", f"head {mode} ({h['config']['agg_func']}, lambda_softmax {h['config']['lambda_softmax']:g}): "
                  f"GEMM ({m} x {k}) @ ({k} x {n}): {gem}; ceiling {h['ceiling_pairs_per_s']:,.0f} pairs/s",
                  f"  {'contender':<18} {'pairs/s':>12} {'p10..p90':>21} {'x slow':>8} {'of ceiling':>10} "
                  f"{'GFLOP/s':>8}  shape N x Q x L"]
        for name, c in h["contenders"].items():
            if c["status"] != "measured":
                lines.append(f"  {name:<18} {c['status']}: {c['reason']}")
                continue
            frac = c.get("fraction_of_ceiling")
            lines.append(f"  {name:<18} {c['pairs_per_s']:>12,.0f} "
                         f"{c['pairs_per_s_p10']:>10,.0f}..{c['pairs_per_s_p90']:<10,.0f}"
                         f" {_fmt(c.get('speedup_vs_slow'), '.1f'):>8} {'-' if frac is None else f'{frac:.0%}':>10} "
                         f"{c['gflops']:>8.1f}  {' x '.join(map(str, c['shape']))}")
    lat = report["latency"]
    lines += ["", f"query latency ({lat['model']} model, k={lat['k']}, image_block {lat['searcher']['image_block']}, "
              f"caption_block {lat['searcher']['caption_block']}, query_batch {lat['searcher']['query_batch']})",
              f"  {'direction':<14} {'gallery':>8} {'batch':>5} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} "
              f"{'queries/s':>10} {'n':>4}"]
    for c in lat["text_to_image"] + lat["image_to_text"]:
        head = f"  {c['direction']:<14} {c['gallery_size']:>8,} {c['batch']:>5}"
        if c["status"] != "measured":
            lines.append(f"{head}   skipped: {c['reason']}")
        else:
            lines.append(f"{head} {c['p50_ms']:>9.1f} {c['p95_ms']:>9.1f} {c['p99_ms']:>9.1f} "
                         f"{c['queries_per_s']:>10.1f} {c['n']:>4}")
    b = report["gallery_build"]
    lines += ["", f"gallery build ({b['images']} images through build_image_gallery): "
              + "; ".join(f"{dt} {b[dt]['images_per_s']:,.0f} images/s, "
                          f"{b[dt]['bytes_per_image'] / 1024:,.1f} KiB/image"
                          for dt in ("float32", "float16")),
              f"peak resident memory: {report['memory']['peak_rss_bytes'] / 2**20:,.0f} MiB", "",
              "targets (measured vs target; informational):"]
    for t in report["targets"]:
        met = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        spec = ".1%" if t["unit"] == "fraction" else ".1f"
        lines.append(f"  {t['what']:<52} {t['op']} {format(t['target'], spec):>8}: measured "
                     f"{_fmt(t['measured'], spec):>8}  {met}{'  (' + t['note'] + ')' if t.get('note') else ''}")
    return "\n".join(lines)


def write_plots(report: dict[str, Any], folder: Path) -> dict[str, Any]:
    """PNG plots; returns {"status", "files"} or why none were drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers and CI
        import matplotlib.pyplot as plt
    except ImportError:
        return {"status": "skipped", "reason": "matplotlib is not installed (pip install 'scan-runtime[bench]')",
                "files": []}
    folder.mkdir(parents=True, exist_ok=True)
    lat = report["latency"]
    files = []
    directions = (("text_to_image", "text -> image"), ("image_to_text", "image -> text"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (key, title) in zip(axes, directions):
        for batch in report["plan"]["batches"]:
            pts = sorted((c["gallery_size"], c["p50_ms"]) for c in lat[key]
                         if c["batch"] == batch and c["status"] == "measured")
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"batch {batch}")
        ax.set(xscale="log", yscale="log", xlabel="gallery size", ylabel="p50 latency per batch (ms)", title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"SCAN query latency ({lat['model']}), {report['machine']['cpu_model']}", fontsize=9)
    fig.tight_layout()
    files.append(_save(fig, folder / "latency_vs_gallery.png", plt))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (key, title) in zip(axes, directions):
        for size in sorted({c["gallery_size"] for c in lat[key]}):
            pts = sorted((c["batch"], c["queries_per_s"]) for c in lat[key]
                         if c["gallery_size"] == size and c["status"] == "measured")
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"gallery {size:,}")
        ax.set(xscale="log", yscale="log", xlabel="query batch size", ylabel="queries/s", title=title)
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    files.append(_save(fig, folder / "throughput_vs_batch.png", plt))

    fig, ax = plt.subplots(figsize=(8, 4.2))
    modes = list(report["head"]["modes"])
    width = 0.8 / len(CONTENDERS)
    for i, name in enumerate(CONTENDERS):
        vals = [report["head"]["modes"][m].get("contenders", {}).get(name, {}).get("pairs_per_s") or 0 for m in modes]
        ax.bar(np.arange(len(modes)) + i * width, vals, width, label=name)
    for j, m in enumerate(modes):
        ceiling = report["head"]["modes"][m].get("ceiling_pairs_per_s")
        if ceiling:
            ax.hlines(ceiling, j - width / 2, j + 0.8, colors="k", linestyles="--",
                      label="CPU GEMM ceiling" if j == 0 else None)
    ax.set_xticks(np.arange(len(modes)) + 0.4 - width / 2, modes)
    ax.set(yscale="log", ylabel="pairs/s", title="similarity head throughput")
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(_save(fig, folder / "head_throughput.png", plt))
    return {"status": "written", "files": files}


def _save(fig, path: Path, plt) -> str:
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return str(path)


# ----------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latency.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run: tiny dimensions, same JSON keys")
    p.add_argument("--json", type=Path, help="write every figure to this JSON file (atomically)")
    p.add_argument("--plots", type=Path, help="write PNG plots into this folder (needs matplotlib)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for ONNX Runtime and PyTorch "
                   "(default: all usable cores; numpy's BLAS keeps its own setting)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                   help=f"exported models are kept here between runs (default {DEFAULT_CACHE})")
    p.add_argument("--latency-model", choices=tuple(MODES), default="t2i",
                   help="which model serves the query-latency cells (default t2i)")
    p.add_argument("--cell-cap", type=float, default=None,
                   help="skip latency cells whose estimated single-batch cost exceeds this many seconds")
    p.add_argument("--budget", type=float, default=None, help="the run's time budget in seconds")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None and args.threads < 1:
        print("error: --threads must be a positive integer", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    plan = QUICK if args.quick else FULL
    overrides = {k: v for k, v in (("cell_cap_s", args.cell_cap), ("run_budget_s", args.budget)) if v is not None}
    plan = dataclasses.replace(plan, **overrides)
    report = run(plan, args)
    if args.plots:
        report["plots"] = write_plots(report, args.plots)
        if report["plots"]["status"] != "written":
            print(f"plots: {report['plots']['reason']}", file=sys.stderr)
    else:
        report["plots"] = {"status": "not requested", "files": []}
    report["memory"]["peak_rss_bytes"] = machine.peak_rss_bytes()
    report["wall_seconds"] = time.monotonic() - report.pop("_t0")
    print(format_report(report))
    if args.json:
        atomic.write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


def run(plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    deadline = Deadline(t0 + plan.run_budget_s)
    torch = _import_torch()
    torch_threads = torch.get_num_threads() if torch is not None else None
    if torch is not None and args.threads:
        torch.set_num_threads(args.threads)  # same thread count as ONNX Runtime: a like-for-like comparison
    try:
        report: dict[str, Any] = {
            "schema": SCHEMA, "quick": bool(args.quick), "seed": args.seed, "threads": args.threads,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "_t0": t0, "machine": machine.describe(),
            "plan": dataclasses.asdict(plan), "targets_definition": TARGETS, "export": {}}
        manifests = {}
        for mode in MODES:
            manifests[mode], report["export"][mode] = prepare_model(plan, mode, args.seed, Path(args.cache))
        report["head"] = {"shapes": {"images": plan.head_images, "captions": plan.head_captions,
                                     "caption_len": plan.head_len, "regions": plan.regions,
                                     "embed_size": plan.embed_size, "slow_images": plan.slow_images,
                                     "slow_captions": plan.slow_captions}, "modes": {}}
        ceiling = None
        for mode in MODES:
            logger.info("head throughput, %s", mode)
            h = bench_head(mode, manifests[mode], plan, args.seed, args.threads, ceiling)
            ceiling = h.pop("gemm_ceiling")  # same shapes in both modes: measure the GEMM once
            report["head"]["gemm_ceiling"] = ceiling
            report["head"]["modes"][mode] = h
        with ScanEngine.open(manifests["t2i"], backend="onnxruntime", threads=args.threads) as engine:
            logger.info("gallery build")
            report["gallery_build"] = bench_build(engine, plan, args.seed)
        mode = args.latency_model
        rate = report["head"]["modes"][mode]["contenders"]["ort_cpu"]["pairs_per_s"]
        with ScanEngine.open(manifests[mode], backend="onnxruntime", threads=args.threads) as engine:
            searcher = Searcher(engine)
            report["latency"] = {
                "model": mode, "k": plan.k, "searcher": {"image_block": searcher.image_block,
                                                         "caption_block": searcher.caption_block,
                                                         "query_batch": searcher.query_batch},
                "latency_is": "wall time of one Searcher.search call on a batch of queries",
                "cell_budget_s": plan.cell_budget_s, "cell_cap_s": plan.cell_cap_s}
            logger.info("text -> image latency")
            report["latency"]["text_to_image"] = bench_text_to_image(engine, plan, args.seed, deadline, rate)
            logger.info("image -> text latency")
            report["latency"]["image_to_text"] = bench_image_to_text(engine, plan, args.seed, deadline, rate)
        report["load_average_at_end"] = machine.load_average()
        report["memory"] = {"peak_rss_bytes": machine.peak_rss_bytes(),
                            "bytes_per_image_float32": report["gallery_build"]["float32"]["bytes_per_image"],
                            "bytes_per_image_float16": report["gallery_build"]["float16"]["bytes_per_image"]}
        report["targets"] = targets(report)
        return report
    finally:
        if torch is not None and args.threads:
            torch.set_num_threads(torch_threads)


if __name__ == "__main__":
    sys.exit(main())
