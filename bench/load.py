"""Load test of the HTTP service against a plain server and the in-process search, in one run.

    python bench/load.py [--quick] [--models full,demo] [--configs ours,plain] [--concurrency 1,16,64]
                         [--duration 8] [--long S] [--variant 'greedy:--max-delay-ms 0'] [--before DIR]
                         [--json bench/results/load.json] [--plot bench/results/load.png] [--cache DIR]

Per model (``full``: a randomly initialised full-size SCAN, embed 1024, 36 regions x 2048, bi-GRU, the
export bench/latency.py uses, cached; ``demo``: the demo model at demo/engines/scan.json, skipped when it is
not built), over a gallery of 1,000 random images encoded by the model:

1. the in-process baseline: ``Searcher.search`` of one query at a time, in this process, before any server;
2. each server config as its own process on a free loopback port: ``ours`` (runtime/serve.py, its defaults),
   ``plain`` (bench/plain_server.py: the same app calling the searcher once per request in the threadpool,
   no batcher), ``--variant NAME:ARGS`` (ours with extra flags) and ``--before DIR`` (another checkout's
   runtime/serve.py, e.g. ``git worktree add /tmp/before main``: the version before, in the same run);
3. per config, 1, 16 and 64 concurrent clients, each sending one single-query ``POST /v1/search/text``
   after another for ``--duration`` s (after a warm-up): requests/s, p50/p95/p99, errors, the batch sizes
   and the time per stage of a request (parse, tokenise, queue, encode, score, topk, labels, serialise; the
   server's ``scan_stage_seconds`` read from /metrics before and after the cell: medians interpolated in
   the histogram's buckets), the server's resident memory;
4. the targets of issue 19 as ratios of figures of this run (``TARGETS``), met or not, with the load average.

The clients: one process (this one), one asyncio event loop (uvloop when installed), one keep-alive
connection per client speaking HTTP/1.1 directly over asyncio streams with the request bytes built in
advance: a request costs the client tens of microseconds, not the milliseconds of a full HTTP client, so
on a 2-core machine the clients take little of the cores they share with the server. ``--quick``: a tiny
model, 100 images, 1 and 4 clients, 1 s cells (the test's run).
"""

from __future__ import annotations

import asyncio
import json
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import harness
from bench.random_models import DEFAULT_CACHE, prepare_model
from bench.synthetic import FULL, QUICK, caption_texts, rng_for
from runtime.options import EngineOptions, WriteOptions
from runtime.stages import STAGES

logger = logging.getLogger(__name__)

SCHEMA = "scan-runtime-bench-load/2"
REPO = Path(__file__).resolve().parents[1]
SERVE = REPO / "runtime" / "serve.py"
DEMO = REPO / "demo" / "engines" / "scan.json"
# issue 19's targets, each a ratio of figures measured in the same run
TARGETS = {
    "http_p50_1_over_in_process_ms": 3.0,  # HTTP p50, one client <= in-process p50 + 3 ms
    "throughput_16_over_1": 3.0,
    "throughput_64_over_1": 4.0,  # and no error (503) at 64 clients with the default queue
    "p99_16_over_p50_1": 6.0,
    "throughput_16_over_plain": 2.0,
}


# ----------------------------------------------------------------------------------------- preparation


@dataclass(frozen=True)
class Model:
    name: str
    manifest: Path
    description: str
    queries: list[str]


def prepare_gallery(manifest: Path, n: int, seed: int, cache: Path) -> Path:
    """A gallery folder of ``n`` random images (36 regions) encoded by the model, built once, kept in the cache."""
    meta = json.loads(manifest.read_text())
    regions, img_dim = 36, int(meta["config"]["img_dim"])
    folder = cache / f"load-gallery-{meta['image_encoder_id'][:16]}-{n}-{seed}"
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
        features = np.lib.format.open_memmap(
            Path(tmp) / "regions.npy", mode="w+", dtype=np.float32, shape=(n, regions, img_dim)
        )
        for a in range(0, n, 256):  # streamed: 1K full-size images are 300 MB of features
            b = min(a + 256, n)
            features[a:b] = np.abs(rng.standard_normal((b - a, regions, img_dim), dtype=np.float32))
        features.flush()
        names = [f"image{i}" for i in range(n)]
        build_image_gallery(engine, features, folder / "images", names, WriteOptions(progress=False))
    return folder


def prepare_models(names: Sequence[str], quick: bool, seed: int, cache: Path) -> tuple[list[Model], dict[str, str]]:
    """The models asked for, and why any was skipped."""
    models, skipped = [], {}
    for name in names:
        if name in ("full", "quick"):
            sizes = QUICK if quick or name == "quick" else FULL
            manifest, _ = prepare_model(sizes, "t2i", seed, cache)
            queries = caption_texts(rng_for(seed, 21), 1000, sizes.vocab_size)
            desc = f"random t2i, embed {sizes.embed_size}, {sizes.regions} regions x {sizes.img_dim}, bi-GRU"
            models.append(Model("quick" if sizes is QUICK else "full", manifest, desc, queries))
        elif name == "demo":
            if not DEMO.is_file():
                skipped[name] = f"{DEMO} is not built (make demo)"
                continue
            caps = DEMO.parents[1] / "data" / "demo_precomp" / "test_caps.txt"
            if caps.is_file():
                queries = [line.strip() for line in caps.read_text().splitlines() if line.strip()][:1000]
            else:
                words = ["a", "red", "dog", "by", "the", "tree", "in", "picture", "white", "umbrella"]
                queries = caption_texts(rng_for(seed, 21), 1000, words)
            config = json.loads(DEMO.read_text())["config"]
            desc = f"demo t2i, embed {config['embed_size']}, 36 regions x {config['img_dim']}"
            models.append(Model("demo", DEMO, desc, queries))
        else:
            raise harness.ArgumentError(f"--models: expected full, demo or quick, received {name!r}")
    return models, skipped


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Config:
    """A server to measure: its command (after the interpreter) and the checkout it imports."""

    name: str
    command: tuple[str, ...]
    root: Path = REPO


def configs(names: Sequence[str], variants: Sequence[str], before: str | None) -> list[Config]:
    out = []
    for name in names:
        if name == "ours":
            out.append(Config("ours", (str(SERVE),)))
        elif name == "plain":
            out.append(Config("plain", ("-m", "bench.plain_server")))
        else:
            raise harness.ArgumentError(f"--configs: expected ours or plain, received {name!r}")
    for spec in variants:
        name, sep, extra = spec.partition(":")
        if not sep or not name or name in ("ours", "plain", "before"):
            raise harness.ArgumentError(f"--variant: expected NAME:ARGS (a new name), received {spec!r}")
        out.append(Config(name, (str(SERVE), *extra.split())))
    if before:
        root = Path(before).resolve()
        if not (root / "runtime" / "serve.py").is_file():
            raise harness.ArgumentError(f"--before {before}: no runtime/serve.py there")
        out.append(Config("before", (str(root / "runtime" / "serve.py"),), root))
    return out


class Server:
    """A server config as a child process."""

    def __init__(self, config: Config, manifest: Path, gallery: Path, extra: Sequence[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [
            sys.executable,
            *config.command,
            "--engine",
            str(manifest),
            "--gallery",
            str(gallery),
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            *extra,
        ]
        self.command = " ".join(cmd[1:])
        root = str(config.root)
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        with open(log, "ab") as err:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=root)

    def wait_ready(self, timeout: float) -> float:
        from runtime.client import SearchClient

        t0 = time.monotonic()
        with SearchClient(self.url, timeout=1) as client:
            while time.monotonic() - t0 < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited {self.proc.returncode}; see {self.log}")
                if client.ready():
                    return time.monotonic() - t0
                time.sleep(0.1)
        raise RuntimeError(f"the server is not ready after {timeout} s; see {self.log}")

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


# ----------------------------------------------------------------------------------------- in process


def in_process(manifest: Path, gallery: Path, queries: list[str], k: int, seconds: float) -> dict[str, Any]:
    """``Searcher.search`` of one query at a time (the engine options the server uses by default), for
    ``seconds`` after 5 warm-up queries, at least 20 queries."""
    from runtime.engine import ScanEngine
    from runtime.searcher import Searcher

    with ScanEngine.open(manifest, EngineOptions()) as engine:
        searcher = Searcher.open(engine, gallery)
        try:
            for q in queries[:5]:
                searcher.search([q], k)
            times: list[float] = []
            t_end = time.perf_counter() + seconds
            i = 0
            while time.perf_counter() < t_end or len(times) < 20:
                t0 = time.perf_counter()
                searcher.search([queries[i % len(queries)]], k)
                times.append(time.perf_counter() - t0)
                i += 1
        finally:
            searcher.close()
    return {
        "queries": len(times),
        **harness.percentiles(times, (50, 95, 99), unit="_ms", scale=1e3),
        "load_average_after": harness.load_average(),
    }


# ----------------------------------------------------------------------------------------- metrics


def _histograms(metrics: str, name: str, kind: str, by: str | None = None) -> dict[str, dict[str, float]]:
    """Prometheus text: histogram ``name``'s cumulative bucket counts by ``le``, plus ``_count`` and ``_sum``,
    of the series labelled ``kind``, per value of the label ``by`` (all under "" when None)."""
    out: dict[str, dict[str, float]] = {}
    prefix = name + "_"
    for line in metrics.splitlines():
        if not line.startswith(prefix) or f'kind="{kind}"' not in line:
            continue
        series, value = line.rsplit(" ", 1)
        h = out.setdefault(series.split(f'{by}="')[1].split('"')[0] if by else "", {})
        if series.startswith(prefix + "bucket"):
            h[series.split('le="')[1].split('"')[0]] = float(value)
        elif series.startswith(prefix + "count"):
            h["_count"] = float(value)
        elif series.startswith(prefix + "sum"):
            h["_sum"] = float(value)
    return out


def batch_histogram(metrics: str, kind: str = "text") -> dict[str, float]:
    """Cumulative ``scan_batch_size`` bucket counts by ``le``, plus ``_count`` and ``_sum``."""
    return _histograms(metrics, "scan_batch_size", kind).get("", {})


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


def stage_histograms(metrics: str, kind: str = "text") -> dict[str, dict[str, float]]:
    """Per stage, the cumulative ``scan_stage_seconds`` bucket counts by ``le``, plus ``_count`` and ``_sum``."""
    return _histograms(metrics, "scan_stage_seconds", kind, by="stage")


def stage_breakdown(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per stage during a cell: requests observed, mean ms (exact: sum / count) and median ms (interpolated
    linearly within its bucket, as Prometheus's histogram_quantile does)."""
    out: dict[str, Any] = {}
    for stage in [s for s in STAGES if s in after] + sorted(set(after) - set(STAGES)):
        b, a = before.get(stage, {}), after[stage]
        delta = {key: a[key] - b.get(key, 0.0) for key in a}
        count, total = delta.pop("_count", 0.0), delta.pop("_sum", 0.0)
        if count <= 0:
            continue
        buckets = sorted(((float("inf") if key == "+Inf" else float(key)), v) for key, v in delta.items())
        median, lower, below = None, 0.0, 0.0
        for le, cumulative in buckets:
            if cumulative >= count / 2:
                if le == float("inf"):
                    median = lower
                else:
                    inside = cumulative - below
                    median = lower + (le - lower) * ((count / 2 - below) / inside if inside else 1.0)
                break
            lower, below = le, cumulative
        out[stage] = {
            "requests": int(count),
            "mean_ms": 1e3 * total / count,
            "median_ms": None if median is None else 1e3 * median,
        }
    return out


# ----------------------------------------------------------------------------------------- load


class Connection:
    """One keep-alive HTTP/1.1 connection over asyncio streams; requests are prebuilt bytes. Cheap per
    request (no header objects, no URL parsing), so that the clients measure the server, not themselves."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, request: bytes) -> int:
        """The response's status (its body read and dropped); reconnects once after a closed connection."""
        for attempt in (0, 1):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            try:
                self.writer.write(request)
                line = await self.reader.readline()
                if not line:
                    raise ConnectionResetError("the server closed the connection")
                status, length, close = int(line.split()[1]), 0, False
                while (header := await self.reader.readline()) not in (b"\r\n", b""):
                    name, _, value = header.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"connection" and value.strip().lower() == b"close":
                        close = True
                await self.reader.readexactly(length)
                if close:
                    self.close()
                return status
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def search_requests(host: str, port: int, queries: list[str], k: int) -> list[bytes]:
    out = []
    for q in queries:
        body = json.dumps({"queries": [q], "k": k}).encode()
        head = (
            f"POST /v1/search/text HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode() + body)
    return out


async def drive(
    url: str, concurrency: int, duration: float, warmup: float, queries: list[str], k: int
) -> dict[str, Any]:
    """``concurrency`` clients, each sending one request after another until the cell ends.

    Counted: the requests that complete within the ``duration`` s after the first ``warmup`` s, whenever
    they started (at high concurrency a request can take longer than the warm-up). No retries: a load
    test counts every 503 a client would retry.
    """
    import httpx

    host, port = url.rsplit("//", 1)[1].split(":")
    requests = search_requests(host, int(port), queries, k)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    t_start = time.perf_counter()
    t_measure, t_end = t_start + warmup, t_start + warmup + duration
    # Metrics are scraped on a connection of their own: the clients' are always busy.
    async with httpx.AsyncClient(base_url=url, timeout=60) as scraper:

        async def one(c: int) -> None:
            conn = Connection(host, int(port))
            i = c
            try:
                while True:
                    t0 = time.perf_counter()
                    if t0 >= t_end:
                        return
                    try:
                        status = await conn.send(requests[i % len(requests)])
                        key = None if status == 200 else f"HTTP {status}"
                    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                        key = type(e).__name__
                    t1 = time.perf_counter()
                    if t_measure <= t1 <= t_end:
                        if key is None:
                            latencies.append(t1 - t0)
                        else:
                            errors[key] = errors.get(key, 0) + 1
                    i += concurrency
            finally:
                conn.close()

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
        "stages": stage_breakdown(stage_histograms(metrics_before), stage_histograms(metrics_after)),
    }


def run_loop(coro):
    """``asyncio.run`` on uvloop when it is installed (the clients' own overhead is then smaller)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


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


def targets(model: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 19's targets for one model's figures: each a ratio of this run's, met or not (None: a figure it
    needs was not measured, e.g. no 16-client cell)."""
    cells = {c["concurrency"]: c for c in model["configs"].get("ours", {}).get("cells", [])}
    plain = {c["concurrency"]: c for c in model["configs"].get("plain", {}).get("cells", [])}
    one, sixteen, top = cells.get(1), cells.get(16), cells.get(64)
    out = []

    def target(name: str, value: float | None, met: bool | None, load: Any = None) -> None:
        out.append({"target": name, "value": value, "met": met, "load_average": load})

    def rps(cell: dict[str, Any] | None) -> float | None:
        return cell["requests_per_s"] if cell and cell["requests_per_s"] else None

    base = model.get("in_process", {}).get("p50_ms")
    gap = one["p50_ms"] - base if one and one["p50_ms"] is not None and base is not None else None
    limit = TARGETS["http_p50_1_over_in_process_ms"]
    target(
        f"HTTP p50, 1 client <= in-process p50 + {limit:g} ms (value: the gap, ms)",
        gap,
        None if gap is None else gap <= limit,
        one and one.get("load_average_after"),
    )
    for n, cell, key in ((16, sixteen, "throughput_16_over_1"), (64, top, "throughput_64_over_1")):
        ratio = rps(cell) / rps(one) if rps(cell) and rps(one) else None
        met = None if ratio is None else ratio >= TARGETS[key] and (n != 64 or cell["errors"] == 0)
        name = f"throughput, {n} clients >= {TARGETS[key]:g}x 1 client's" + (", no error" if n == 64 else "")
        target(name, ratio, met, cell and cell.get("load_average_after"))
    if top is not None:
        target("errors (503s) at 64 clients", top["errors"], top["errors"] == 0, top.get("load_average_after"))
    ratio = sixteen["p99_ms"] / one["p50_ms"] if sixteen and one and sixteen["p99_ms"] and one["p50_ms"] else None
    limit = TARGETS["p99_16_over_p50_1"]
    target(
        f"p99 at 16 clients <= {limit:g}x 1 client's p50",
        ratio,
        None if ratio is None else ratio <= limit,
        sixteen and sixteen.get("load_average_after"),
    )
    ratio = rps(sixteen) / rps(plain.get(16)) if rps(sixteen) and rps(plain.get(16)) else None
    limit = TARGETS["throughput_16_over_plain"]
    target(
        f"throughput at 16 clients >= {limit:g}x the plain server's",
        ratio,
        None if ratio is None else ratio >= limit,
        sixteen and sixteen.get("load_average_after"),
    )
    return out


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"load test: gallery {report['gallery_images']} images, k={report['k']}, {report['machine']['cores']} "
        f"cores; load average at start {report['load_average_at_start']}, at end {report.get('load_average_at_end')}",
    ]
    for name, skipped in report.get("skipped_models", {}).items():
        lines.append(f"model {name}: skipped: {skipped}")
    for name, m in report["models"].items():
        ip = m["in_process"]
        lines += [
            "",
            f"model {name}: {m['model']}",
            f"  in-process Searcher.search, 1 query: p50 {_f(ip['p50_ms']).strip()} ms, p95 "
            f"{_f(ip['p95_ms']).strip()} ms ({ip['queries']} queries; load average after {ip['load_average_after']})",
            f"  {'config':>8} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6} "
            f"{'mean batch':>10} {'RSS MB':>7} {'load avg':>8}",
        ]
        for cname, cfg in m["configs"].items():
            for c in cfg["cells"]:
                rss = c.get("rss", {}).get("max_bytes")
                mean = c["batch_sizes"]["mean"]
                la = c.get("load_average_after")
                lines.append(
                    f"  {cname:>8} {c['concurrency']:>7} {c['requests_per_s']:>8.1f} {_f(c['p50_ms'])} "
                    f"{_f(c['p95_ms'])} {_f(c['p99_ms'])} {c['errors']:>6} "
                    f"{(f'{mean:.1f}' if mean else '-'):>10} {(f'{rss / 2**20:.0f}' if rss else '-'):>7} "
                    f"{(f'{la[0]:.1f}' if la else '-'):>8}"
                )
            shutdown = cfg.get("shutdown")
            if shutdown:
                lines.append(f"  {'':>8} shutdown: exit {shutdown['exit_code']} in {shutdown['seconds']:.1f} s")
        lines.append("  median ms per stage (from the server's scan_stage_seconds; encode..labels: the batch's):")
        lines.append(f"  {'config':>8} {'clients':>7} " + " ".join(f"{s:>9}" for s in STAGES))
        for cname, cfg in m["configs"].items():
            for c in cfg["cells"]:
                st = c.get("stages") or {}
                values = [st.get(s, {}).get("median_ms") for s in STAGES]
                lines.append(
                    f"  {cname:>8} {c['concurrency']:>7} "
                    + " ".join(f"{v:>9.2f}" if v is not None else f"{'-':>9}" for v in values)
                )
        for t in m.get("targets", []):
            status = "not measured" if t["met"] is None else ("met" if t["met"] else "NOT met")
            value = "-" if t["value"] is None else f"{t['value']:.3g}"
            la = t.get("load_average")
            lines.append(f"  target: {t['target']}: {value} ({status}; load average {la[0] if la else '?'})")
    return "\n".join(lines)


def _f(x: float | None) -> str:
    return f"{x:>8.1f}" if x is not None else f"{'-':>8}"


def plot(report: dict[str, Any], plt):
    models = list(report["models"].items())
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4.0 * len(models)), squeeze=False)
    for (name, m), (ax1, ax2) in zip(models, axes):
        for i, (cname, cfg) in enumerate(m["configs"].items()):
            conc = [c["concurrency"] for c in cfg["cells"]]
            color = f"C{i}"  # one colour per server: its throughput, p50 (solid) and p99 (dashed)
            ax1.plot(conc, [c["requests_per_s"] for c in cfg["cells"]], "o-", color=color, label=cname)
            ax2.plot(conc, [c["p50_ms"] for c in cfg["cells"]], "o-", color=color, label=f"{cname} p50")
            ax2.plot(conc, [c["p99_ms"] for c in cfg["cells"]], "s--", color=color, label=f"{cname} p99")
        base = m["in_process"]["p50_ms"]
        if base:
            ax2.axhline(base, color="grey", lw=0.8, ls=":", label="in-process p50")
        for ax in (ax1, ax2):
            ax.set_xscale("log", base=2)
            ticks = sorted({c["concurrency"] for cfg in m["configs"].values() for c in cfg["cells"]})
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.set_xlabel("concurrent clients")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        ax1.set_ylabel("requests / s")
        ax1.set_title(f"{name}: {m['model']}", fontsize=9)
        ax2.set_ylabel("latency (ms)")
        ax2.set_yscale("log")
    la = report["load_average_at_start"]
    fig.suptitle(
        f"HTTP text search, {report['gallery_images']} images, {report['machine']['cores']} cores "
        f"(load avg {la[0] if la else '?'} at start)",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------- main


def build_parser():
    p = harness.parser(
        __doc__, quick="tiny model, 100 images, 1 s cells, 1 and 4 clients", plot="file", cache=DEFAULT_CACHE
    )
    p.add_argument("--models", default=None, help="comma-separated: full, demo, quick (default full,demo)")
    p.add_argument("--configs", default="ours,plain", help="comma-separated servers: ours, plain")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:ARGS", help="ours with extra flags")
    p.add_argument("--before", help="another checkout whose runtime/serve.py is measured too (as 'before')")
    p.add_argument("--duration", type=float, default=None, help="seconds measured per cell (default 8)")
    p.add_argument("--long", type=float, help="seconds for the 64-client cell of ours (default --duration)")
    p.add_argument("--warmup", type=float, default=None, help="seconds discarded at the start of each cell")
    p.add_argument("--concurrency", default=None, help="comma-separated client counts (default 1,16,64)")
    p.add_argument("--images", type=int, default=None, help="gallery size (default 1000)")
    p.add_argument("--in-process-s", type=float, default=None, help="seconds of in-process searches (default 5)")
    p.add_argument("-k", type=int, default=10, help="results per query")
    p.add_argument("--server-args", default="", help="extra arguments for every server (e.g. '--threads 1')")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    return harness.run(_run, build_parser().parse_args(argv))


def _run(args) -> int:
    quick = args.quick
    concurrency = harness.ints(args.concurrency or ("1,4" if quick else "1,16,64"), "concurrency")
    duration = args.duration or (1.0 if quick else 8.0)
    long = args.long or duration
    warmup = args.warmup if args.warmup is not None else (0.3 if quick else 2.0)
    n_images = args.images or (100 if quick else 1000)
    in_process_s = args.in_process_s or (0.5 if quick else 5.0)
    model_names = [m.strip() for m in (args.models or ("quick" if quick else "full,demo")).split(",") if m.strip()]
    servers = configs([c.strip() for c in args.configs.split(",") if c.strip()], args.variant, args.before)
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
        "clients": "one process, asyncio (uvloop when installed), one keep-alive connection per client, raw HTTP/1.1",
        "targets_definition": TARGETS,
        "models": {},
    }
    models, report["skipped_models"] = prepare_models(model_names, quick, args.seed, cache)
    log = cache / "load-server.log"  # the servers' warnings and errors, if any
    log.write_text("")
    for model in models:
        gallery = prepare_gallery(model.manifest, n_images, args.seed, cache)
        logger.info("%s: in-process searches, %.0f s", model.name, in_process_s)
        out: dict[str, Any] = {
            "model": model.description,
            "engine": str(model.manifest),
            "in_process": in_process(model.manifest, gallery, model.queries, args.k, in_process_s),
            "configs": {},
        }
        report["models"][model.name] = out
        for config in servers:
            server = Server(config, model.manifest, gallery, args.server_args.split(), log)
            try:
                ready_s = server.wait_ready(600)
                cells = []
                for c in concurrency:
                    is_long = config.name == "ours" and c == max(concurrency) and long > duration
                    seconds = long if is_long else duration
                    # a long cell measures memory growth: its warm-up lets ONNX Runtime's arena reach its size
                    cell_warmup = max(warmup, long / 4) if is_long else warmup
                    logger.info(
                        "%s, %s, %d clients, %.0f s (+%.0f s warm-up)", model.name, config.name, c, seconds, cell_warmup
                    )
                    with RssSampler(server) as rss:
                        cell = run_loop(drive(server.url, c, seconds, cell_warmup, model.queries, args.k))
                    cell["warmup_s"] = cell_warmup
                    cell["rss"] = rss_summary(rss.samples, cell_warmup)
                    cell["load_average_after"] = harness.load_average()
                    cells.append(cell)
                out["configs"][config.name] = {"server_command": server.command, "ready_s": ready_s, "cells": cells}
            finally:
                out["configs"].setdefault(config.name, {"cells": []})["shutdown"] = server.stop()
        out["targets"] = targets(out)
    report["load_average_at_end"] = harness.load_average()
    report["plot"] = (
        harness.write_plot(args.plot, lambda plt: plot(report, plt)) if args.plot else {"status": "not requested"}
    )
    harness.finish(report, format_report(report), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
