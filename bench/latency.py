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

Where each part lives: bench/synthetic.py (sizes and data), bench/random_models.py (models),
bench/harness.py (arguments, repeats, median and spread, the machine, output), bench/head.py (head
contenders; the PyTorch CUDA one in bench/gpu_check.py); this file runs them in order (query latency
cells, gallery build) and writes the text, JSON and PNG report.

The default run fits in about ten minutes on a 2-core machine: every latency cell (direction, gallery
size, query batch) has a time budget, cells whose estimated single-batch cost exceeds a cap (or the
run's remaining budget, or the free memory) are not run and are recorded as skipped with the estimate
and the reason; no figure is ever extrapolated. ``--quick`` is a seconds-long smoke run with tiny
dimensions and the same JSON keys.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import harness
from bench.head import CONTENDERS, bench_head
from bench.random_models import DEFAULT_CACHE, prepare_model
from bench.synthetic import (
    FULL,
    MODES,
    QUICK,
    ImageStore,
    Sizes,
    VectorPool,
    caption_texts,
    rng_for,
    synthetic_caption_gallery,
)
from runtime.engine import ScanEngine
from runtime.gallery import CaptionGallery, ImageGallery, build_image_gallery
from runtime.options import EngineOptions, WriteOptions
from runtime.searcher import Searcher

logger = logging.getLogger(__name__)

SCHEMA = "scan-runtime-bench-latency/1"
TARGETS = {"head_speedup": 10.0, "head_fraction_of_ceiling": 0.8, "text_1k_p50_ms": 20.0, "text_50k_p50_ms": 1000.0}


def build_parser():
    p = harness.parser(
        __doc__,
        quick="seconds-long smoke run: tiny dimensions, same JSON keys",
        plot="dir",
        cache=DEFAULT_CACHE,
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads for ONNX Runtime and PyTorch "
        "(default: all usable cores; numpy's BLAS keeps its own setting)",
    )
    p.add_argument(
        "--latency-model",
        choices=tuple(MODES),
        default="t2i",
        help="which model serves the query-latency cells (default t2i)",
    )
    p.add_argument("--cell-cap", type=float, help="skip latency cells whose single batch is estimated longer (s)")
    p.add_argument("--budget", type=float, default=None, help="the run's time budget in seconds")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return harness.run(_run, build_parser().parse_args(argv))


def _run(args) -> int:
    harness.positive(args, "threads")
    sizes = QUICK if args.quick else FULL
    overrides = {k: v for k, v in (("cell_cap_s", args.cell_cap), ("run_budget_s", args.budget)) if v is not None}
    report = run(dataclasses.replace(sizes, **overrides), args)
    if args.plots:
        report["plots"] = write_plots(report, args.plots)
        if report["plots"]["status"] != "written":
            print(f"plots: {report['plots']['reason']}", file=sys.stderr)
    else:
        report["plots"] = {"status": "not requested", "files": []}
    report["memory"]["peak_rss_bytes"] = harness.peak_rss_bytes()
    report["wall_seconds"] = time.monotonic() - report.pop("_t0")
    harness.finish(report, format_report(report), args.json)
    return 0


def run(sizes: Sizes, args) -> dict[str, Any]:
    t0 = time.monotonic()
    deadline = Deadline(t0 + sizes.run_budget_s)
    torch = harness.optional_torch()
    torch_threads = torch.get_num_threads() if torch is not None else None
    if torch is not None and args.threads:
        torch.set_num_threads(args.threads)  # same thread count as ONNX Runtime: a like-for-like comparison
    try:
        report: dict[str, Any] = {
            "schema": SCHEMA,
            "quick": bool(args.quick),
            "seed": args.seed,
            "threads": args.threads,
            "started": harness.started(),
            "_t0": t0,
            "machine": harness.describe(),
            "plan": dataclasses.asdict(sizes),
            "targets_definition": TARGETS,
            "export": {},
        }
        manifests = {}
        for mode in MODES:
            manifests[mode], report["export"][mode] = prepare_model(sizes, mode, args.seed, Path(args.cache))
        report["head"] = {
            "shapes": {
                "images": sizes.head_images,
                "captions": sizes.head_captions,
                "caption_len": sizes.head_len,
                "regions": sizes.regions,
                "embed_size": sizes.embed_size,
                "slow_images": sizes.slow_images,
                "slow_captions": sizes.slow_captions,
            },
            "modes": {},
        }
        ceiling = None
        for mode in MODES:
            logger.info("head throughput, %s", mode)
            h = bench_head(mode, manifests[mode], sizes, args.seed, args.threads, ceiling)
            ceiling = h.pop("gemm_ceiling")  # same shapes in both modes: measure the GEMM once
            report["head"]["gemm_ceiling"] = ceiling
            report["head"]["modes"][mode] = h
        with ScanEngine.open(manifests["t2i"], EngineOptions(backend="onnxruntime", threads=args.threads)) as engine:
            logger.info("gallery build")
            report["gallery_build"] = bench_build(engine, sizes, args.seed)
        mode = args.latency_model
        rate = report["head"]["modes"][mode]["contenders"]["ort_cpu"]["pairs_per_s"]
        with ScanEngine.open(manifests[mode], EngineOptions(backend="onnxruntime", threads=args.threads)) as engine:
            searcher = Searcher(engine)
            report["latency"] = {
                "model": mode,
                "k": sizes.k,
                "searcher": {
                    name: getattr(searcher.options, name) for name in ("image_block", "caption_block", "query_batch")
                },
                "latency_is": "wall time of one Searcher.search call on a batch of queries",
                "cell_budget_s": sizes.cell_budget_s,
                "cell_cap_s": sizes.cell_cap_s,
            }
            logger.info("text -> image latency")
            report["latency"]["text_to_image"] = bench_text_to_image(engine, sizes, args.seed, deadline, rate)
            logger.info("image -> text latency")
            report["latency"]["image_to_text"] = bench_image_to_text(engine, sizes, args.seed, deadline, rate)
        report["load_average_at_end"] = harness.load_average()
        report["memory"] = {
            "peak_rss_bytes": harness.peak_rss_bytes(),
            "bytes_per_image_float32": report["gallery_build"]["float32"]["bytes_per_image"],
            "bytes_per_image_float16": report["gallery_build"]["float16"]["bytes_per_image"],
        }
        report["targets"] = targets(report)
        return report
    finally:
        if torch is not None and args.threads:
            torch.set_num_threads(torch_threads)


# --------------------------------------------------------------------------------- query latency


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


def skip_reason(
    estimate_s: float, sizes: Sizes, deadline: Deadline, extra_bytes: int = 0, available_bytes: int | None = None
) -> str | None:
    """Why a cell must not run, or None. ``estimate_s`` is one batch; a cell runs warm-up + min repeats."""
    if estimate_s > sizes.cell_cap_s:
        return (
            f"estimated single-batch cost {estimate_s:.3g} s exceeds the per-cell cap {sizes.cell_cap_s:g} s "
            f"(a cell runs {sizes.cell_warmup} warm-up + at least {sizes.cell_min_repeats} timed batches)"
        )
    cost = estimate_s * (sizes.cell_warmup + sizes.cell_min_repeats)
    if cost > deadline.left():
        return (
            f"estimated cell cost {cost:.3g} s exceeds the {max(deadline.left(), 0):.0f} s left "
            f"of the run budget ({sizes.run_budget_s:g} s)"
        )
    if available_bytes is not None and extra_bytes > 0.8 * available_bytes:
        return (
            f"the gallery needs {extra_bytes / 2**30:.1f} GiB more memory; only "
            f"{available_bytes / 2**30:.1f} GiB available"
        )
    return None


def measure_cell(search: Callable[[int], Any], batch: int, sizes: Sizes, deadline: Deadline) -> dict[str, Any]:
    calls = iter(range(1 << 30))
    budget = min(sizes.cell_budget_s, max(deadline.left() / 4, 0.0))
    times = harness.time_calls(
        lambda: search(next(calls)), sizes.cell_warmup, sizes.cell_min_repeats, sizes.cell_max_repeats, budget
    )
    s = harness.stats(times)
    return {
        "status": "measured",
        "n": s["n"],
        "p50_ms": s["median"] * 1e3,
        "p95_ms": s["p95"] * 1e3,
        "p99_ms": s["p99"] * 1e3,
        "mean_ms": s["mean"] * 1e3,
        "min_ms": s["min"] * 1e3,
        "max_ms": s["max"] * 1e3,
        "queries_per_s": batch / s["mean"],
    }


def run_cell(
    cells: list[dict[str, Any]],
    direction: str,
    gallery_size: int,
    batch: int,
    sizes: Sizes,
    deadline: Deadline,
    pairs_per_s: float,
    extra_bytes: int,
    make_gallery: Callable[[], Any],
    searcher_for: Callable[[Any], Callable[[int], Any]],
) -> None:
    """Estimate one cell; skip it with the reason, or make its gallery and time the ``i``-th search of
    ``searcher_for(gallery)``; append the cell to ``cells``."""
    cell = {"direction": direction, "gallery_size": gallery_size, "batch": batch}
    est = estimate_seconds(cells, gallery_size, batch, pairs_per_s)
    reason = skip_reason(est, sizes, deadline, extra_bytes, harness.mem_available())
    if reason:
        cells.append({**cell, "status": "skipped", "estimate_s": est, "reason": reason})
        logger.info("%s %d x %d: skipped (%s)", direction, gallery_size, batch, reason)
        return
    t0 = time.perf_counter()
    gallery = make_gallery()
    made = time.perf_counter() - t0
    result = measure_cell(searcher_for(gallery), batch, sizes, deadline)
    cells.append({**cell, **result, "estimate_s": est, "gallery_seconds": made})
    logger.info("%s %d x %d: p50 %.1f ms", direction, gallery_size, batch, result["p50_ms"])


def bench_text_to_image(
    engine: ScanEngine, sizes: Sizes, seed: int, deadline: Deadline, pairs_per_s: float
) -> list[dict[str, Any]]:
    pool = caption_texts(rng_for(seed, 2), 4 * max(sizes.batches), sizes.vocab_size)
    store = ImageStore(seed, sizes.regions, sizes.embed_size)
    cells: list[dict[str, Any]] = []
    for g in sizes.image_galleries:
        for batch in sizes.batches:

            def searcher_for(gallery: ImageGallery, batch: int = batch) -> Callable[[int], Any]:
                searcher = Searcher(engine, images=gallery)
                return lambda i: searcher.search([pool[(i * batch + j) % len(pool)] for j in range(batch)], sizes.k)

            # growing copies the rows drawn so far into a new array: both exist for a moment
            extra = store.bytes_for(g) if g > len(store.images) else 0
            run_cell(
                cells,
                "text_to_image",
                g,
                batch,
                sizes,
                deadline,
                pairs_per_s,
                extra,
                lambda g=g: store.gallery(g),
                searcher_for,
            )
    return cells


def bench_image_to_text(
    engine: ScanEngine, sizes: Sizes, seed: int, deadline: Deadline, pairs_per_s: float
) -> list[dict[str, Any]]:
    rng = rng_for(seed, 3)
    pool = rng.standard_normal((max(2 * max(sizes.batches), 16), sizes.regions, sizes.img_dim), dtype=np.float32)
    cells: list[dict[str, Any]] = []
    vectors: list[VectorPool] = []  # drawn once, on first use
    for g in sizes.caption_galleries:
        made: list[CaptionGallery] = []  # one gallery per size, shared by its batch sizes

        def make_gallery(g: int = g, made: list[CaptionGallery] = made) -> CaptionGallery:
            if not made:
                vectors[:] = vectors or [VectorPool(seed, sizes.embed_size)]
                made.append(synthetic_caption_gallery(rng_for(seed, 4, g), g, sizes.embed_size, vectors[0]))
            return made[0]

        for batch in sizes.batches:

            def searcher_for(gallery: CaptionGallery, batch: int = batch) -> Callable[[int], Any]:
                searcher = Searcher(engine, captions=gallery)
                return lambda i: searcher.search(pool[(i * batch + np.arange(batch)) % len(pool)], sizes.k)

            need = 0 if made else int(g * 14 * sizes.embed_size * 4)
            run_cell(cells, "image_to_text", g, batch, sizes, deadline, pairs_per_s, need, make_gallery, searcher_for)
        made.clear()  # free one caption gallery before drawing the next
    return cells


# --------------------------------------------------------------------------------- gallery build


def bench_build(engine: ScanEngine, sizes: Sizes, seed: int) -> dict[str, Any]:
    regions = rng_for(seed, 5).standard_normal((sizes.build_images, sizes.regions, sizes.img_dim), dtype=np.float32)
    out: dict[str, Any] = {"images": sizes.build_images, "regions": sizes.regions, "img_dim": sizes.img_dim}
    with tempfile.TemporaryDirectory(prefix="scan-bench-") as tmp:
        # Warm the image session on a small batch so the first dtype does not pay for ORT's first run.
        build_image_gallery(engine, regions[:4], Path(tmp) / "warm", options=WriteOptions(progress=False))
        for dtype in ("float32", "float16"):
            folder = Path(tmp) / dtype
            t0 = time.perf_counter()
            g = build_image_gallery(engine, regions, folder, options=WriteOptions(dtype=dtype, progress=False))
            seconds = time.perf_counter() - t0
            disk = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
            out[dtype] = {
                "seconds": seconds,
                "images_per_s": sizes.build_images / seconds,
                "bytes_per_image": float(g.nbytes_per_item()),
                "disk_bytes_per_image": disk / len(g),
            }
            del g
    return out


# ---------------------------------------------------------------------------------------- report


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Measured vs target, for reading; nothing here fails a run."""
    rows = []
    for mode, h in report["head"]["modes"].items():
        c = h["contenders"]["ort_cpu"]
        rows.append(
            {
                "name": f"head_speedup_vs_slow_{mode}",
                "op": ">=",
                "target": TARGETS["head_speedup"],
                "what": f"ONNX Runtime CPU head vs the original loop ({mode})",
                "measured": c.get("speedup_vs_slow"),
                "unit": "x",
            }
        )
        rows.append(
            {
                "name": f"head_fraction_of_ceiling_{mode}",
                "op": ">=",
                "target": TARGETS["head_fraction_of_ceiling"],
                "what": f"ONNX Runtime CPU head vs GEMM ceiling ({mode})",
                "measured": c.get("fraction_of_ceiling"),
                "unit": "fraction",
            }
        )
    cells = {(c["gallery_size"], c["batch"]): c for c in report["latency"]["text_to_image"]}
    for size, key, label in ((1000, "text_1k_p50_ms", "1K"), (50000, "text_50k_p50_ms", "50K")):
        c = cells.get((size, 1))
        row = {
            "name": f"text_query_{label.lower()}_p50_ms",
            "what": f"one text query vs {label} images, p50",
            "op": "<=",
            "target": TARGETS[key],
            "unit": "ms",
            "measured": None,
        }
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
    lines = [
        f"SCAN runtime benchmark{' (--quick)' if report['quick'] else ''}: seed {report['seed']}, "
        f"threads {report['threads'] or 'all'}, {report['wall_seconds']:.0f} s",
        "machine: " + harness.summary_line(report["machine"]),
        f"sizes: embed {report['plan']['embed_size']}, {report['plan']['regions']} regions x "
        f"{report['plan']['img_dim']}, word_dim {report['plan']['word_dim']}, "
        f"vocab {report['plan']['vocab_size']}",
    ]
    for mode, ex in report["export"].items():
        how = "cached" if ex["cached"] else f"exported in {ex['export_seconds']:.0f} s"
        lines.append(f"model {mode}: {how} ({ex['manifest']})")
    for mode, h in report["head"]["modes"].items():
        g = report["head"]["gemm_ceiling"]
        m, k, n = g["shape"]
        gem = ", ".join(
            f"{b} {g[b]['gflops']:.1f} GFLOP/s" for b in ("numpy", "onnxruntime") if g[b]["status"] == "measured"
        )
        lines += [
            "",
            f"head {mode} ({h['config']['agg_func']}, lambda_softmax {h['config']['lambda_softmax']:g}): "
            f"GEMM ({m} x {k}) @ ({k} x {n}): {gem}; ceiling {h['ceiling_pairs_per_s']:,.0f} pairs/s",
            f"  {'contender':<18} {'pairs/s':>12} {'p10..p90':>21} {'x slow':>8} {'of ceiling':>10} "
            f"{'GFLOP/s':>8}  shape N x Q x L",
        ]
        for name, c in h["contenders"].items():
            if c["status"] != "measured":
                lines.append(f"  {name:<18} {c['status']}: {c['reason']}")
                continue
            frac = c.get("fraction_of_ceiling")
            lines.append(
                f"  {name:<18} {c['pairs_per_s']:>12,.0f} "
                f"{c['pairs_per_s_p10']:>10,.0f}..{c['pairs_per_s_p90']:<10,.0f}"
                f" {_fmt(c.get('speedup_vs_slow'), '.1f'):>8} {'-' if frac is None else f'{frac:.0%}':>10} "
                f"{c['gflops']:>8.1f}  {' x '.join(map(str, c['shape']))}"
            )
    lat = report["latency"]
    lines += [
        "",
        f"query latency ({lat['model']} model, k={lat['k']}, image_block {lat['searcher']['image_block']}, "
        f"caption_block {lat['searcher']['caption_block']}, query_batch {lat['searcher']['query_batch']})",
        f"  {'direction':<14} {'gallery':>8} {'batch':>5} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} "
        f"{'queries/s':>10} {'n':>4}",
    ]
    for c in lat["text_to_image"] + lat["image_to_text"]:
        head = f"  {c['direction']:<14} {c['gallery_size']:>8,} {c['batch']:>5}"
        if c["status"] != "measured":
            lines.append(f"{head}   skipped: {c['reason']}")
        else:
            lines.append(
                f"{head} {c['p50_ms']:>9.1f} {c['p95_ms']:>9.1f} {c['p99_ms']:>9.1f} "
                f"{c['queries_per_s']:>10.1f} {c['n']:>4}"
            )
    b = report["gallery_build"]
    lines += [
        "",
        f"gallery build ({b['images']} images through build_image_gallery): "
        + "; ".join(
            f"{dt} {b[dt]['images_per_s']:,.0f} images/s, {b[dt]['bytes_per_image'] / 1024:,.1f} KiB/image"
            for dt in ("float32", "float16")
        ),
        f"peak resident memory: {report['memory']['peak_rss_bytes'] / 2**20:,.0f} MiB",
        "",
        "targets (measured vs target; informational):",
    ]
    for t in report["targets"]:
        met = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        spec = ".1%" if t["unit"] == "fraction" else ".1f"
        lines.append(
            f"  {t['what']:<52} {t['op']} {format(t['target'], spec):>8}: measured "
            f"{_fmt(t['measured'], spec):>8}  {met}{'  (' + t['note'] + ')' if t.get('note') else ''}"
        )
    return "\n".join(lines)


def write_plots(report: dict[str, Any], folder: Path) -> dict[str, Any]:
    """PNG plots; returns {"status", "files"} or why none were drawn."""
    written = [
        harness.write_plot(folder / name, functools.partial(draw, report))
        for name, draw in (
            ("latency_vs_gallery.png", _latency_vs_gallery),
            ("throughput_vs_batch.png", _throughput_vs_batch),
            ("head_throughput.png", _head_throughput),
        )
    ]
    if written[0]["status"] != "written":
        return {**written[0], "files": []}
    return {"status": "written", "files": [w["file"] for w in written]}


DIRECTIONS = (("text_to_image", "text -> image"), ("image_to_text", "image -> text"))


def _latency_vs_gallery(report: dict[str, Any], plt):
    lat = report["latency"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (key, title) in zip(axes, DIRECTIONS):
        for batch in report["plan"]["batches"]:
            pts = sorted(
                (c["gallery_size"], c["p50_ms"]) for c in lat[key] if c["batch"] == batch and c["status"] == "measured"
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"batch {batch}")
        ax.set(xscale="log", yscale="log", xlabel="gallery size", ylabel="p50 latency per batch (ms)", title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"SCAN query latency ({lat['model']}), {report['machine']['cpu_model']}", fontsize=9)
    fig.tight_layout()
    return fig


def _throughput_vs_batch(report: dict[str, Any], plt):
    lat = report["latency"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (key, title) in zip(axes, DIRECTIONS):
        for size in sorted({c["gallery_size"] for c in lat[key]}):
            pts = sorted(
                (c["batch"], c["queries_per_s"])
                for c in lat[key]
                if c["gallery_size"] == size and c["status"] == "measured"
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"gallery {size:,}")
        ax.set(xscale="log", yscale="log", xlabel="query batch size", ylabel="queries/s", title=title)
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def _head_throughput(report: dict[str, Any], plt):
    fig, ax = plt.subplots(figsize=(8, 4.2))
    modes = list(report["head"]["modes"])
    width = 0.8 / len(CONTENDERS)
    for i, name in enumerate(CONTENDERS):
        vals = [report["head"]["modes"][m].get("contenders", {}).get(name, {}).get("pairs_per_s") or 0 for m in modes]
        ax.bar(np.arange(len(modes)) + i * width, vals, width, label=name)
    for j, m in enumerate(modes):
        ceiling = report["head"]["modes"][m].get("ceiling_pairs_per_s")
        if ceiling:
            ax.hlines(
                ceiling,
                j - width / 2,
                j + 0.8,
                colors="k",
                linestyles="--",
                label="CPU GEMM ceiling" if j == 0 else None,
            )
    ax.set_xticks(np.arange(len(modes)) + 0.4 - width / 2, modes)
    ax.set(yscale="log", ylabel="pairs/s", title="similarity head throughput")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(main())
