"""The plain server bench/load.py measures the service against: ``runtime/serve.py``'s FastAPI app, its
flags and its metrics, but no batcher: each search request calls the searcher itself, once, in the HTTP
layer's threadpool (what a FastAPI app around ``Searcher`` looks like without dynamic batching).

    python -m bench.plain_server --engine ENGINE --gallery DIR [serve.py's flags]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from starlette.concurrency import run_in_threadpool

from runtime import serve
from runtime.service.service import Service
from runtime.service.types import Hits


class PlainService(Service):
    """A ``Service`` whose searches bypass the batcher (appends and everything else unchanged)."""

    async def _search(self, direction: str, prepared: Any, k: int, tokenise: float) -> Hits:
        queued = time.perf_counter()

        def search() -> Hits:
            started = time.perf_counter()
            hits = self.executor.search(direction, prepared, k)
            hits.seconds["queue"] = started - queued  # waiting for a threadpool thread
            return hits

        hits = await run_in_threadpool(search)
        hits.seconds["tokenise"] = tokenise
        return hits


def main(argv: Sequence[str] | None = None) -> int:
    return serve.run(list(sys.argv[1:] if argv is None else argv), service_type=PlainService)


if __name__ == "__main__":
    sys.exit(main())
