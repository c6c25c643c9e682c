"""Thread budgets: how many threads each pool gets, computed from the cores this process may use.

One place decides them, so a 2-core and a 64-core machine both get sensible values and ``GET /v1/info``
shows what is used (docs/serving.md, "Threads", has the measurements behind the choices):

* ONNX Runtime: intra-op threads share one batch's operators; all the cores up to ``MAX_INTRA_OP`` (one
  query's GEMMs and elementwise passes stop scaling beyond that), one inter-op thread (the graphs run
  sequentially), and no spinning: an idle intra-op thread that spins steals the core from the event loop,
  the batcher and the other sessions (measured 2.5-3x slower under contention with spinning on).
* the batcher's workers: one per ``MAX_INTRA_OP`` cores, so every core has work while a batch forms.
* BLAS (numpy's, for the numpy backend and the small matrix products around the graphs): as many threads
  as ONNX Runtime's intra-op pool; threadpoolctl applies it when installed.
* the HTTP layer: one uvicorn process (the galleries are resident once and every request shares one batch
  queue) and AnyIO's threadpool for the handlers' blocking work (appends, explanations, readiness).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

logger = logging.getLogger(__name__)

MAX_INTRA_OP = 16  # intra-op threads per ONNX Runtime session, at most
HTTP_THREADPOOL = 40  # AnyIO's default: blocking handler work (appends, explanations) runs there


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or taskset's limit), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Threads:
    cores: int
    intra_op: int  # ONNX Runtime intra-op threads per session
    inter_op: int  # ONNX Runtime inter-op threads per session
    spinning: bool  # ONNX Runtime intra-op threads busy-wait for work between operators
    blas: int  # numpy's BLAS threads
    batch_workers: int  # threads executing the service's batches
    http_threadpool: int  # AnyIO worker threads of the HTTP handlers
    http_processes: int = 1  # uvicorn worker processes

    @classmethod
    def for_cores(cls, cores: int | None = None) -> Threads:
        """The defaults for ``cores`` (None: the cores this process may use)."""
        cores = available_cores() if cores is None else cores
        if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
            raise ValueError(f"cores must be a positive integer, received {cores!r}")
        intra = min(cores, MAX_INTRA_OP)
        return cls(
            cores=cores,
            intra_op=intra,
            inter_op=1,
            spinning=False,
            blas=intra,
            batch_workers=max(1, cores // MAX_INTRA_OP),
            http_threadpool=HTTP_THREADPOOL,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def limit_blas(threads: int) -> str | None:
    """Limit numpy's BLAS to ``threads`` threads (process-wide) with threadpoolctl; returns the BLAS library's
    name, or None when threadpoolctl is not installed (the BLAS keeps its own default)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        logger.info("threadpoolctl is not installed: numpy's BLAS threads are left at the library's default")
        return None
    threadpool_limits(limits=threads, user_api="blas")
    return blas_library()


def blas_library() -> str | None:
    """numpy's BLAS and its threads now, e.g. 'openblas (2 threads)'; None without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    return ", ".join(f"{i['internal_api']} ({i['num_threads']} threads)" for i in blas) or None
