"""Batching settings and request limits of the search service (what ``GET /v1/info`` reports)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from runtime.threads import Threads

MiB = 1 << 20
# Regions per image when the model does not fix them (an ONNX graph's R is dynamic): bottom-up attention
# features have 10 to 100 (36 in the paper's setting); a query's cost grows with its regions.
DEFAULT_MAX_REGIONS = 100


@dataclass(frozen=True)
class Batching:
    max_batch: int = 32  # queries merged into one executor call
    # how long a batch may wait for the batch-mates it expects (as many as the last batch had; after a batch
    # of one, none: a lone request runs at once); 0: never (docs/serving.md, "Batching", has both measured)
    max_delay_ms: float = 5.0
    workers: int = field(default_factory=lambda: Threads.for_cores().batch_workers)  # threads executing batches
    max_queue: int = 512  # queries waiting; beyond it requests get 503 + Retry-After

    def __post_init__(self) -> None:
        for name in ("max_batch", "workers", "max_queue"):
            _positive_int(name, getattr(self, name))
        if not isinstance(self.max_delay_ms, (int, float)) or self.max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be a number >= 0, received {self.max_delay_ms!r}")


@dataclass(frozen=True)
class Limits:
    max_queries: int = 64  # queries in one search request
    max_k: int = 1000
    max_caption_chars: int = 2000  # per caption, searched or appended
    max_body_bytes: int = 32 * MiB  # search requests
    max_append_bytes: int = 256 * MiB  # gallery appends
    max_append_items: int = 100_000  # images or captions in one append
    max_regions: int | None = None  # regions per image; None: the model's count when it fixes one, else 100
    header_timeout_s: float = 10.0  # a connection's request line and headers must arrive within it
    body_timeout_s: float = 60.0  # a request's body must arrive within it (from the end of its headers)

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name.endswith("_s"):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                    raise ValueError(f"{name} must be a number > 0, received {value!r}")
            elif not (name == "max_regions" and value is None):
                _positive_int(name, value)


@dataclass(frozen=True)
class Settings:
    batching: Batching = field(default_factory=Batching)
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if self.limits.max_queries > self.batching.max_queue:
            raise ValueError(
                f"max_queries ({self.limits.max_queries}) must not exceed max_queue "
                f"({self.batching.max_queue}): such a request could never be queued"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"batching": asdict(self.batching), "limits": asdict(self.limits)}


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, received {value!r}")
