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

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench import machine
from bench.evaluation import full_sims
from bench.head import ort_matmul_session
from bench.plan import FULL, QUICK
from bench.random_models import DEFAULT_CACHE, MODES, prepare_model
from bench.synthetic import caption_texts
from bench.timing import stats
from runtime import atomic
from runtime.engine import ScanEngine
from runtime.options import EngineOptions

logger = logging.getLogger(__name__)

SCHEMA = "scan-runtime-bench-cpu-backends/1"
BACKENDS = ("numpy", "onnxruntime")


def alternate(fns: dict[str, Callable[[], Any]], warmup: int, rounds: int, budget_s: float) -> dict[str, list[float]]:
    """Seconds per call of each function, timed in alternation: ``rounds`` rounds or until ``budget_s``.

    Each timed call follows an untimed one of the same function: ONNX Runtime's and OpenBLAS's worker
    threads keep spinning a little after a call, and on a 2-core machine that tail would otherwise be
    charged to whichever contender runs next.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for i in range(rounds):
        for name, fn in fns.items():
            fn()
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() - start > budget_s:
            break
    return samples


def bench_head(mode: str, manifest: Path, plan, rng: np.random.Generator, rounds: int, budget_s: float) -> dict:
    n, q, length, r = plan.head_images, plan.head_captions, plan.head_len, plan.regions
    with (
        ScanEngine.open(manifest, EngineOptions(backend="onnxruntime")) as ort_engine,
        ScanEngine.open(manifest, EngineOptions(backend="numpy")) as np_engine,
    ):
        images, gram = ort_engine.encode_images(rng.standard_normal((n, r, plan.img_dim), dtype=np.float32))
        lengths = np.full(q, length, np.int64)
        ids = rng.integers(4, plan.vocab_size, (q, length)).astype(np.int64)
        captions = ort_engine.encode_ids(ids, lengths)
        d = captions.shape[2]
        a = np.ascontiguousarray(images.reshape(n * r, d))
        b = np.ascontiguousarray(captions.reshape(q * length, d).T)
        c = np.empty((n * r, q * length), np.float32)
        sess = ort_matmul_session(None)
        binding = sess.io_binding()
        binding.bind_cpu_input("a", a)
        binding.bind_cpu_input("b", b)
        binding.bind_output("c", "cpu", 0, np.float32, list(c.shape), c.ctypes.data)
        fns = {
            "gemm_numpy": lambda: np.matmul(a, b, out=c),
            "gemm_onnxruntime": lambda: sess.run_with_iobinding(binding),
            "numpy": lambda: np_engine.sims(images, gram, captions, lengths),
            "onnxruntime": lambda: ort_engine.sims(images, gram, captions, lengths),
        }
        diff = float(np.abs(fns["numpy"]() - fns["onnxruntime"]()).max())
        load_before = machine.load_average()
        samples = alternate(fns, warmup=1, rounds=rounds, budget_s=budget_s)
    out: dict[str, Any] = {
        "config": {k: v for k, v in np_engine.config.to_dict().items() if k in MODES[mode]},
        "shape": {"N": n, "Q": q, "L": length, "R": r, "d": d},
        "gemm_shape": [n * r, d, q * length],
        "load_before": load_before,
        "load_after": machine.load_average(),
        "max_abs_diff_numpy_vs_onnxruntime": diff,
    }
    pairs = n * q
    for name, times in samples.items():
        s = stats(times)
        out[name] = {"seconds": s, "pairs_per_s": pairs / s["median"]}
        if name.startswith("gemm"):
            out[name]["gflops"] = 2.0 * n * r * d * q * length / s["median"] / 1e9
    ceiling = max(("gemm_numpy", "gemm_onnxruntime"), key=lambda k: out[k]["pairs_per_s"])
    out["ceiling"] = ceiling
    for name in BACKENDS:
        out[name]["fraction_of_ceiling"] = out[name]["pairs_per_s"] / out[ceiling]["pairs_per_s"]
    out["numpy_over_onnxruntime"] = out["numpy"]["pairs_per_s"] / out["onnxruntime"]["pairs_per_s"]
    return out


def bench_evaluation(manifest: Path, plan, rng: np.random.Generator, n_images: int, rounds: int) -> dict:
    regions = rng.standard_normal((n_images, plan.regions, plan.img_dim), dtype=np.float32)
    captions = caption_texts(rng, 5 * n_images, plan.vocab_size)
    results: dict[str, np.ndarray] = {}
    with (
        ScanEngine.open(manifest, EngineOptions(backend="onnxruntime")) as ort_engine,
        ScanEngine.open(manifest, EngineOptions(backend="numpy")) as np_engine,
    ):
        engines = {"numpy": np_engine, "onnxruntime": ort_engine}

        def evaluate(name: str) -> Callable[[], None]:
            def run() -> None:
                results[name] = full_sims(engines[name], regions, captions, progress=False)

            return run

        load_before = machine.load_average()
        samples = alternate({name: evaluate(name) for name in BACKENDS}, warmup=0, rounds=rounds, budget_s=0)
    out: dict[str, Any] = {
        "images": n_images,
        "captions": len(captions),
        "load_before": load_before,
        "load_after": machine.load_average(),
        "max_abs_diff_numpy_vs_onnxruntime": float(np.abs(results["numpy"] - results["onnxruntime"]).max()),
    }
    for name, times in samples.items():
        out[name] = {"seconds": stats(times)}
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
    p = argparse.ArgumentParser(prog="cpu_backends.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run with tiny dimensions")
    p.add_argument("--json", type=Path, help="write the figures to this JSON file (atomically)")
    p.add_argument("--text", type=Path, help="write the text report to this file (atomically)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per contender")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="exported models are kept here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    plan = QUICK if args.quick else FULL
    rounds = args.rounds or (3 if args.quick else 15)
    t0 = time.monotonic()
    rng = np.random.default_rng(args.seed)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "quick": args.quick,
        "seed": args.seed,
        "machine": machine.describe(),
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")},
        "load_before": machine.load_average(),
        "head": {},
    }
    manifests = {mode: prepare_model(plan, mode, args.seed, args.cache)[0] for mode in MODES}
    for mode in MODES:
        logger.info("head throughput, %s", mode)
        report["head"][mode] = bench_head(
            mode, manifests[mode], plan, rng, rounds, budget_s=10.0 if args.quick else 60.0
        )
    logger.info("whole evaluation")
    report["evaluation"] = bench_evaluation(
        manifests["t2i"], plan, rng, n_images=8 if args.quick else 100, rounds=2 if args.quick else 3
    )
    report["load_after"] = machine.load_average()
    report["wall_seconds"] = time.monotonic() - t0
    votes = [h["numpy_over_onnxruntime"] > 1 for h in report["head"].values()]
    votes.append(report["evaluation"]["numpy_over_onnxruntime_speed"] > 1)
    report["faster"] = "numpy" if sum(votes) * 2 > len(votes) else "onnxruntime"
    text = format_report(report)
    print(text)
    if args.json:
        atomic.write_json(args.json, report)
    if args.text:
        atomic.write_bytes(args.text, (text + "\n").encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
