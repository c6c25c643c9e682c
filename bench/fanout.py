"""What sharding costs and buys per request: one ``Searcher`` in process against a sharded one
(``runtime.cluster.open_shards``) on Ray with S = 1 (pure fan-out/merge overhead) and S = 2, 3, ... shards
of the same gallery.

    python bench/fanout.py --engine ~/.cache/scan-runtime/bench/t2i-1024-*/scan.json \\
        --images 1000 --captions 5000 --shards 1 2 --json bench/results/fanout.json --plot bench/results/fanout.png

The gallery is built with the engine (random region features, random in-vocabulary captions) and split
with runtime/shards.py. Every contender answers the same queries, interleaved request by request (so
background load hits all of them alike); answers are checked to be identical (ids; scores within
1e-5). The overhead of S = 1 over the in-process searcher is reported both as the difference of the
medians and as the median of the per-request paired differences. The load average is printed beside
every absolute figure: on a shared 2-core machine they are noisy, the paired differences less so.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import harness
from bench.synthetic import caption_texts
from runtime.engine import ScanEngine
from runtime.gallery import CaptionGallery, ImageGallery, build_caption_gallery, build_image_gallery
from runtime.gallery.shards import split
from runtime.options import EngineOptions, WriteOptions
from runtime.searcher import Searcher

logger = logging.getLogger(__name__)


def percentiles(ms: list[float]) -> dict[str, float]:
    return harness.percentiles(ms, (5, 25, 50, 75, 95), ndigits=3)


def build_gallery(engine: ScanEngine, folder: Path, n_images: int, n_captions: int, regions: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    cfg = engine.config
    if not (folder / "images" / "gallery.json").is_file():
        feats = rng.standard_normal((n_images, regions, cfg.img_dim), dtype=np.float32)
        names = [f"img{i}" for i in range(n_images)]
        build_image_gallery(engine, feats, folder / "images", names, WriteOptions(progress=False))
    if not (folder / "captions" / "gallery.json").is_file():
        texts = random_texts(engine, rng, n_captions)
        build_caption_gallery(engine, texts, folder / "captions", WriteOptions(progress=False))


def random_texts(engine: ScanEngine, rng: np.random.Generator, n: int) -> list[str]:
    return caption_texts(rng, n, [w for w in engine.tokenizer.vocab.idx2word if not w.startswith("<")])


def run(args: argparse.Namespace) -> dict[str, Any]:
    from runtime.cluster import connect, open_shards

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fanout-"))
    gallery = work / "gallery"
    rng = np.random.default_rng(args.seed + 1)
    with ScanEngine.open(args.engine, EngineOptions(backend="onnxruntime", threads=args.threads)) as engine:
        t0 = time.perf_counter()
        build_gallery(engine, gallery, args.images, args.captions, args.regions, args.seed)
        logger.info("gallery ready in %.1f s", time.perf_counter() - t0)
        text_queries = random_texts(engine, rng, args.requests * args.batch)
        image_queries = rng.standard_normal(
            (args.requests * args.batch, args.regions, engine.config.img_dim), dtype=np.float32
        )
        local = Searcher(
            engine, images=ImageGallery.load(gallery / "images"), captions=CaptionGallery.load(gallery / "captions")
        )
        connect(num_cpus=args.ray_cpus)
        contenders: dict[str, Any] = {"local": local}
        settings: dict[str, Any] = {"local": {"threads": args.threads}}
        try:
            for s in args.shards:
                folder = work / f"shards-{s}"
                if not (folder / "shards.json").is_file():
                    split(gallery, folder, s)
                threads = args.shard_threads
                options = EngineOptions(backend="onnxruntime", threads=threads)
                contenders[f"S={s}"] = open_shards(args.engine, folder, options, timeout_s=120.0)
                settings[f"S={s}"] = {"shards": s, "threads_per_shard": threads}
            given = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
            report = {
                "settings": {**given, "contenders": settings},
                "machine": harness.describe(),
                "load_average_before": harness.load_average(),
            }
            for direction, queries in (("text", text_queries), ("images", image_queries)):
                report[direction] = measure(contenders, queries, args)
            report["load_average_after"] = harness.load_average()
        finally:
            for name, c in contenders.items():
                if name != "local":
                    c.close()
    return report


def measure(contenders: dict[str, Any], queries: Any, args: argparse.Namespace) -> dict[str, Any]:
    names = list(contenders)
    mismatches = 0

    def check(i: int, answers: dict[str, Any]) -> None:
        nonlocal mismatches
        ref_scores, ref_ids = answers["local"]
        for name, (scores, ids) in answers.items():
            if not (np.array_equal(ids, ref_ids) and np.allclose(scores, ref_scores, atol=1e-5, rtol=0)):
                mismatches += 1
                logger.warning("request %d: %s answered differently from the local searcher", i, name)

    # The warm-up's first calls allocate and page the gallery in; rotating who goes first spreads the
    # cost of running after another contender evenly.
    seconds = harness.interleaved(
        {
            n: lambda i, c=c: c.search(queries[i * args.batch : (i + 1) * args.batch], args.k)
            for n, c in contenders.items()
        },
        args.requests,
        warmup=args.warmup,
        rotate=True,
        check=check,
    )
    times = {n: [1e3 * t for t in ts] for n, ts in seconds.items()}
    # The transport alone: ask every shard for its info (no search).
    shards = {n: lambda i, c=c: c.shards.info() for n, c in contenders.items() if n != "local"}
    rtt = {n: [1e3 * t for t in ts] for n, ts in harness.interleaved(shards, args.requests).items()}
    out: dict[str, Any] = {
        "mismatches": mismatches,
        "load_average": harness.load_average(),
        "info_round_trip_ms": {n: percentiles(v) for n, v in rtt.items()},
        "latency_ms": {n: percentiles(times[n]) for n in names},
        "samples_ms": times,
    }
    base = np.asarray(times["local"])
    out["vs_local"] = {
        n: {
            "p50_difference_ms": round(float(np.median(times[n]) - np.median(base)), 3),
            "median_paired_difference_ms": round(float(np.median(np.asarray(times[n]) - base)), 3),
            "p50_ratio": round(float(np.median(times[n]) / np.median(base)), 3),
        }
        for n in names
        if n != "local"
    }
    return out


def format_report(r: dict[str, Any]) -> str:
    s = r["settings"]
    lines = [
        f"gallery {s['images']} images, {s['captions']} captions; {s['requests']} requests of {s['batch']} "
        f"quer{'y' if s['batch'] == 1 else 'ies'}, k={s['k']}; load average before {r['load_average_before']}"
    ]
    for direction in ("text", "images"):
        d = r[direction]
        lines.append(f"\n{direction} queries (load average {d['load_average']}, mismatches {d['mismatches']})")
        lines.append(f"  {'contender':<8} {'p5':>8} {'p50':>8} {'p95':>8}   vs local: p50 diff  paired diff  p50 ratio")
        for name, p in d["latency_ms"].items():
            v = d["vs_local"].get(name)
            extra = (
                (
                    f"   {v['p50_difference_ms']:>+13.2f}  {v['median_paired_difference_ms']:>+11.2f}  "
                    f"{v['p50_ratio']:>9.2f}"
                )
                if v
                else ""
            )
            lines.append(f"  {name:<8} {p['p5']:>8.2f} {p['p50']:>8.2f} {p['p95']:>8.2f}{extra}")
        for name, p in d["info_round_trip_ms"].items():
            lines.append(
                f"  {name:<8} round trip to every shard without a search (info()): p50 {p['p50']:.2f} ms, "
                f"p95 {p['p95']:.2f} ms"
            )
    return "\n".join(lines)


def plot(r: dict[str, Any], plt):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, direction in zip(axes, ("text", "images")):
        samples = r[direction]["samples_ms"]
        ax.boxplot(list(samples.values()), tick_labels=list(samples), showfliers=False)
        ax.set_title(f"{direction} queries (load avg {r[direction]['load_average'][0]:.1f})")
        ax.set_ylabel("latency per request (ms)")
    fig.suptitle(f"sharded vs local search, {r['settings']['images']} images / {r['settings']['captions']} captions")
    fig.tight_layout()
    return fig


def build_parser() -> argparse.ArgumentParser:
    p = harness.parser(__doc__, plot="file")
    p.add_argument("--engine", required=True, help="scan.json of the model to serve")
    p.add_argument("--images", type=int, default=1000, help="image gallery size")
    p.add_argument("--captions", type=int, default=5000, help="caption gallery size")
    p.add_argument("--regions", type=int, default=36, help="regions per image")
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2], help="shard counts S to compare")
    p.add_argument("--requests", type=int, default=40, help="timed requests per direction and contender")
    p.add_argument("--warmup", type=int, default=3, help="untimed requests per direction and contender")
    p.add_argument("--batch", type=int, default=1, help="queries per request")
    p.add_argument("-k", type=int, default=10, help="results per query")
    # 1 thread per process by default: ONNX Runtime's thread pools spin between runs, and several processes
    # doing so on 2 cores slow each other down (S=1 measured +42 ms p50 over local with 2 threads each,
    # +2.6 ms with 1, under the same background load)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads of the local searcher")
    p.add_argument("--shard-threads", type=int, default=1, help="ONNX Runtime threads per shard")
    p.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    p.add_argument("--work", help="folder for the gallery and its shards (reused when present; default: a temp dir)")
    return p


def main(argv: list[str] | None = None) -> int:
    return harness.run(_run, build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    report = run(args)
    harness.finish(report, format_report(report), args.json)
    if args.plot and harness.write_plot(args.plot, lambda plt: plot(report, plt))["status"] != "written":
        logger.warning("matplotlib is not installed: no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
