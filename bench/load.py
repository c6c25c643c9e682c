"""Load test of the HTTP service: real HTTP, concurrent clients, dynamic batching on and off.

    python bench/load.py [--quick] [--duration 20] [--long 60] [--concurrency 1,4,16,64] [--batches 1,32]
                         [--json bench/results/load.json] [--plot bench/results/load.png] [--cache DIR]

For each ``--max-batch`` setting (1 = no batching, and the default) the script starts ``runtime/serve.py``
as its own process on a free loopback port, then drives it with 1, 4, 16 and 64 concurrent clients (httpx
async, one connection each), every client sending one single-query ``POST /v1/search/text`` after another
for a fixed duration. Per cell it reports requests/s, p50/p95/p99 latency, errors, the server's batch-size
distribution (read from ``/metrics`` before and after the cell) and the server's resident memory, sampled
every 0.25 s. The largest concurrency of the default setting runs ``--long`` seconds (memory growth after
warm-up is measured over it). Finally SIGTERM: the server's exit code and how long it took.

The model is a randomly initialised full-size SCAN (embed 1024, 36 regions x 2048, bi-GRU; the same export
as bench/latency.py, cached) and the gallery is 1,000 random images encoded by it into a gallery cache.
The clients run on the same machine as the server and share its cores: on 2 cores they take a noticeable
part of the CPU; the load average is recorded beside the figures. ``--quick``: tiny model, 1 s cells.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench import harness
from bench.random_models import DEFAULT_CACHE, prepare_model
from bench.synthetic import FULL, QUICK, Sizes, caption_texts, rng_for
from runtime.options import EngineOptions, WriteOptions

logger = logging.getLogger(__name__)

SCHEMA = "scan-runtime-bench-load/1"
REPO = Path(__file__).resolve().parents[1]
SERVE = REPO / "runtime" / "serve.py"
TARGETS = {
    "throughput_16_over_1": 3.0,
    "p99_16_over_p50_1": 4.0,
    "errors_at_max_concurrency": 0,
    "rss_growth_after_warmup": 0.05,
}


# ----------------------------------------------------------------------------------------- preparation


def prepare_gallery(manifest: Path, n: int, sizes: Sizes, seed: int, cache: Path) -> Path:
    """A gallery folder of ``n`` random images encoded by the model (built once, kept in the cache)."""
    folder = cache / f"load-gallery-{manifest.parent.name}-{n}-{seed}"
    if (folder / "images" / "gallery.json").is_file():
        return folder
    from runtime.engine import ScanEngine
    from runtime.gallery import build_image_gallery

    rng = rng_for(seed, 20)
    logger.info("encoding a %d-image gallery into %s", n, folder)
    with (
        ScanEngine.open(manifest, EngineOptions(backend="onnxruntime")) as engine,
        tempfile.TemporaryDirectory(dir=cache) as tmp,
    ):
        regions = np.lib.format.open_memmap(
            Path(tmp) / "regions.npy", mode="w+", dtype=np.float32, shape=(n, sizes.regions, sizes.img_dim)
        )
        for a in range(0, n, 256):  # streamed: 1K full-size images are 300 MB of features
            b = min(a + 256, n)
            regions[a:b] = np.abs(rng.standard_normal((b - a, sizes.regions, sizes.img_dim), dtype=np.float32))
        regions.flush()
        names = [f"image{i}" for i in range(n)]
        build_image_gallery(engine, regions, folder / "images", names, WriteOptions(progress=False))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``runtime/serve.py`` as a child process."""

    def __init__(self, manifest: Path, gallery: Path, max_batch: int, extra: Sequence[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [
            sys.executable,
            str(SERVE),
            "--engine",
            str(manifest),
            "--gallery",
            str(gallery),
            "--port",
            str(self.port),
            "--max-batch",
            str(max_batch),
            "--log-level",
            "warning",
            *extra,
        ]
        self.command = " ".join(cmd[1:])
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        with open(log, "ab") as err:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)

    def wait_ready(self, timeout: float) -> float:
        from runtime.client import SearchClient

        t0 = time.monotonic()
        with SearchClient(self.url, timeout=1) as client:
            while time.monotonic() - t0 < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"serve.py exited {self.proc.returncode}; see {self.log}")
                if client.ready():
                    return time.monotonic() - t0
                time.sleep(0.1)
        raise RuntimeError(f"serve.py not ready after {timeout} s; see {self.log}")

    def rss(self) -> int | None:
        try:
            import psutil

            return psutil.Process(self.proc.pid).memory_info().rss
        except Exception:  # psutil missing or the process gone: no sample
            return None

    def stop(self, timeout: float = 30.0) -> dict[str, Any]:
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = None
        return {"exit_code": rc, "seconds": time.monotonic() - t0}


class RssSampler:
    def __init__(self, server: Server, every: float = 0.25) -> None:
        self.server, self.every = server, every
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            rss = self.server.rss()
            if rss is not None:
                self.samples.append((time.monotonic() - t0, rss))
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------------------- metrics


def batch_histogram(metrics: str, kind: str = "text") -> dict[str, float]:
    """Cumulative ``scan_batch_size`` bucket counts by ``le``, plus ``_count`` and ``_sum``."""
    out: dict[str, float] = {}
    prefix = "scan_batch_size_"
    for line in metrics.splitlines():
        if not line.startswith(prefix) or f'kind="{kind}"' not in line:
            continue
        name, value = line.rsplit(" ", 1)
        if name.startswith(prefix + "bucket"):
            out[name.split('le="')[1].split('"')[0]] = float(value)
        elif name.startswith(prefix + "count"):
            out["_count"] = float(value)
        elif name.startswith(prefix + "sum"):
            out["_sum"] = float(value)
    return out


def batch_distribution(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Batches per size bucket during a cell (from two cumulative scrapes)."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    count, total = delta.pop("_count", 0.0), delta.pop("_sum", 0.0)
    buckets = sorted(((float("inf") if k == "+Inf" else float(k)), v) for k, v in delta.items())
    dist, previous = {}, 0.0
    for le, cumulative in buckets:
        if cumulative - previous > 0:
            dist["+Inf" if le == float("inf") else str(int(le))] = int(cumulative - previous)
        previous = cumulative
    return {"batches": int(count), "queries": int(total), "mean": total / count if count else None, "by_size_le": dist}


# ----------------------------------------------------------------------------------------- load


async def drive(
    url: str, concurrency: int, duration: float, warmup: float, queries: list[str], k: int
) -> dict[str, Any]:
    """``concurrency`` clients, each sending one request after another until the cell ends.

    Counted: the requests that complete within the ``duration`` s after the first ``warmup`` s, whenever
    they started (at high concurrency a request can take longer than the warm-up).

    Plain httpx here, not ``SearchClient``: a client per coroutine on one event loop (64 threads of the
    synchronous client would compete with the server for the same cores), and no retries, since a load test
    counts every 503 a client would retry.
    """
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    t_start = time.perf_counter()
    t_measure, t_end = t_start + warmup, t_start + warmup + duration
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    # Metrics are scraped on a connection of their own: the clients' pool is always busy.
    async with (
        httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client,
        httpx.AsyncClient(base_url=url, timeout=60) as scraper,
    ):

        async def one(c: int) -> None:
            i = c
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                try:
                    r = await client.post("/v1/search/text", json={"queries": [queries[i % len(queries)]], "k": k})
                    ok = r.status_code == 200
                    key = None if ok else f"HTTP {r.status_code}"
                except httpx.HTTPError as e:
                    ok, key = False, type(e).__name__
                t1 = time.perf_counter()
                if t_measure <= t1 <= t_end:
                    if ok:
                        latencies.append(t1 - t0)
                    else:
                        errors[key] = errors.get(key, 0) + 1
                i += concurrency

        async def scrape_at(t: float) -> str:
            await asyncio.sleep(max(0.0, t - time.perf_counter()))
            return (await scraper.get("/metrics")).text

        scrape = asyncio.ensure_future(scrape_at(t_measure))
        await asyncio.gather(*[one(c) for c in range(concurrency)])
        metrics_before = await scrape
        metrics_after = (await scraper.get("/metrics")).text
    return {
        "concurrency": concurrency,
        "seconds": duration,
        "requests": len(latencies),
        "requests_per_s": len(latencies) / duration,
        **harness.percentiles(latencies, (50, 95, 99), unit="_ms", scale=1e3),
        "mean_ms": 1e3 * float(np.mean(latencies)) if latencies else None,
        "errors": sum(errors.values()),
        "errors_by_kind": errors,
        "batch_sizes": batch_distribution(batch_histogram(metrics_before), batch_histogram(metrics_after)),
    }


def rss_summary(samples: list[tuple[float, int]], warmup_s: float) -> dict[str, Any]:
    """Resident memory over a cell; growth compares the first and last tenth of the samples after warm-up."""
    if len(samples) < 4:
        return {"samples": len(samples)}
    rss = np.array([s for _, s in samples], np.float64)
    t = np.array([t for t, _ in samples])
    after_warmup = rss[t >= warmup_s] if (t >= warmup_s).sum() >= 2 else rss
    tail = after_warmup[-max(1, len(after_warmup) // 10) :]
    head = after_warmup[: max(1, len(after_warmup) // 10)]
    return {
        "samples": len(samples),
        "start_bytes": int(rss[0]),
        "after_warmup_bytes": int(head.mean()),
        "end_bytes": int(tail.mean()),
        "max_bytes": int(rss.max()),
        "growth_after_warmup": float(tail.mean() / head.mean() - 1.0),
    }


# ----------------------------------------------------------------------------------------- report


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    cfg = report["configs"].get(str(report["default_max_batch"]))
    if not cfg:
        return []
    cells = {c["concurrency"]: c for c in cfg["cells"]}
    out = []

    def target(name: str, value: float, met: bool) -> None:
        out.append({"target": name, "value": value, "met": met})

    if 1 in cells and 16 in cells and cells[1]["requests_per_s"]:
        ratio = cells[16]["requests_per_s"] / cells[1]["requests_per_s"]
        target("16 clients >= 3x the throughput of 1", ratio, ratio >= TARGETS["throughput_16_over_1"])
    if 1 in cells and 16 in cells and cells[1]["p50_ms"] and cells[16]["p99_ms"]:
        ratio = cells[16]["p99_ms"] / cells[1]["p50_ms"]
        target("p99 at 16 clients <= 4x the 1-client p50", ratio, ratio <= TARGETS["p99_16_over_p50_1"])
    top = max(cells)
    errors = cells[top]["errors"]
    target(f"zero errors at {top} clients over {cells[top]['seconds']:.0f} s", errors, errors == 0)
    growth = cells[top].get("rss", {}).get("growth_after_warmup")
    if growth is not None:
        name = f"server RSS growth < 5% after warm-up ({top} clients)"
        target(name, growth, growth < TARGETS["rss_growth_after_warmup"])
    return out


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"load test: {report['model']}, gallery {report['gallery_images']} images, k={report['k']}, "
        f"{report['machine']['cores']} cores; load average at start {report['load_average_at_start']}, "
        f"at end {report.get('load_average_at_end')}",
        f"{'max-batch':>9} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6} "
        f"{'mean batch':>10} {'RSS MB':>7}",
    ]
    for mb, cfg in report["configs"].items():
        for c in cfg["cells"]:
            rss = c.get("rss", {}).get("max_bytes")
            mean = c["batch_sizes"]["mean"]
            lines.append(
                f"{mb:>9} {c['concurrency']:>7} {c['requests_per_s']:>8.1f} {_f(c['p50_ms'])} "
                f"{_f(c['p95_ms'])} {_f(c['p99_ms'])} {c['errors']:>6} "
                f"{(f'{mean:.1f}' if mean else '-'):>10} {(f'{rss / 2**20:.0f}' if rss else '-'):>7}"
            )
        lines.append(f"{'':>9} shutdown: exit {cfg['shutdown']['exit_code']} in {cfg['shutdown']['seconds']:.1f} s")
    for t in report.get("targets", []):
        lines.append(f"target: {t['target']}: {t['value']:.3g} ({'met' if t['met'] else 'NOT met'})")
    return "\n".join(lines)


def _f(x: float | None) -> str:
    return f"{x:>8.1f}" if x is not None else f"{'-':>8}"


def plot(report: dict[str, Any], plt):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mb, cfg in report["configs"].items():
        conc = [c["concurrency"] for c in cfg["cells"]]
        label = "no batching (max-batch 1)" if mb == "1" else f"max-batch {mb}"
        ax1.plot(conc, [c["requests_per_s"] for c in cfg["cells"]], "o-", label=label)
        ax2.plot(conc, [c["p50_ms"] for c in cfg["cells"]], "o-", label=f"{label} p50")
        ax2.plot(conc, [c["p99_ms"] for c in cfg["cells"]], "s--", label=f"{label} p99")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ticks = sorted({c["concurrency"] for cfg in report["configs"].values() for c in cfg["cells"]})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("concurrent clients")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylabel("requests / s")
    ax2.set_ylabel("latency (ms)")
    ax2.set_yscale("log")
    la = report["load_average_at_start"]
    fig.suptitle(
        f"HTTP text search, {report['model']}, {report['gallery_images']} images, "
        f"{report['machine']['cores']} cores (load avg {la[0] if la else '?'} at start)",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------- main


def build_parser():
    p = harness.parser(__doc__, quick="tiny model, 1 s cells, 1 and 4 clients", plot="file", cache=DEFAULT_CACHE)
    p.add_argument("--duration", type=float, default=None, help="seconds measured per cell (default 20)")
    p.add_argument("--long", type=float, help="seconds for the highest concurrency of the default setting (default 60)")
    p.add_argument("--warmup", type=float, default=None, help="seconds discarded at the start of each cell")
    p.add_argument("--concurrency", default=None, help="comma-separated client counts (default 1,4,16,64)")
    p.add_argument("--batches", default=None, help="comma-separated --max-batch settings (default 1,32)")
    p.add_argument("--images", type=int, default=None, help="gallery size (default 1000)")
    p.add_argument("-k", type=int, default=10, help="results per query")
    p.add_argument("--server-args", default="", help="extra arguments for serve.py (e.g. '--max-delay-ms 2')")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    return harness.run(_run, build_parser().parse_args(argv))


def _run(args) -> int:
    quick = args.quick
    concurrency = harness.ints(args.concurrency or ("1,4" if quick else "1,4,16,64"), "concurrency")
    batches = harness.ints(args.batches or ("1,8" if quick else "1,32"), "batches")
    duration = args.duration or (1.0 if quick else 20.0)
    long = args.long or (duration if quick else 60.0)
    warmup = args.warmup if args.warmup is not None else (0.3 if quick else 2.0)
    n_images = args.images or (100 if quick else 1000)
    sizes = QUICK if quick else FULL
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "quick": quick,
        "started": harness.started(),
        "machine": harness.describe(),
        "load_average_at_start": harness.load_average(),
        "k": args.k,
        "gallery_images": n_images,
        "warmup_s": warmup,
        "default_max_batch": max(batches),
        "targets_definition": TARGETS,
        "configs": {},
    }
    manifest, report["export"] = prepare_model(sizes, "t2i", args.seed, cache)
    report["model"] = f"t2i embed {sizes.embed_size}, {sizes.regions} regions x {sizes.img_dim}"
    gallery = prepare_gallery(manifest, n_images, sizes, args.seed, cache)
    queries = caption_texts(rng_for(args.seed, 21), 1000, sizes.vocab_size)
    log = cache / "load-server.log"  # the server's warnings and errors, if any
    log.write_text("")
    for mb in batches:
        server = Server(manifest, gallery, mb, args.server_args.split(), log)
        try:
            ready_s = server.wait_ready(600)
            cells = []
            for c in concurrency:
                is_long = mb == max(batches) and c == max(concurrency)
                seconds = long if is_long else duration
                # the long cell measures memory growth: its warm-up lets ONNX Runtime's arena reach its size
                cell_warmup = max(warmup, long / 4) if is_long else warmup
                logger.info("max-batch %d, %d clients, %.0f s (+%.0f s warm-up)", mb, c, seconds, cell_warmup)
                with RssSampler(server) as rss:
                    cell = asyncio.run(drive(server.url, c, seconds, cell_warmup, queries, args.k))
                cell["warmup_s"] = cell_warmup
                cell["rss"] = rss_summary(rss.samples, cell_warmup)
                cell["load_average_after"] = harness.load_average()
                cells.append(cell)
            report["configs"][str(mb)] = {
                "max_batch": mb,
                "server_command": server.command,
                "ready_s": ready_s,
                "cells": cells,
            }
        finally:
            report["configs"].setdefault(str(mb), {"max_batch": mb, "cells": []})["shutdown"] = server.stop()
    report["load_average_at_end"] = harness.load_average()
    report["targets"] = targets(report)
    report["plot"] = (
        harness.write_plot(args.plot, lambda plt: plot(report, plt)) if args.plot else {"status": "not requested"}
    )
    harness.finish(report, format_report(report), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
