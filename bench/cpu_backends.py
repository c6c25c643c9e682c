"""numpy (the array backend) against ONNX Runtime on the CPU, measured in one process.

    python bench/cpu_backends.py [--quick] [--json bench/results/cpu_backends.json] [--text FILE]

1. Head throughput (image-caption pairs/s) of ``ScanEngine.sims`` with ``--backend numpy`` and
   ``--backend onnxruntime`` on the same encoded inputs (both ``cross_attn`` modes, full size: embed
   1024, 36 regions, 256 images x 32 captions of 14 words), against the GEMM ceiling measured in the
   same run: a plain float32 GEMM of the head's shape in numpy and in a one-node ONNX Runtime graph.
2. A whole evaluation: ``bench.evaluation.full_sims`` (encode every image and caption of a synthetic
   split, score every pair) with each backend; the two similarity matrices are compared.

The contenders are timed in alternation (A, B, A, B, ...), so a change in the machine's load while the
benchmark runs affects them alike; ratios are the figures to read. The load average is recorded
before and after. The machine this project runs on is shared by other work: absolute figures are
lower bounds on what an idle machine does.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench import harness
from bench.evaluation import full_sims
from bench.head import head_inputs, ort_gemm
from bench.random_models import DEFAULT_CACHE, prepare_model
from bench.synthetic import FULL, MODES, QUICK, caption_texts
from runtime import atomic
from runtime.engine import ScanEngine
from runtime.options import EngineOptions

logger = logging.getLogger(__name__)

SCHEMA = "scan-runtime-bench-cpu-backends/1"
BACKENDS = ("numpy", "onnxruntime")


def bench_head(mode: str, manifest: Path, sizes, rng: np.random.Generator, rounds: int, budget_s: float) -> dict:
    n, q, length, r = sizes.head_images, sizes.head_captions, sizes.head_len, sizes.regions
    with (
        ScanEngine.open(manifest, EngineOptions(backend="onnxruntime")) as ort_engine,
        ScanEngine.open(manifest, EngineOptions(backend="numpy")) as np_engine,
    ):
        images, gram, captions, lengths, a, b = head_inputs(ort_engine, sizes, rng)
        d = captions.shape[2]
        c = np.empty((n * r, q * length), np.float32)
        gemm = ort_gemm(a, b, c, None)
        fns = {
            "gemm_numpy": lambda i: np.matmul(a, b, out=c),
            "gemm_onnxruntime": lambda i: gemm(),
            "numpy": lambda i: np_engine.sims(images, gram, captions, lengths),
            "onnxruntime": lambda i: ort_engine.sims(images, gram, captions, lengths),
        }
        diff = float(np.abs(fns["numpy"](0) - fns["onnxruntime"](0)).max())
        load_before = harness.load_average()
        samples = harness.interleaved(fns, rounds, warmup=1, settle=True, budget_s=budget_s)
    out: dict[str, Any] = {
        "config": {k: v for k, v in np_engine.config.to_dict().items() if k in MODES[mode]},
        "shape": {"N": n, "Q": q, "L": length, "R": r, "d": d},
        "gemm_shape": [n * r, d, q * length],
        "load_before": load_before,
        "load_after": harness.load_average(),
        "max_abs_diff_numpy_vs_onnxruntime": diff,
    }
    pairs = n * q
    for name, times in samples.items():
        s = harness.stats(times)
        out[name] = {"seconds": s, "pairs_per_s": pairs / s["median"]}
        if name.startswith("gemm"):
            out[name]["gflops"] = 2.0 * n * r * d * q * length / s["median"] / 1e9
    ceiling = max(("gemm_numpy", "gemm_onnxruntime"), key=lambda k: out[k]["pairs_per_s"])
    out["ceiling"] = ceiling
    for name in BACKENDS:
        out[name]["fraction_of_ceiling"] = out[name]["pairs_per_s"] / out[ceiling]["pairs_per_s"]
    out["numpy_over_onnxruntime"] = out["numpy"]["pairs_per_s"] / out["onnxruntime"]["pairs_per_s"]
    return out


def bench_evaluation(manifest: Path, sizes, rng: np.random.Generator, n_images: int, rounds: int) -> dict:
    regions = rng.standard_normal((n_images, sizes.regions, sizes.img_dim), dtype=np.float32)
    captions = caption_texts(rng, 5 * n_images, sizes.vocab_size)
    results: dict[str, np.ndarray] = {}
    with (
        ScanEngine.open(manifest, EngineOptions(backend="onnxruntime")) as ort_engine,
        ScanEngine.open(manifest, EngineOptions(backend="numpy")) as np_engine,
    ):
        engines = {"numpy": np_engine, "onnxruntime": ort_engine}

        def evaluate(name: str) -> Callable[[int], None]:
            def run(i: int) -> None:
                results[name] = full_sims(engines[name], regions, captions, progress=False)

            return run

        load_before = harness.load_average()
        samples = harness.interleaved({name: evaluate(name) for name in BACKENDS}, rounds, settle=True, budget_s=0)
    out: dict[str, Any] = {
        "images": n_images,
        "captions": len(captions),
        "load_before": load_before,
        "load_after": harness.load_average(),
        "max_abs_diff_numpy_vs_onnxruntime": float(np.abs(results["numpy"] - results["onnxruntime"]).max()),
    }
    for name, times in samples.items():
        out[name] = {"seconds": harness.stats(times)}
    out["numpy_over_onnxruntime_speed"] = out["onnxruntime"]["seconds"]["median"] / out["numpy"]["seconds"]["median"]
    return out


def format_report(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"numpy (array backend) vs ONNX Runtime, CPU; {r['wall_seconds']:.0f} s",
        f"machine: {m.get('cpu_model')}, {m.get('cores')} cores; load before {r['load_before']}, after "
        f"{r['load_after']}; OPENBLAS_NUM_THREADS={r['env'].get('OPENBLAS_NUM_THREADS')}, ONNX Runtime "
        f"threads: all cores",
        "",
    ]
    for mode, h in r["head"].items():
        s = h["shape"]
        lines.append(
            f"head {mode} (N {s['N']} x Q {s['Q']} x L {s['L']}, R {s['R']}, d {s['d']}; load "
            f"{h['load_before']} -> {h['load_after']}; max |numpy - ort| {h['max_abs_diff_numpy_vs_onnxruntime']:.1e})"
        )
        for name in ("gemm_numpy", "gemm_onnxruntime", "numpy", "onnxruntime"):
            c = h[name]
            extra = (
                f"{c['gflops']:7.1f} GFLOP/s"
                if "gflops" in c
                else f"{100 * c['fraction_of_ceiling']:5.0f}% of ceiling ({h['ceiling']})"
            )
            lines.append(
                f"  {name:18s} {c['pairs_per_s']:>10,.0f} pairs/s  median {1e3 * c['seconds']['median']:8.1f} ms"
                f"  p10..p90 {1e3 * c['seconds']['p10']:.1f}..{1e3 * c['seconds']['p90']:.1f} ms  {extra}"
            )
        lines.append(f"  numpy / onnxruntime: {h['numpy_over_onnxruntime']:.2f}x")
    e = r["evaluation"]
    lines += [
        "",
        f"whole evaluation (full_sims: encode {e['images']} images + {e['captions']} captions, score all "
        f"pairs; load {e['load_before']} -> {e['load_after']}; max |numpy - ort| "
        f"{e['max_abs_diff_numpy_vs_onnxruntime']:.1e})",
    ]
    for name in BACKENDS:
        s = e[name]["seconds"]
        lines.append(f"  {name:18s} median {s['median']:7.2f} s  (min {s['min']:.2f}, max {s['max']:.2f}, n {s['n']})")
    lines.append(f"  numpy / onnxruntime speed: {e['numpy_over_onnxruntime_speed']:.2f}x")
    lines.append(f"faster on this CPU: {r['faster']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = harness.parser(__doc__, quick="seconds-long smoke run with tiny dimensions", cache=DEFAULT_CACHE)
    p.add_argument("--text", type=Path, help="write the text report to this file (atomically)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per contender")
    return harness.run(_run, p.parse_args(argv))


def _run(args) -> int:
    harness.positive(args, "rounds")
    sizes = QUICK if args.quick else FULL
    rounds = args.rounds or (3 if args.quick else 15)
    t0 = time.monotonic()
    rng = np.random.default_rng(args.seed)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "quick": args.quick,
        "seed": args.seed,
        "machine": harness.describe(),
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")},
        "load_before": harness.load_average(),
        "head": {},
    }
    manifests = {mode: prepare_model(sizes, mode, args.seed, args.cache)[0] for mode in MODES}
    for mode in MODES:
        logger.info("head throughput, %s", mode)
        report["head"][mode] = bench_head(
            mode, manifests[mode], sizes, rng, rounds, budget_s=10.0 if args.quick else 60.0
        )
    logger.info("whole evaluation")
    report["evaluation"] = bench_evaluation(
        manifests["t2i"], sizes, rng, n_images=8 if args.quick else 100, rounds=2 if args.quick else 3
    )
    report["load_after"] = harness.load_average()
    report["wall_seconds"] = time.monotonic() - t0
    votes = [h["numpy_over_onnxruntime"] > 1 for h in report["head"].values()]
    votes.append(report["evaluation"]["numpy_over_onnxruntime_speed"] > 1)
    report["faster"] = "numpy" if sum(votes) * 2 > len(votes) else "onnxruntime"
    text = format_report(report)
    harness.finish(report, text, args.json)
    if args.text:
        atomic.write_bytes(args.text, (text + "\n").encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
