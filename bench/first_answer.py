"""Time to first answer of a new process: import, open the engine, the gallery and its candidate index, and
answer one two-stage text query; then the resident memory after ``--queries`` more (serving).

    python -m bench.first_answer --engine demo/engines/scan.json --gallery DIR --candidates M [--queries N] TEXT

Prints one JSON object: seconds per phase since the interpreter reached this module (``import_s``,
``engine_s``, ``gallery_s``, ``first_query_s`` (the index opens on the first two-stage search); ``total_s``: from
the process's start, interpreter included, to the first answer)
and ``rss_bytes`` / ``rss_anon_bytes`` after the queries (``rss_bytes`` counts the mapped gallery and index
pages the queries touched; ``rss_anon_bytes`` is the process's own memory). ``bench/scale.py
--first-answer`` runs it in a new process per gallery size, warm and (``--drop-caches``) cold.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402


def _since_exec() -> float:
    """Seconds since this process started (its start time in /proc, 10 ms ticks): the interpreter's start too."""
    import os

    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next((int(line.split()[1]) * 1024 for line in f if line.startswith(key)), 0)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", required=True, help="the model's manifest (scan.json)")
    p.add_argument("--gallery", required=True, help="an image gallery folder with its candidate index")
    p.add_argument("--candidates", type=int, required=True, help="M of two-stage search")
    p.add_argument("--queries", type=int, default=0, help="further queries (the same text) before reading RSS")
    p.add_argument("text", help="the text query")
    args = p.parse_args(argv)

    from runtime.engine import ScanEngine
    from runtime.gallery import ImageGallery
    from runtime.options import EngineOptions, SearchOptions
    from runtime.searcher import Searcher

    out = {"import_s": time.perf_counter() - T0}
    engine = ScanEngine.open(args.engine, EngineOptions(backend="onnxruntime"))
    out["engine_s"] = time.perf_counter() - T0
    gallery = ImageGallery.load(args.gallery, engine.manifest.image_encoder_id)
    out["gallery_s"] = time.perf_counter() - T0
    with Searcher(engine, images=gallery, options=SearchOptions(candidates=args.candidates)) as s:
        _, ids = s.search([args.text], 10)
        out["first_query_s"] = time.perf_counter() - T0
        out["total_s"] = _since_exec()  # from the process's start: what a user waits for
        for _ in range(args.queries):
            s.search([args.text], 10)
    out = {k: round(v, 3) for k, v in out.items()}
    out.update(
        images=len(gallery), top10=ids[0].tolist(), rss_bytes=_status("VmRSS:"), rss_anon_bytes=_status("RssAnon:")
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
