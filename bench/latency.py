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
Large galleries are not encoded (far too slow on a CPU): they hold random unit-norm embeddings, made
into galleries by the gallery module.

Where each part lives: bench/plan.py (sizes and budgets), bench/timing.py (repeats, median and spread),
bench/synthetic.py (data), bench/random_models.py (models), bench/head.py and bench/torch_cuda.py (head
contenders), bench/latency_cells.py (query latency), bench/gallery_build.py, bench/report.py and
bench/plots.py (text and PNG); this file runs them in order and writes the JSON.

The default run fits in about ten minutes on a 2-core machine: every latency cell has a time budget,
cells whose estimated single-batch cost exceeds a cap (or the run's remaining budget, or the free
memory) are not run and are recorded as skipped with the estimate and the reason; no figure is ever
extrapolated. ``--quick`` is a seconds-long smoke run with tiny dimensions and the same JSON keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import machine
from bench.gallery_build import bench_build
from bench.head import bench_head
from bench.latency_cells import Deadline, bench_image_to_text, bench_text_to_image
from bench.plan import FULL, QUICK, SCHEMA, Plan
from bench.plots import write_plots
from bench.random_models import DEFAULT_CACHE, MODES, prepare_model
from bench.report import TARGETS, format_report, targets
from runtime import atomic
from runtime.engine import ScanEngine
from runtime.options import EngineOptions
from runtime.searcher import Searcher

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latency.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run: tiny dimensions, same JSON keys")
    p.add_argument("--json", type=Path, help="write every figure to this JSON file (atomically)")
    p.add_argument("--plots", type=Path, help="write PNG plots into this folder (needs matplotlib)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads for ONNX Runtime and PyTorch "
        "(default: all usable cores; numpy's BLAS keeps its own setting)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help=f"exported models are kept here between runs (default {DEFAULT_CACHE})",
    )
    p.add_argument(
        "--latency-model",
        choices=tuple(MODES),
        default="t2i",
        help="which model serves the query-latency cells (default t2i)",
    )
    p.add_argument(
        "--cell-cap",
        type=float,
        default=None,
        help="skip latency cells whose estimated single-batch cost exceeds this many seconds",
    )
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
    torch = machine.optional_torch()
    torch_threads = torch.get_num_threads() if torch is not None else None
    if torch is not None and args.threads:
        torch.set_num_threads(args.threads)  # same thread count as ONNX Runtime: a like-for-like comparison
    try:
        report: dict[str, Any] = {
            "schema": SCHEMA,
            "quick": bool(args.quick),
            "seed": args.seed,
            "threads": args.threads,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "_t0": t0,
            "machine": machine.describe(),
            "plan": dataclasses.asdict(plan),
            "targets_definition": TARGETS,
            "export": {},
        }
        manifests = {}
        for mode in MODES:
            manifests[mode], report["export"][mode] = prepare_model(plan, mode, args.seed, Path(args.cache))
        report["head"] = {
            "shapes": {
                "images": plan.head_images,
                "captions": plan.head_captions,
                "caption_len": plan.head_len,
                "regions": plan.regions,
                "embed_size": plan.embed_size,
                "slow_images": plan.slow_images,
                "slow_captions": plan.slow_captions,
            },
            "modes": {},
        }
        ceiling = None
        for mode in MODES:
            logger.info("head throughput, %s", mode)
            h = bench_head(mode, manifests[mode], plan, args.seed, args.threads, ceiling)
            ceiling = h.pop("gemm_ceiling")  # same shapes in both modes: measure the GEMM once
            report["head"]["gemm_ceiling"] = ceiling
            report["head"]["modes"][mode] = h
        with ScanEngine.open(manifests["t2i"], EngineOptions(backend="onnxruntime", threads=args.threads)) as engine:
            logger.info("gallery build")
            report["gallery_build"] = bench_build(engine, plan, args.seed)
        mode = args.latency_model
        rate = report["head"]["modes"][mode]["contenders"]["ort_cpu"]["pairs_per_s"]
        with ScanEngine.open(manifests[mode], EngineOptions(backend="onnxruntime", threads=args.threads)) as engine:
            searcher = Searcher(engine)
            report["latency"] = {
                "model": mode,
                "k": plan.k,
                "searcher": {
                    "image_block": searcher.image_block,
                    "caption_block": searcher.caption_block,
                    "query_batch": searcher.query_batch,
                },
                "latency_is": "wall time of one Searcher.search call on a batch of queries",
                "cell_budget_s": plan.cell_budget_s,
                "cell_cap_s": plan.cell_cap_s,
            }
            logger.info("text -> image latency")
            report["latency"]["text_to_image"] = bench_text_to_image(engine, plan, args.seed, deadline, rate)
            logger.info("image -> text latency")
            report["latency"]["image_to_text"] = bench_image_to_text(engine, plan, args.seed, deadline, rate)
        report["load_average_at_end"] = machine.load_average()
        report["memory"] = {
            "peak_rss_bytes": machine.peak_rss_bytes(),
            "bytes_per_image_float32": report["gallery_build"]["float32"]["bytes_per_image"],
            "bytes_per_image_float16": report["gallery_build"]["float16"]["bytes_per_image"],
        }
        report["targets"] = targets(report)
        return report
    finally:
        if torch is not None and args.threads:
            torch.set_num_threads(torch_threads)


if __name__ == "__main__":
    sys.exit(main())
