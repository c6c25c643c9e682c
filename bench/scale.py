"""Two-stage search at scale: exact SCAN vs candidate index + exact rerank, on galleries up to 1M images.

    python -m bench.scale [--quick] [--sizes 10000,100000] [--candidates 100,250,500,1000]
                          [--json FILE] [--plot FILE] [--demo DIR] [--cache DIR]

The model is the trained demo model (``make demo`` trains and exports it into ``demo/``; this script
does the same if it is missing). Galleries are drawn from the demo's world (the objects, colours and
scenes the model was trained on) by ``bench.synthetic.SceneStream``, vectorised in seeded chunks of 8192
images, and streamed through the image encoder into the gallery writer (``RegionStream``): the raw features
of one chunk at a time, never the gallery's. Each gallery (float16 cache + candidate index) is built once
under ``--cache`` (default ``~/.cache/scan-runtime/scale``) in ``galleries/<encoder>-scenes-seed<s>-v<version>/<N>``
and reused by every later run; ``build.json`` beside it records how it was built (seconds, peak memory,
load, disk). A 1M-image gallery takes about 12 GB there, and its index 1.4 GB.

Queries are captions of images of the first chunk (so every gallery holds their images). For each
gallery size, in one process:

* exact search (``Searcher``, every image scored): p50/p95 of single-query latency. Skipped, with the
  reason, where one query is expected to exceed ``--exact-cap-s`` (expected from the measured cost per
  image at the previous size; the expectation is only a reason to skip, never reported as a result), or
  with ``--exact-queries 0``;
* two-stage search (``SearchOptions(candidates=M)``) for each M: p50/p95 latency, top-10 overlap with
  exact on the same queries (the exact top-10 from one batched search, recorded beside the gallery and
  reused: minutes at 1M), and ``exact_over_two_stage``, exact's p50 over two-stage's (where exact was
  timed: two-stage must never be slower);
* index build time, bytes per image on disk (gallery + index), resident bytes per image (RSS growth
  after loading and searching), RSS, peak RSS;
* ``--first-answer``: a new process's time to its first two-stage answer (``bench/first_answer.py``),
  warm page cache, and cold with ``--drop-caches`` (root; empties the whole machine's page cache);
* the generator's rate (images/s), once per run.

JSON: ``{"machine", "rows": [{"gallery", "mode", "candidates", "p50_ms", "p95_ms", "overlap_at_10", ...}],
"targets"}``; a log-log plot of p50 latency against gallery size. ``--quick``: galleries of 2K and 20K.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench import harness
from bench.harness import overlap_at
from bench.synthetic import CHUNK, FEATURES_VERSION, SCENE_CACHE, SceneStream
from runtime import atomic
from runtime.gallery.index import DEFAULT_NPROBE, default_neighbors
from runtime.options import EngineOptions, SearchOptions, WriteOptions

logger = logging.getLogger(__name__)

SCHEMA = "scan-runtime-bench-scale/1"
REPO = Path(__file__).resolve().parents[1]
TARGETS = {
    "p50_ms_100k": 30.0,
    "p50_ms_1m": 100.0,
    "overlap": 0.95,
    "quick_speedup_20k": 5.0,
    "resident_bytes_1m": 12e9,
}


# ---------------------------------------------------------------------------------------------- model


def demo_engine(demo: Path, log=print) -> Path:
    """The demo model's manifest, trained and exported into ``demo`` first if missing."""
    manifest = demo / "engines" / "scan.json"
    if manifest.is_file():
        return manifest
    from bench.demo.train import train_demo
    from export.to_onnx import main as to_onnx

    log(f"no demo model in {demo}: training and exporting it (make demo does the same; a few minutes)")
    ckpt = train_demo(demo, log=log)
    if to_onnx([str(ckpt), "--out", str(demo / "engines")]) != 0:
        raise RuntimeError("exporting the demo model failed")
    return manifest


# ---------------------------------------------------------------------------------------------- data


def gallery_folder(cache: Path, engine, stream: SceneStream, n: int) -> Path:
    """Where the gallery of the stream's first ``n`` images lives: keyed by the image encoder, the generator's
    seed, chunk and version, so a gallery is reused by every run that would build the same one, and by no other."""
    chunk = "" if stream.chunk == CHUNK else f"-chunk{stream.chunk}"  # the chunk decides each image's seed
    key = f"{engine.manifest.image_encoder_id[:12]}-scenes-seed{stream.seed}{chunk}-v{FEATURES_VERSION}"
    return cache / "galleries" / key / str(n)


def generator_rate(stream: SceneStream, chunks: int = 4) -> dict[str, Any]:
    """Images per second of the raw-feature generator alone (``chunks`` chunks after one untimed one)."""
    buf = np.empty((stream.chunk, stream.regions, stream.img_dim), np.float32)
    stream.features(0, buf)
    t0 = time.perf_counter()
    for c in range(1, chunks + 1):
        stream.features(c, buf)
    seconds = time.perf_counter() - t0
    return {
        "images_per_s": round(chunks * stream.chunk / seconds, 1),
        "img_dim": stream.img_dim,
        "chunk": stream.chunk,
        "load_average": harness.load_average(),
    }


def pick_queries(stream: SceneStream, smallest: int, n: int) -> list[str]:
    """``n`` captions (seeded) of images that every gallery holds: the first chunk's (or the smallest
    gallery's), so runs with other sizes above one chunk ask the same queries."""
    captions = stream.captions(min(smallest, stream.chunk))
    rng = np.random.default_rng(1)
    return [captions[i] for i in rng.choice(len(captions), size=min(n, len(captions)), replace=False)]


class _AnonPeak:
    """Peak anonymous resident memory (the process's own, not the gallery's file pages it maps) while in
    the block, sampled every 0.2 s."""

    def __enter__(self) -> _AnonPeak:
        self.peak = _anon_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, _anon_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _anon_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:")), 0)
    except OSError:
        return 0


def ensure_gallery(
    engine, stream: SceneStream, n: int, folder: Path, index: str, progress: bool
) -> tuple[Any, dict[str, Any]]:
    """The float16 gallery of the stream's first ``n`` images and its candidate index, each built once
    (streamed: the raw features of one chunk at a time) and reused; and how they were built
    (``build.json`` beside them: seconds, images/s, peak memory, load average, disk)."""
    from runtime.gallery import GalleryError, ImageGallery, RegionStream, build_image_gallery, writer_lock
    from runtime.gallery.index import StaleIndexError, load_index, update_index

    encoder = engine.manifest.image_encoder_id
    record = folder / "build.json"
    gallery = None
    try:
        gallery = ImageGallery.load(folder, encoder)
        if len(gallery) != n:
            gallery.close()
            gallery = None
    except GalleryError as e:
        logger.info("building %s (%s)", folder, e)
    info: dict[str, Any] = json.loads(record.read_text()) if gallery is not None and record.is_file() else {}
    if gallery is None:
        t0 = time.perf_counter()
        with _AnonPeak() as peak:
            gallery = build_image_gallery(
                engine,
                RegionStream(n, stream.regions, stream.chunks(n)),
                folder,
                batch=stream.chunk,
                options=WriteOptions(dtype="float16", progress=progress),
            )
        seconds = time.perf_counter() - t0
        info = {
            "gallery_build_s": round(seconds, 3),
            "gallery_images_per_s": round(n / seconds, 1),
            "gallery_build_peak_anon_rss_bytes": peak.peak,
            "gallery_build_load_average": harness.load_average(),
            "generator": {"seed": stream.seed, "version": FEATURES_VERSION, "chunk": stream.chunk},
        }
    try:
        load_index(gallery, encoder)
    except StaleIndexError as e:
        logger.info("indexing %s (%s)", folder, e)
        t0 = time.perf_counter()
        with _AnonPeak() as peak, writer_lock(folder):
            update_index(gallery, index, 0, progress)
        info.update(
            index_build_wall_s=round(time.perf_counter() - t0, 3),
            index_build_peak_anon_rss_bytes=peak.peak,
            index_build_load_average=harness.load_average(),
        )
    info["disk_bytes"] = disk_bytes(folder)
    atomic.write_json(record, info)
    return gallery, info


# ---------------------------------------------------------------------------------------------- measuring


def _pct(samples: list[float], q: float) -> float:
    return harness.percentiles(samples, (q,), scale=1e3, ndigits=3)[f"p{q:g}"]


def time_queries(searcher, queries: Sequence[str], k: int = 10) -> tuple[list[float], np.ndarray]:
    """One ``search`` call per query (the single-query latency a user sees): (seconds each, ids (n, k)).
    The untimed first call loads the index and touches the code paths."""
    times, found = harness.time_each(lambda i: searcher.search([queries[i]], k), len(queries), warmup=1)
    return times, np.stack([ids[0] for _, ids in found])


def disk_bytes(folder: Path) -> dict[str, int]:
    sizes = {"gallery": 0, "index": 0}
    for p in folder.iterdir():
        if p.is_file():
            sizes["index" if p.name.startswith("candidates") else "gallery"] += p.stat().st_size
    return sizes


def exact_top10(engine, gallery, queries: Sequence[str]) -> tuple[np.ndarray, float, bool]:
    """Exact top-10 of every query in one batched search (for the overlap; not a latency figure):
    (ids, seconds, whether they came from the record of an earlier run). Recorded beside the gallery,
    keyed by the gallery's generation and the queries: at 1M images the batched search takes minutes."""
    from runtime.searcher import Searcher

    record = _exact_record(gallery, queries)
    if record.is_file():
        saved = json.loads(record.read_text())
        return np.asarray(saved["ids"], np.int64), float(saved["seconds"]), True
    t0 = time.perf_counter()
    with Searcher(engine, images=gallery) as s:
        _, ids = s.search(list(queries), 10)
    seconds = time.perf_counter() - t0
    if Path(gallery.folder).is_dir():
        atomic.write_json(
            record,
            {"ids": ids.tolist(), "seconds": seconds, "load_average": harness.load_average(), "queries": queries},
        )
    return ids, seconds, False


def bench_size(
    engine,
    gallery,
    queries: list[str],
    ms: Sequence[int],
    args: argparse.Namespace,
    cost: dict[str, float],
    build: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Rows for one gallery. ``cost`` carries measured per-image costs of exact search from the
    previous sizes (seconds per image for one query, and per image x query batched), only to decide
    what to skip. ``build``: how the gallery and its index were built (``ensure_gallery``)."""
    from runtime.searcher import Searcher

    n = len(gallery)
    meta = json.loads((gallery.folder / "candidates.json").read_text())
    disk = disk_bytes(gallery.folder)
    common = {
        "gallery": n,
        "index": meta["index"],
        "index_build_s": meta.get("build_seconds"),
        "disk_bytes_per_image": round((disk["gallery"] + disk["index"]) / n, 1),
        "index_disk_bytes_per_image": round(disk["index"] / n, 1),
        "build": build or {},
    }
    # Two-stage first, so its resident figure counts what it touches (the index, the candidates' pages),
    # not the pages of the whole gallery that exact search reads.
    rss0 = harness.rss_bytes()
    two_stage, two_ids = [], []
    for m in ms:
        if m >= n:
            continue
        with Searcher(
            engine, images=gallery, options=SearchOptions(candidates=m, neighbors=args.neighbors, nprobe=args.nprobe)
        ) as s:
            times, ids = time_queries(s, queries)
        two_ids.append(ids)
        two_stage.append(
            {
                **common,
                "mode": "two_stage",
                "candidates": m,
                "neighbors": args.neighbors or default_neighbors(m, n),
                "nprobe": args.nprobe or DEFAULT_NPROBE,
                "p50_ms": _pct(times, 50),
                "p95_ms": _pct(times, 95),
                "overlap_at_10": None,
                "queries": len(queries),
                "load_average": harness.load_average(),
                "resident_bytes_per_image": round(max(harness.rss_bytes() - rss0, 0) / n, 1),
                "rss_bytes": harness.rss_bytes(),
                "peak_rss_bytes": harness.peak_rss_bytes(),
            }
        )
    n_timed = min(len(queries), args.exact_queries)
    single = cost.get("single") and cost["single"] * n
    batch = cost.get("batch") and cost["batch"] * n * len(queries)
    row = {**common, "mode": "exact", "candidates": None, "p50_ms": None, "p95_ms": None, "overlap_at_10": None}
    if n_timed == 0:
        row["skipped"] = "exact latency not timed (--exact-queries 0)"
    elif single and single > args.exact_cap_s:
        row["skipped"] = (
            f"one exact query is expected to take {single:.1f} s (measured cost per image at the "
            f"previous size x {n}), over the cap of {args.exact_cap_s} s"
        )
    else:
        with Searcher(engine, images=gallery) as s:
            times, _ = time_queries(s, queries[:n_timed])
        cost["single"] = float(np.median(times)) / n
        row.update(
            p50_ms=_pct(times, 50),
            p95_ms=_pct(times, 95),
            overlap_at_10=1.0,
            queries=n_timed,
            load_average=harness.load_average(),
            peak_rss_bytes=harness.peak_rss_bytes(),
        )
    recorded = _exact_record(gallery, queries).is_file()
    if batch and batch > args.overlap_cap_s and not recorded:
        note = (
            f"exact search was not run at this size (expected {batch:.0f} s for the {len(queries)} "
            f"queries batched, over the cap of {args.overlap_cap_s} s): overlap measured only where "
            f"exact ran"
        )
        for r in two_stage:
            r["overlap_note"] = note
    else:
        exact_ids, seconds, cached = exact_top10(engine, gallery, queries)
        if not cached:
            cost["batch"] = seconds / (n * len(queries))
        if row["p50_ms"] is None:
            row["overlap_note"] = (
                f"exact top-10 computed offline (one batched search of the {len(queries)} queries, {seconds:.0f} s"
                f"{', recorded by an earlier run' if cached else ''}) for the overlap"
            )
        for r, ids in zip(two_stage, two_ids):
            r["overlap_at_10"] = round(overlap_at(ids, exact_ids), 4)
    if row["p50_ms"] is not None:  # two-stage must never be slower than exact: the ratio, per M
        for r in two_stage:
            r["exact_over_two_stage"] = round(row["p50_ms"] / r["p50_ms"], 2)
    if args.first_answer:
        row["first_answer"] = first_answer(gallery.folder, queries[0], max(ms), args)
    return [row, *two_stage]


def _exact_record(gallery, queries: Sequence[str]) -> Path:
    """Where ``exact_top10`` records the exact top-10 of ``queries`` on this generation of ``gallery``."""
    key = hashlib.sha256(json.dumps([gallery.manifest.get("generation"), list(queries)]).encode()).hexdigest()[:16]
    return Path(gallery.folder) / f"exact_top10.{key}.json"


def first_answer(folder: Path, query: str, m: int, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds from starting a new process to its first two-stage answer (import, engine, gallery, index,
    one query: ``bench/first_answer.py``), with a warm page cache (the second of two runs) and, with
    ``--drop-caches`` (root only: it empties the page cache of the whole machine), a cold one."""
    import subprocess

    cmd = [
        sys.executable,
        "-m",
        "bench.first_answer",
        "--engine",
        str(Path(args.demo) / "engines" / "scan.json"),
        "--gallery",
        str(folder),
        "--candidates",
        str(m),
        "--queries",
        "20",
        query,
    ]

    def once() -> dict[str, Any]:
        t0 = time.perf_counter()
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
        return {"wall_s": round(time.perf_counter() - t0, 3), **json.loads(out), "load_average": harness.load_average()}

    result: dict[str, Any] = {}
    if args.drop_caches:
        try:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            result["cold"] = once()
        except OSError as e:
            result["cold"] = {"skipped": f"cannot drop the page cache ({e}); run as root"}
    once()
    result["warm"] = once()
    return result


# ---------------------------------------------------------------------------------------------- report


def check_targets(rows: list[dict[str, Any]], quick: bool) -> list[dict[str, Any]]:
    out = []

    def best(n: int, limit_ms: float) -> dict[str, Any] | None:
        ok = [
            r
            for r in rows
            if r["gallery"] == n
            and r["mode"] == "two_stage"
            and r["p50_ms"] is not None
            and (r["overlap_at_10"] or 0) >= TARGETS["overlap"]
        ]
        ok.sort(key=lambda r: r["p50_ms"])
        return ok[0] if ok else None

    for n, key in ((100_000, "p50_ms_100k"), (1_000_000, "p50_ms_1m")):
        if not any(r["gallery"] == n for r in rows):
            continue
        r = best(n, TARGETS[key])
        out.append(
            {
                "target": f"{n} images: p50 <= {TARGETS[key]} ms at overlap >= {TARGETS['overlap']}",
                "measured": None
                if r is None
                else f"{r['p50_ms']} ms at M={r['candidates']} (overlap {r['overlap_at_10']})",
                "met": bool(r and r["p50_ms"] <= TARGETS[key]),
            }
        )
    largest = max(r["gallery"] for r in rows)
    exact = [r for r in rows if r["gallery"] == largest and r["mode"] == "exact" and r["p50_ms"]]
    r = best(largest, 0)
    if exact and r:
        speedup = exact[0]["p50_ms"] / r["p50_ms"]
        out.append(
            {
                "target": f"{largest} images: >= {TARGETS['quick_speedup_20k']}x faster than exact at overlap "
                f">= {TARGETS['overlap']}",
                "measured": f"{speedup:.1f}x at M={r['candidates']} (overlap {r['overlap_at_10']})",
                "met": speedup >= TARGETS["quick_speedup_20k"],
            }
        )
    return out


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"{'gallery':>9} {'mode':>9} {'M':>6} {'p50 ms':>9} {'p95 ms':>9} {'overlap@10':>10} "
        f"{'index':>22} {'build s':>8} {'disk B/img':>10} {'resident B/img':>14} {'load':>16}"
    ]
    for r in report["rows"]:
        idx = ",".join(f"{k}={v}" for k, v in r["index"].items())

        def f(x, spec):
            return "-" if x is None else format(x, spec)

        lines.append(
            f"{r['gallery']:>9} {r['mode']:>9} {f(r['candidates'], 'd'):>6} {f(r['p50_ms'], '.1f'):>9} "
            f"{f(r.get('p95_ms'), '.1f'):>9} {f(r['overlap_at_10'], '.3f'):>10} {idx:>22} "
            f"{f(r.get('index_build_s'), '.1f'):>8} {f(r['disk_bytes_per_image'], '.0f'):>10} "
            f"{f(r.get('resident_bytes_per_image'), '.0f'):>14} {r.get('load_average', '-')!s:>16}"
        )
        if r.get("skipped"):
            lines.append(f"{'':>9} skipped: {r['skipped']}")
    if report.get("generator"):
        g = report["generator"]
        lines.append(f"generator: {g['images_per_s']:.0f} images/s (img_dim {g['img_dim']}, load {g['load_average']})")
    for t in report["targets"]:
        lines.append(f"target {t['target']}: {t['measured']} -> {'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)


def plot(report: dict[str, Any], plt):
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    rows = [r for r in report["rows"] if r["p50_ms"] is not None]
    series = [("exact", None)] + [
        ("two_stage", m) for m in sorted({r["candidates"] for r in rows if r["mode"] == "two_stage"})
    ]
    for mode, m in series:
        pts = sorted((r["gallery"], r["p50_ms"]) for r in rows if r["mode"] == mode and r["candidates"] == m)
        if pts:
            label = "exact" if mode == "exact" else f"two-stage M={m}"
            ax.plot(*zip(*pts), marker="o", label=label, lw=2 if mode == "exact" else 1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("gallery size (images)")
    ax.set_ylabel("p50 latency, one text query (ms)")
    m = report["machine"]
    ax.set_title(f"SCAN demo model, {m['cores']} cores, load {m['load_average_at_start']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = harness.parser(
        __doc__,
        quick="galleries of 2K and 20K images, few queries (minutes)",
        plot="file",
        cache=SCENE_CACHE,
        seed=False,
    )
    p.add_argument("--sizes", help="comma-separated gallery sizes (default 10000,100000,1000000)")
    p.add_argument("--candidates", default="100,250,500,1000", help="values of M (default 100,250,500,1000)")
    p.add_argument("--queries", type=int, help="text queries per size (default 40; quick 20)")
    p.add_argument(
        "--exact-cap-s",
        type=float,
        default=5.0,
        help="skip exact latency where one query would take longer than this (default 5 s)",
    )
    p.add_argument("--exact-queries", type=int, default=10, help="queries timed with exact search (default 10)")
    p.add_argument(
        "--overlap-cap-s",
        type=float,
        default=900.0,
        help="skip the batched exact search the overlap needs where it would take longer (default 900 s)",
    )
    p.add_argument("--index", default="auto", help="candidate index kind (auto, flat, ivf, ivfsq, ivfpq, hnsw)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists probed per query vector")
    p.add_argument(
        "--neighbors",
        type=int,
        default=None,
        help="index neighbours per query vector (default: runtime.gallery.index.default_neighbors)",
    )
    p.add_argument(
        "--first-answer",
        action="store_true",
        help="time a new process's first two-stage answer per size (warm page cache; cold with --drop-caches)",
    )
    p.add_argument(
        "--drop-caches",
        action="store_true",
        help="with --first-answer: also cold, after emptying the machine's page cache (root)",
    )
    p.add_argument("--demo", default=str(REPO / "demo"), help="demo folder (make demo's; trained here if missing)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--chunk", type=int, default=CHUNK, help=argparse.SUPPRESS)  # generator chunk (tests)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return harness.run(_run, build_parser().parse_args(argv), level=logging.WARNING)


def _run(args: argparse.Namespace) -> int:
    sizes = harness.ints(args.sizes or ("2000,20000" if args.quick else "10000,100000,1000000"), "sizes")
    ms = harness.ints(args.candidates, "candidates")
    n_queries = args.queries or (20 if args.quick else 40)
    report = run(sorted(sizes), ms, n_queries, args)
    harness.finish(report, format_table(report), args.json)
    if args.plot and harness.write_plot(args.plot, lambda plt: plot(report, plt))["status"] != "written":
        print("plot: matplotlib is not installed", file=sys.stderr)
    return 0


def run(sizes: list[int], ms: list[int], n_queries: int, args: argparse.Namespace) -> dict[str, Any]:
    from runtime.engine import ScanEngine

    progress = not args.no_progress
    cache = Path(args.cache).expanduser()
    manifest = demo_engine(Path(args.demo))
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "machine": harness.describe(),
        "command": sys.argv,
        "model": str(manifest),
        "rows": [],
    }
    with ScanEngine.open(manifest, EngineOptions(backend="onnxruntime", threads=args.threads)) as engine:
        stream = SceneStream(engine.config.img_dim, seed=0, chunk=args.chunk)
        queries = pick_queries(stream, min(sizes), n_queries)
        report["generator"] = generator_rate(stream)
        report["queries"] = len(queries)
        cost: dict[str, float] = {}
        for n in sizes:
            print(f"-- gallery of {n} images", file=sys.stderr, flush=True)
            folder = gallery_folder(cache, engine, stream, n)
            gallery, build = ensure_gallery(engine, stream, n, folder, args.index, progress)
            rows = bench_size(engine, gallery, queries, ms, args, cost, build)
            report["rows"].extend(rows)
            for r in rows:
                print(
                    json.dumps({k: r[k] for k in ("gallery", "mode", "candidates", "p50_ms", "overlap_at_10")}),
                    file=sys.stderr,
                    flush=True,
                )
            del gallery
    report["targets"] = check_targets(report["rows"], args.quick)
    report["load_average_at_end"] = harness.load_average()
    return report


if __name__ == "__main__":
    sys.exit(main())
