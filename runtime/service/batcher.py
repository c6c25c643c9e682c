"""Dynamic batching: merge concurrent requests into one executor call, split the results back.

Requests are queued (bounded, in queries); each worker thread takes the oldest request and adds every
later compatible one (same direction, same region count for image queries) up to ``max_batch`` queries.
A batch forms while the worker is busy: what queued up during one batch is the next, run as soon as the
worker is free. With ``max_delay_ms`` > 0 (default 5) the worker also waits for batch-mates it expects: while
its batch is smaller than the previous one (many clients are sending), for at most that long (Triton's
dynamic batcher's delay); after a batch of one, a request that finds the worker idle still runs at once, so
one client never waits for batch-mates that cannot come (docs/serving.md, "Batching", has the measurements).
The batch runs at the largest ``k`` asked for and each request gets its own rows cut to its own ``k``; a
top-k is exact for every smaller k, so a request's result does not depend on its batch-mates. Neither does
its outcome: when a batch fails, each of its requests is run again alone, so only the request that causes a
failure gets it.

The batcher knows nothing of HTTP or of the model: ``execute(direction, queries, k) -> Hits`` is all it calls;
queries are prepared before they are queued (``runtime.searcher.Queries``: a batch joins its requests' with
``concat``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from runtime.service.settings import Batching
from runtime.service.types import Hits

logger = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The queue holds ``max_queue`` queries already: the caller should retry later."""

    def __init__(self, pending: int, limit: int, received: int, retry_after: float) -> None:
        super().__init__(f"queue full: {pending} queries waiting (limit max_queue={limit}), received {received} more")
        self.retry_after = retry_after


class BatcherClosed(RuntimeError):
    """The service is shutting down and takes no new requests."""


@dataclass
class _Job:
    direction: str
    key: Hashable  # jobs merge only with jobs of the same key
    queries: Any  # prepared queries: a Sized with concat
    k: int
    future: Future
    arrived: float = field(default_factory=time.monotonic)

    @property
    def n(self) -> int:
        return len(self.queries)


def merge_queries(jobs: list[_Job]) -> Any:
    return jobs[0].queries if len(jobs) == 1 else type(jobs[0].queries).concat([j.queries for j in jobs])


class Batcher:
    def __init__(
        self,
        execute: Callable[[str, Any, int], Hits],
        settings: Batching | None = None,
        on_batch: Callable[[str, int, float], None] | None = None,
    ) -> None:
        """``on_batch(direction, queries, seconds)`` is called after every executed batch (metrics)."""
        self.execute = execute
        self.settings = settings or Batching()
        self.on_batch = on_batch
        self._queue: deque[_Job] = deque()
        self._pending = 0  # queries in the queue
        self._cond = threading.Condition()
        self._closing = False
        self._threads: list[threading.Thread] = []
        self._batch_seconds = 0.01  # running estimate, for Retry-After
        self._last_batch = 1  # queries in the last batch taken: how many batch-mates to expect

    @property
    def depth(self) -> int:
        """Queries waiting (not yet taken by a worker)."""
        return self._pending

    def start(self) -> None:
        if self._threads:
            return
        for i in range(self.settings.workers):
            t = threading.Thread(target=self._work, name=f"batcher-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def submit(self, direction: str, queries: Any, k: int, key: Hashable = None) -> Future:
        """Queue one request; the future resolves to its ``Hits`` (or the exception its search raised)."""
        job = _Job(direction, (direction, key), queries, k, Future())
        with self._cond:
            if self._closing:
                raise BatcherClosed("the service is shutting down")
            limit = self.settings.max_queue
            if self._pending + job.n > limit:
                batches_ahead = 1 + self._pending // self.settings.max_batch
                raise QueueFull(
                    self._pending, limit, job.n, retry_after=batches_ahead * self._batch_seconds / self.settings.workers
                )
            self._queue.append(job)
            self._pending += job.n
            self._cond.notify_all()
        return job.future

    def close(self, timeout: float = 30.0) -> None:
        """Take no new requests, finish the queued ones, stop the workers."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            logger.warning("batcher workers still running after %.0f s: %s", timeout, ", ".join(alive))

    # ------------------------------------------------------------------ workers

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _next_batch(self) -> list[_Job] | None:
        s = self.settings
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch, n = [first], first.n
            while n < s.max_batch:  # everything compatible that is queued already
                job = self._take(first.key, s.max_batch - n)
                if job is None:
                    break
                batch.append(job)
                n += job.n
            expected = min(self._last_batch, s.max_batch)
            deadline = time.monotonic() + s.max_delay_ms / 1000.0
            while n < expected and not self._closing:  # batch-mates are expected: wait for them, bounded
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
                while n < s.max_batch and (job := self._take(first.key, s.max_batch - n)) is not None:
                    batch.append(job)
                    n += job.n
            self._pending -= n
            self._last_batch = n
        # A request whose caller went away (cancelled future) is dropped here, not computed.
        return [j for j in batch if j.future.set_running_or_notify_cancel()]

    def _take(self, key: Hashable, room: int) -> _Job | None:
        """The oldest queued job with ``key`` that fits in ``room`` queries, removed from the queue."""
        for i, job in enumerate(self._queue):
            if job.key == key and job.n <= room:
                del self._queue[i]
                return job
        return None

    def _run(self, batch: list[_Job]) -> None:
        direction = batch[0].direction
        queries = merge_queries(batch)
        k = max(j.k for j in batch)
        taken = time.monotonic()
        t0 = time.perf_counter()
        try:
            hits = self.execute(direction, queries, k)
            if len(hits) != len(queries):
                raise RuntimeError(f"executor returned {len(hits)} result rows for {len(queries)} queries")
        except BaseException as e:
            if len(batch) == 1:
                batch[0].future.set_exception(e)
                return
            logger.debug("batch of %d requests failed (%s); running each alone", len(batch), e)
            for job in batch:
                self._run([job])
            return
        seconds = time.perf_counter() - t0
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        if self.on_batch is not None:
            self.on_batch(direction, len(queries), seconds)
        start = 0
        for job in batch:
            rows = hits.rows(start, start + job.n, job.k)
            rows.seconds["queue"] = taken - job.arrived  # from its arrival to its batch's start
            job.future.set_result(rows)
            start += job.n
