"""One text query against 1K cached images, full size, per cache format and backend, measured in one process.

    python bench/formats.py [--quick] [--json bench/results/formats.json] [--images 1000] [--rounds 15]

Formats: ``float32`` (the exact default), ``float16`` (exact for its values; converted to float32 per block for
a float32 head, or consumed by the fp16 graph / the fp16 array model), ``int8`` (``runtime/gallery/quantize.py``:
codes and per-region scales, dequantized per block; approximate) and ``float16`` held resident as float32 by the
backend (``SearchOptions(resident=True)``: converted once at upload, none per query). Backends: ONNX Runtime and
numpy (the array backend), each at the precision the format needs; blocks of 512 images (the default) and 64.

Every contender is a ``Searcher.search`` of one caption (k 10) against the same 1K full-size images (embed 1024,
36 regions; random unit vectors, their Grams; the bench's random-initialised t2i model), timed in alternation
(one round calls every contender once, each timed call after an untimed one), so load changes hit all alike;
the text encoder's own time is measured in the same rounds. Agreement: top-10 overlap of each contender's
results with float32 on ONNX Runtime, over ``--agreement-queries`` queries. The memory floor: the time to
read the float32 gallery once (a numpy sum), scaled by each format's bytes. Load average before and after.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench import harness
from bench.random_models import DEFAULT_CACHE, prepare_model
from bench.synthetic import FULL, QUICK, ImageStore, caption_texts, rng_for
from runtime.engine import ScanEngine
from runtime.gallery import ImageGallery
from runtime.gallery.quantize import dequantize, gram_of, quantize
from runtime.options import EngineOptions, SearchOptions
from runtime.searcher import Searcher
from runtime.two_stage import TwoStage

logger = logging.getLogger(__name__)

SCHEMA = "scan-runtime-bench-formats/1"
# name: (cache format, backend, engine precision, resident, exact)
CONTENDERS: dict[str, tuple[str, str, str, bool | None, bool]] = {
    "float32/onnxruntime": ("float32", "onnxruntime", "fp32", None, True),
    "float32/numpy": ("float32", "numpy", "fp32", None, True),
    "float16/onnxruntime": ("float16", "onnxruntime", "fp32", None, True),
    "float16/onnxruntime-fp16-graph": ("float16", "onnxruntime", "fp16", None, False),
    "float16/numpy": ("float16", "numpy", "fp32", None, True),
    "float16/numpy-fp16-storage": ("float16", "numpy", "fp16", None, False),
    "float16-resident-float32/onnxruntime": ("float16", "onnxruntime", "fp32", True, True),
    "float16-resident-float32/numpy": ("float16", "numpy", "fp32", True, True),
    "int8/onnxruntime": ("int8", "onnxruntime", "fp32", None, False),
    "int8/numpy": ("int8", "numpy", "fp32", None, False),
    # Blocks of 64 images: a converted block (9 MiB float32) may stay in the cache for the head to read.
    "float16/onnxruntime/block64": ("float16", "onnxruntime", "fp32", None, True),
    "int8/onnxruntime/block64": ("int8", "onnxruntime", "fp32", None, False),
}
BLOCKS = {"float16/onnxruntime/block64": 64, "int8/onnxruntime/block64": 64}
REFERENCE = "float32/onnxruntime"


def galleries(sizes, n: int, seed: int) -> dict[str, ImageGallery]:
    store = ImageStore(seed, sizes.regions, sizes.embed_size)
    g32 = store.gallery(n)
    codes, scales = quantize(g32.images)
    return {
        "float32": g32,
        "float16": ImageGallery.from_arrays(g32.images.astype(np.float16), g32.image_gram.astype(np.float16)),
        "int8": ImageGallery.from_arrays(codes, gram_of(dequantize(codes, scales)), image_scales=scales),
    }


def bench_rerank(
    engine: ScanEngine,
    gs: dict[str, ImageGallery],
    ids: np.ndarray,
    lengths: np.ndarray,
    m: int,
    rounds: int,
    seed: int,
) -> dict[str, Any]:
    """A two-stage rerank (``TwoStage.rescore``: one query's M candidate rows read from the cache and scored
    exactly) per format on ONNX Runtime: seconds per rerank and top-10 agreement of its result with float32's."""
    rng = rng_for(seed, 41)
    n = len(gs["float32"])
    m = min(m, n)
    cases = []
    for i in range(len(lengths)):
        words = engine.encode_ids(ids[i : i + 1, : lengths[i]], lengths[i : i + 1])
        cases.append(({"captions": words, "lengths": lengths[i : i + 1]}, np.sort(rng.choice(n, m, replace=False))))

    def rerank(fmt: str):
        def run(i: int):
            query, positions = cases[i % len(cases)]
            return TwoStage.rescore(engine, gs[fmt], "images", positions, query, SearchOptions.image_block)

        return run

    fns = {fmt: rerank(fmt) for fmt in gs}
    samples = harness.interleaved(fns, max(rounds, 3), warmup=1, settle=True)
    top = {fmt: [] for fmt in gs}
    for i in range(len(cases)):
        for fmt in gs:
            scores, found = fns[fmt](i)
            top[fmt].append(found[np.argsort(-scores, kind="stable")[:10]])
    out: dict[str, Any] = {"candidates": m, "queries": len(cases)}
    for fmt in gs:
        st = harness.stats(samples[fmt])
        out[fmt] = {
            "seconds": st,
            "p50_ms": 1e3 * st["median"],
            "vs_float32": float(np.median(samples["float32"])) / st["median"],
            "top10_agreement": harness.overlap_at(np.array(top[fmt]), np.array(top["float32"]), 10),
        }
    return out


def stored_bytes(g: ImageGallery) -> int:
    return int(g.images.nbytes + g.image_gram.nbytes)


def main(argv: Sequence[str] | None = None) -> int:
    p = harness.parser(__doc__, quick="seconds-long smoke run with tiny dimensions", cache=DEFAULT_CACHE)
    p.add_argument("--images", type=int, default=1000, help="gallery size")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (each times every contender once)")
    p.add_argument("--agreement-queries", type=int, default=20, help="queries of the agreement measurement")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--candidates", type=int, default=250, help="rows a two-stage rerank scores (the rerank cells)")
    return harness.run(_run, p.parse_args(argv))


def _run(args) -> int:
    harness.positive(args, "images", "rounds", "agreement_queries")
    sizes = QUICK if args.quick else FULL
    rounds = args.rounds or (3 if args.quick else 15)
    t0 = time.monotonic()
    manifest = prepare_model(sizes, "t2i", args.seed, args.cache)[0]
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "quick": args.quick,
        "seed": args.seed,
        "machine": harness.describe(),
        "images": args.images,
        "shape": {"R": sizes.regions, "d": sizes.embed_size},
        "load_before": harness.load_average(),
    }
    gs = galleries(sizes, args.images, args.seed)
    report["bytes"] = {fmt: stored_bytes(g) for fmt, g in gs.items()}
    rng = rng_for(args.seed, 40)
    queries = caption_texts(rng, max(args.agreement_queries, rounds + 2), sizes.vocab_size)
    engines: dict[tuple[str, str], ScanEngine] = {}
    searchers: dict[str, Searcher] = {}
    try:
        for name, (fmt, backend, precision, resident, _) in CONTENDERS.items():
            key = (backend, precision)
            if key not in engines:
                engines[key] = ScanEngine.open(
                    manifest, EngineOptions(backend=backend, precision=precision, threads=args.threads)
                )
            options = SearchOptions(resident=resident, image_block=BLOCKS.get(name, SearchOptions.image_block))
            searchers[name] = Searcher(engines[key], images=gs[fmt], options=options)
        text = engines[("onnxruntime", "fp32")]
        ids, lengths = text.tokenizer.encode_batch(queries)

        def one(name: str):
            return lambda i: searchers[name].search([queries[i % len(queries)]], 10)

        fns = {name: one(name) for name in CONTENDERS}
        fns["text_encoder"] = lambda i: text.encode_ids(ids[i : i + 1, : lengths[i]], lengths[i : i + 1])
        floor_images = np.ascontiguousarray(gs["float32"].images)
        fns["read_float32_gallery"] = lambda i: floor_images.sum()
        samples = harness.interleaved(fns, rounds, warmup=1, settle=True, budget_s=30.0 if args.quick else 240.0)
        agreement_queries = queries[: args.agreement_queries]
        results = {name: s.search(agreement_queries, 10) for name, s in searchers.items()}
        report["rerank"] = bench_rerank(text, gs, ids, lengths, args.candidates, rounds, args.seed)
    finally:
        for s in searchers.values():
            s.close()
        for e in engines.values():
            e.close()
    ref_scores, ref_ids = results[REFERENCE]
    floor = float(np.median(samples["read_float32_gallery"]))
    rows: dict[str, Any] = {}
    for name, (fmt, backend, precision, resident, exact) in CONTENDERS.items():
        s = harness.stats(samples[name])
        scores, found = results[name]
        rows[name] = {
            "format": fmt,
            "backend": backend,
            "precision": precision,
            "resident": resident,
            "exact": exact,
            "seconds": s,
            "p50_ms": 1e3 * s["median"],
            "vs_reference": float(np.median(samples[REFERENCE])) / s["median"],
            "top10_agreement": harness.overlap_at(found, ref_ids, 10),
            "max_abs_score_diff": float(np.abs(scores - ref_scores).max()),
            "memory_floor_ms": 1e3 * floor * report["bytes"][fmt] / report["bytes"]["float32"],
        }
    report["contenders"] = rows
    report["text_encoder"] = {"seconds": harness.stats(samples["text_encoder"])}
    report["read_float32_gallery"] = {
        "seconds": harness.stats(samples["read_float32_gallery"]),
        "gb_per_s": floor_images.nbytes / floor / 1e9,
    }
    report["load_after"] = harness.load_average()
    report["wall_seconds"] = time.monotonic() - t0
    harness.finish(report, format_report(report), args.json)
    return 0


def format_report(r: dict[str, Any]) -> str:
    m = r["machine"]
    enc = 1e3 * r["text_encoder"]["seconds"]["median"]
    read = r["read_float32_gallery"]
    lines = [
        f"1 text query vs {r['images']} images (R {r['shape']['R']}, d {r['shape']['d']}), k 10, per cache format; "
        f"{r['wall_seconds']:.0f} s",
        f"machine: {m.get('cpu_model')}, {m.get('cores')} cores; load before {r['load_before']}, "
        f"after {r['load_after']}",
        f"text encoder alone: p50 {enc:.1f} ms; reading the float32 gallery once: "
        f"{1e3 * read['seconds']['median']:.1f} ms ({read['gb_per_s']:.1f} GB/s)",
        f"  {'contender':40s} {'p50 ms':>8s} {'p10..p90 ms':>15s} {'x float32/ort':>13s} {'top-10 agree':>12s} "
        f"{'max |ds|':>9s} {'floor ms':>8s}  MB",
    ]
    for name, c in r["contenders"].items():
        s = c["seconds"]
        lines.append(
            f"  {name:40s} {c['p50_ms']:8.1f} {1e3 * s['p10']:7.1f}..{1e3 * s['p90']:<7.1f} {c['vs_reference']:13.2f} "
            f"{c['top10_agreement']:12.3f} {c['max_abs_score_diff']:9.1e} {c['memory_floor_ms']:8.1f}  "
            f"{r['bytes'][c['format']] / 1e6:.0f}{'' if c['exact'] else '  (approximate)'}"
        )
    rr = r["rerank"]
    lines.append(
        f"two-stage rerank on ONNX Runtime ({rr['candidates']} candidate rows of one query read and scored exactly; "
        f"agreement of its top-10 with float32's over {rr['queries']} queries):"
    )
    for fmt in ("float32", "float16", "int8"):
        c = rr[fmt]
        lines.append(
            f"  {fmt:8s} p50 {c['p50_ms']:7.1f} ms  x float32 {c['vs_float32']:5.2f}  top-10 agreement "
            f"{c['top10_agreement']:.3f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
