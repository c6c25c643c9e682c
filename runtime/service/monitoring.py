"""Prometheus metrics of one service instance (its own registry, so several can live in one process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A stage takes from microseconds (top-k, labels) to seconds (a long queue): finer buckets, so that a median
# read from them (bench/load.py) is within a bucket's width of the truth.
STAGE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
    0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


def batch_buckets(max_batch: int) -> tuple[float, ...]:
    """Every size up to 16, then powers of two, and ``max_batch`` itself: the distribution is readable."""
    sizes = set(range(1, min(max_batch, 16) + 1)) | {2**i for i in range(max_batch.bit_length() + 1)} | {max_batch}
    return tuple(float(s) for s in sorted(sizes) if s <= max_batch)


class Monitoring:
    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self, max_batch: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "scan_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "scan_request_seconds",
            "HTTP request latency by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "scan_batch_size", "queries per executed batch", ["kind"], buckets=batch_buckets(max_batch), registry=r
        )
        self.batch_seconds = Histogram(
            "scan_batch_seconds", "executor time per batch", ["kind"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.stage_seconds = Histogram(
            "scan_stage_seconds",
            "seconds a search request spent in each stage (parse, tokenise, queue, encode, score, topk, labels, "
            "serialise; encode to labels: its batch's)",
            ["kind", "stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("scan_requests_in_flight", "API requests (/v1/...) being handled", registry=r)
        self.queue_depth = Gauge("scan_queue_depth", "queries waiting for a batch", registry=r)
        self.gallery_size = Gauge("scan_gallery_size", "items in each gallery", ["kind"], registry=r)
        self.appended = Counter("scan_appended", "items appended to each gallery while serving", ["kind"], registry=r)

    def watch(self, queue_depth: Callable[[], float], gallery_size: Callable[[str], float]) -> None:
        self.queue_depth.set_function(queue_depth)
        for kind in ("images", "captions"):
            self.gallery_size.labels(kind).set_function(lambda kind=kind: gallery_size(kind))

    def record_batch(self, kind: str, size: int, seconds: float) -> None:
        self.batch_size.labels(kind).observe(size)
        self.batch_seconds.labels(kind).observe(seconds)

    def record_stages(self, kind: str, seconds: dict[str, float]) -> None:
        for stage, s in seconds.items():
            self.stage_seconds.labels(kind, stage).observe(s)

    def record_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
