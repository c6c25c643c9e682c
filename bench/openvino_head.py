"""The t2i similarity head in bf16 with OpenVINO against ONNX Runtime fp32: one query vs 1K full-size images.

    python -m bench.openvino_head [--quick] [--json bench/results/openvino_head.json] [--images 1000] [--rounds 60]
                                  [--demo demo]

Every contender scores one encoded caption against the same 1K cached images (embed 1024, 36 regions; random
unit vectors and their Grams, as bench/formats.py) in blocks of 512 (``SearchOptions.image_block``), the
head's share of a ``Searcher.search``; timed in alternation (each timed call after an untimed one), so load
changes hit all alike:

* ``ort_fp32``: ONNX Runtime, the head graph in float32 (runtime/threads.py: intra-op = cores, no spinning);
  the exact reference.
* ``ov_bf16_gallery``: ``--backend openvino`` (runtime/backends/openvino.py): the gallery uploaded once as
  bf16 (half the bytes) into bf16 MatMuls.
* ``ov_bf16_hint``: OpenVINO's ``INFERENCE_PRECISION_HINT=bf16`` on the float32 graph and float32 gallery
  (converts the gallery to bf16 on every call).
* ``ov_fp32``: OpenVINO in float32.

And the whole per-query path in the same rounds: ``Searcher.search`` of one caption (k 10: text encoder,
head, top-k) with ``--backend onnxruntime`` and with ``--backend openvino``. Agreement: max |score - exact|
and top-10 overlap with ``ort_fp32`` (for the searches: with the onnxruntime search) over
``--agreement-queries`` captions. Load average before and after.

``--demo DIR`` (``make demo``'s folder) adds the agreement on real embeddings: the trained demo model's test
captions against its image gallery and its test images against its caption gallery, ``--backend openvino``
against ``--backend onnxruntime`` (random unit vectors have near ties everywhere; a trained model's have
other ones).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench import harness
from bench.random_models import DEFAULT_CACHE, prepare_model
from bench.synthetic import FULL, QUICK, ImageStore, caption_texts, rng_for
from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.engine import ScanEngine
from runtime.manifest import load_manifest
from runtime.options import EngineOptions, SearchOptions
from runtime.searcher import Searcher
from runtime.threads import Threads

logger = logging.getLogger(__name__)

SCHEMA = "scan-runtime-bench-openvino-head/1"
REFERENCE = "ort_fp32"
CONTENDERS = ("ort_fp32", "ov_bf16_gallery", "ov_bf16_hint", "ov_fp32")
SEARCHES = ("search_onnxruntime", "search_openvino")


def main(argv: Sequence[str] | None = None) -> int:
    p = harness.parser(__doc__, quick="seconds-long smoke run with tiny dimensions", cache=DEFAULT_CACHE)
    p.add_argument("--images", type=int, default=1000, help="gallery size")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (each times every contender once)")
    p.add_argument("--agreement-queries", type=int, default=50, help="queries of the agreement measurement")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads of both (default: all cores)")
    p.add_argument("--demo", type=Path, default=None, help="also the agreement on make demo's model and galleries")
    return harness.run(_run, p.parse_args(argv))


def demo_agreement(demo: Path, captions: int = 500, images: int = 100) -> dict[str, Any]:
    """Top-10 agreement and top-1 equality of ``--backend openvino`` with ``onnxruntime`` on the demo's test
    captions (against its image gallery) and test images (against its caption gallery)."""
    from runtime.gallery import CaptionGallery, ImageGallery
    from runtime.searcher import Searcher

    data = demo / "data" / "demo_precomp"
    try:
        texts = (data / "test_caps.txt").read_text().splitlines()[:captions]
        regions = np.load(data / "test_ims.npy")[:images]
        galleries = {"images": demo / "gallery" / "images", "captions": demo / "gallery" / "captions"}
        found = {}
        for backend in ("onnxruntime", "openvino"):
            engine = ScanEngine.open(demo / "engines" / "scan.json", EngineOptions(backend=backend))
            images, captions = ImageGallery.load(galleries["images"]), CaptionGallery.load(galleries["captions"])
            with engine, Searcher(engine, images=images, captions=captions) as s:
                found[backend] = {"text_to_image": s.search(texts, 10), "image_to_text": s.search(regions, 10)}
    except (OSError, ValueError) as e:
        raise harness.ArgumentError(f"--demo {demo}: not a make demo folder with engines and galleries ({e})") from e
    out = {}
    for direction in ("text_to_image", "image_to_text"):
        (exact_scores, exact_ids), (scores, ids) = found["onnxruntime"][direction], found["openvino"][direction]
        out[direction] = {
            "queries": len(ids),
            "top10_agreement": harness.overlap_at(ids, exact_ids, 10),
            "top1_equal": float(np.mean(ids[:, 0] == exact_ids[:, 0])),
            "max_abs_score_diff": float(np.abs(scores - exact_scores).max()),
        }
    return out


def _openvino_plain(path, precision: str, threads: int):
    """OpenVINO compiling the float32 head graph as it is, at ``precision`` (its own precision hint)."""
    import openvino as ov

    from runtime.backends.openvino import cpu_config

    request = ov.Core().compile_model(str(path), "CPU", cpu_config(threads, precision)).create_infer_request()
    return lambda feeds: {"sims": np.array(request.infer(feeds)[0])}


def _run(args) -> int:
    harness.positive(args, "images", "rounds", "agreement_queries", "threads")
    import openvino

    from runtime.backends.openvino import OpenVinoBackend

    sizes = QUICK if args.quick else FULL
    rounds = args.rounds or (3 if args.quick else 60)
    threads = args.threads or Threads.for_cores().intra_op
    t0 = time.monotonic()
    manifest_path = prepare_model(sizes, "t2i", args.seed, args.cache)[0]
    manifest = load_manifest(manifest_path)
    head_path = manifest.file(manifest.graph("head"))
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "quick": args.quick,
        "seed": args.seed,
        "machine": {**harness.describe(), "openvino": openvino.__version__},
        "images": args.images,
        "block": SearchOptions.image_block,
        "threads": threads,
        "shape": {"R": sizes.regions, "d": sizes.embed_size},
        "rounds": rounds,
        "load_before": harness.load_average(),
    }
    gallery = ImageStore(args.seed, sizes.regions, sizes.embed_size).gallery(args.images)
    block = SearchOptions.image_block
    host_blocks = [
        (a, {"images": gallery.images[a : a + block], "image_gram": gallery.image_gram[a : a + block]})
        for a in range(0, args.images, block)
    ]
    queries = caption_texts(rng_for(args.seed, 40), max(args.agreement_queries, rounds + 2), sizes.vocab_size)
    engines = {
        name: ScanEngine.open(manifest_path, EngineOptions(backend=name.split("_")[1], threads=threads))
        for name in SEARCHES
    }
    searchers = {name: Searcher(engine, images=gallery) for name, engine in engines.items()}
    engine = engines["search_onnxruntime"]
    ids, lengths = engine.tokenizer.encode_batch(queries)

    def encode(i: int) -> np.ndarray:
        j = i % len(queries)
        return engine.encode_ids(ids[j : j + 1, : lengths[j]], lengths[j : j + 1])

    captions = [encode(i) for i in range(len(queries))]
    ort = OnnxRuntimeBackend(head_path, intra_op_threads=threads)
    bf16 = OpenVinoBackend(head_path, threads=threads)
    runs = {
        "ort_fp32": (ort.run, host_blocks),
        "ov_bf16_gallery": (bf16.run, list(bf16.upload(lambda: host_blocks))),
        "ov_bf16_hint": (_openvino_plain(head_path, "bf16", threads), host_blocks),
        "ov_fp32": (_openvino_plain(head_path, "f32", threads), host_blocks),
    }

    def scores(name: str, i: int) -> np.ndarray:
        run, blocks = runs[name]
        q = {"captions": captions[i], "lengths": lengths[i : i + 1]}
        return np.concatenate([run({**feeds, **q})["sims"][:, 0] for _, feeds in blocks])

    fns = {name: (lambda i, name=name: scores(name, i % len(queries))) for name in CONTENDERS}
    for name in SEARCHES:
        fns[name] = lambda i, name=name: searchers[name].search([queries[i % len(queries)]], 10)

    fns["text_encoder"] = encode
    try:
        samples = harness.interleaved(fns, rounds, warmup=1, settle=True, budget_s=20.0 if args.quick else 200.0)
        agreement = {name: [scores(name, i) for i in range(args.agreement_queries)] for name in CONTENDERS}
        found = {name: searchers[name].search(queries[: args.agreement_queries], 10) for name in SEARCHES}
    finally:
        for closable in (bf16, ort, *searchers.values(), *engines.values()):
            closable.close()
    exact = np.array(agreement[REFERENCE])
    top_exact = np.argsort(-exact, axis=1, kind="stable")[:, :10]

    def row(name: str, reference: str, diff: float, agreement: float) -> dict[str, Any]:
        s = harness.stats(samples[name])
        return {
            "seconds": s,
            "p50_ms": 1e3 * s["median"],
            "vs_ort_fp32": float(np.median(samples[reference])) / s["median"],
            "max_abs_score_diff": diff,
            "top10_agreement": agreement,
        }

    rows: dict[str, Any] = {}
    for name in CONTENDERS:
        got = np.array(agreement[name])
        top = np.argsort(-got, axis=1, kind="stable")[:, :10]
        rows[name] = row(name, REFERENCE, float(np.abs(got - exact).max()), harness.overlap_at(top, top_exact, 10))
    exact_scores, exact_ids = found[SEARCHES[0]]  # the searches' scores compared rank by rank
    for name in SEARCHES:
        scores, ids = found[name]
        diff = float(np.abs(scores - exact_scores).max())
        rows[name] = row(name, SEARCHES[0], diff, harness.overlap_at(ids, exact_ids, 10))
    report["contenders"] = rows
    report["text_encoder"] = {"seconds": harness.stats(samples["text_encoder"])}
    report["agreement_queries"] = args.agreement_queries
    if args.demo is not None:
        report["demo_agreement"] = demo_agreement(args.demo)
    report["load_after"] = harness.load_average()
    report["wall_seconds"] = time.monotonic() - t0
    harness.finish(report, format_report(report), args.json)
    return 0


def format_report(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"t2i head, 1 query vs {r['images']} images (R {r['shape']['R']}, d {r['shape']['d']}) in blocks of "
        f"{r['block']}, {r['threads']} threads; {r['wall_seconds']:.0f} s",
        f"machine: {m.get('cpu_model')}, {m.get('cores')} cores; onnxruntime {m.get('onnxruntime')}, openvino "
        f"{m.get('openvino')}; load before {r['load_before']}, after {r['load_after']}",
        f"  {'contender':18s} {'p50 ms':>8s} {'p10..p90 ms':>15s} {'x ort_fp32':>10s} {'max |ds|':>9s} "
        f"{'top-10 agree':>12s} (over {r['agreement_queries']} queries)",
    ]
    for name, c in r["contenders"].items():
        if name == SEARCHES[0]:
            lines.append("  the whole per-query path, Searcher.search k 10 (x and agreement vs search_onnxruntime):")
        s = c["seconds"]
        lines.append(
            f"  {name:18s} {c['p50_ms']:8.1f} {1e3 * s['p10']:7.1f}..{1e3 * s['p90']:<7.1f} {c['vs_ort_fp32']:10.2f} "
            f"{c['max_abs_score_diff']:9.1e} {c['top10_agreement']:12.3f}"
        )
    lines.append(f"  text encoder alone (in the searches): p50 {1e3 * r['text_encoder']['seconds']['median']:.1f} ms")
    for direction, d in r.get("demo_agreement", {}).items():
        lines.append(
            f"  trained demo model, {direction} ({d['queries']} queries) vs onnxruntime: top-10 agreement "
            f"{d['top10_agreement']:.3f}, top-1 equal {d['top1_equal']:.3f}, max |ds| {d['max_abs_score_diff']:.1e}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
