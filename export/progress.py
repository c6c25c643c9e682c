"""Progress lines of the export CLIs (to_onnx.py, build_engine.py), kept here so an export imports no
runtime CLI module (and with it the engine, galleries and searcher)."""

from __future__ import annotations

import time
from collections.abc import Callable


def timed_progress() -> Callable[[str], None]:
    """A progress printer: each line prefixed with the seconds since this call."""
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    return progress
