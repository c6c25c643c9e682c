"""ONNX Runtime's thread settings for one query: intra-op threads and spinning, alone and under contention.

    python bench/threads.py [--quick] [--models full,demo] [--rounds 30] [--json bench/results/threads.json]

What one text query against 1,000 cached images runs (its text-encoder call and the head's calls over the
gallery blocks, recorded from a real ``Searcher.search`` and replayed) is timed on fresh sessions for each
setting: ``intra_op`` 1 and all the cores, spinning on and off (runtime/threads.py chooses the defaults).
Two situations: ``alone`` (one thread replays, as a one-client server) and ``contended`` (two threads replay
at once, as two batch workers, or a worker beside the event loop and the clients on the same cores):
median ms per query, and queries/s of the two together. The settings are timed in alternation, round by
round, so the machine's load falls on all alike; the load average is recorded.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench import harness
from bench.load import prepare_gallery, prepare_models
from bench.random_models import DEFAULT_CACHE
from runtime.backends.onnxruntime import open_session
from runtime.threads import available_cores

logger = logging.getLogger(__name__)

SCHEMA = "scan-runtime-bench-threads/1"


def record_calls(manifest: Path, gallery: Path, query: str) -> list[tuple[Path, dict[str, np.ndarray]]]:
    """The (graph, feeds) of every ONNX Runtime call one ``Searcher.search([query], 10)`` makes."""
    from runtime.engine import ScanEngine
    from runtime.options import EngineOptions
    from runtime.searcher import Searcher

    calls: list[tuple[Path, dict[str, np.ndarray]]] = []
    with ScanEngine.open(manifest, EngineOptions(backend="onnxruntime")) as engine:
        for backend in (engine.text, engine.head):
            run = backend.run

            def recorded(feeds, run=run, path=backend.path):
                calls.append((path, {k: np.array(v) for k, v in feeds.items()}))
                return run(feeds)

            backend.run = recorded
        searcher = Searcher.open(engine, gallery)
        searcher.search([query], 10)
        searcher.close()
    return calls


def replayer(calls: list[tuple[Path, dict[str, np.ndarray]]], threads: int, spinning: bool):
    """A function running the recorded calls on sessions of its own with these settings."""
    sessions = {path: open_session(path, threads=threads, spinning=spinning) for path in {p for p, _ in calls}}

    def replay() -> None:
        for path, feeds in calls:
            sessions[path].run(None, feeds)

    return replay


def measure(replay, contended: bool, rounds: int) -> dict[str, Any]:
    """Median ms per query over ``rounds`` queries (per thread), and queries/s of all threads."""
    replay()  # warm-up: arenas, first-run allocations
    n_threads = 2 if contended else 1
    times: list[list[float]] = [[] for _ in range(n_threads)]

    def work(i: int) -> None:
        for _ in range(rounds):
            t0 = time.perf_counter()
            replay()
            times[i].append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    workers = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    flat = [t for ts in times for t in ts]
    return {"median_ms": 1e3 * float(np.median(flat)), "queries_per_s": len(flat) / wall}


def build_parser():
    p = harness.parser(__doc__, quick="the tiny model, 3 rounds", cache=DEFAULT_CACHE)
    p.add_argument("--models", default=None, help="comma-separated: full, demo, quick (default full,demo)")
    p.add_argument("--rounds", type=int, default=None, help="queries per setting and situation (default 30)")
    p.add_argument("--repeats", type=int, default=3, help="alternating passes over the settings")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return harness.run(_run, build_parser().parse_args(argv))


def _run(args) -> int:
    rounds = args.rounds or (3 if args.quick else 30)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    names = [m.strip() for m in (args.models or ("quick" if args.quick else "full,demo")).split(",") if m.strip()]
    models, skipped = prepare_models(names, args.quick, args.seed, cache)
    cores = available_cores()
    settings = [(t, s) for t in sorted({1, cores}) for s in (False, True)]
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "started": harness.started(),
        "machine": harness.describe(),
        "load_average_at_start": harness.load_average(),
        "rounds": rounds,
        "skipped_models": skipped,
        "models": {},
    }
    lines = [f"ONNX Runtime threads, one text query vs 1,000 images, {cores} cores"]
    for model in models:
        gallery = prepare_gallery(model.manifest, 100 if args.quick else 1000, args.seed, cache)
        calls = record_calls(model.manifest, gallery, model.queries[0])
        replays = {(t, s): replayer(calls, t, s) for t, s in settings}
        samples: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for _ in range(args.repeats):  # alternation: the machine's load falls on every setting alike
            for (t, s), replay in replays.items():
                for situation in ("alone", "contended"):
                    key = f"intra_op={t} spinning={'on' if s else 'off'}"
                    samples.setdefault(key, {}).setdefault(situation, []).append(
                        measure(replay, situation == "contended", rounds)
                    )
        out = {}
        for key, by in samples.items():
            out[key] = {
                situation: {
                    "median_ms": float(np.median([r["median_ms"] for r in runs])),
                    "queries_per_s": float(np.median([r["queries_per_s"] for r in runs])),
                }
                for situation, runs in by.items()
            }
        report["models"][model.name] = {"model": model.description, "calls_per_query": len(calls), "settings": out}
        lines += ["", f"model {model.name}: {model.description} ({len(calls)} ONNX Runtime calls per query)"]
        lines.append(f"  {'setting':<28} {'alone ms':>9} {'2 threads ms':>12} {'2 threads q/s':>13}")
        for key, r in out.items():
            lines.append(
                f"  {key:<28} {r['alone']['median_ms']:>9.1f} {r['contended']['median_ms']:>12.1f} "
                f"{r['contended']['queries_per_s']:>13.1f}"
            )
    report["load_average_at_end"] = harness.load_average()
    lines.append(f"load average at start {report['load_average_at_start']}, at end {report['load_average_at_end']}")
    harness.finish(report, "\n".join(lines), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
