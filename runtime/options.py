"""Options as values: how an engine is opened, how a search runs, how a gallery is written.

Each is a frozen dataclass checked on construction, passed whole through the layers (CLI -> service ->
searcher -> backend) instead of as separate keyword parameters, and held by what it configures
(``ScanEngine.options``, ``Searcher.options``). ``dataclasses.replace(options, candidates=0)`` derives one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

PRECISIONS = ("fp32", "fp16")
DEVICES = ("cpu", "cuda")
# int8: image caches only, approximate (runtime/gallery/quantize.py); float16/float32 are exact for their values.
GALLERY_DTYPES = ("float32", "float16", "int8")
CAPTION_DTYPES = ("float32", "float16")
# Where a two-stage search of an ensemble takes its candidates: every member's index (the union of their
# proposals; up to members x M items scored) or the first member's only (M items; cheaper, lower recall).
CANDIDATE_SOURCES = ("union", "first")
# How a two-stage search finds its candidates: the cheapest of exact search, a dense MaxSim and the index by the
# measured cost model (runtime/search_plan.py), or always the dense MaxSim, or always the index.
CANDIDATE_PLANS = ("auto", "dense", "index")
# "auto" or a faiss index family (runtime/gallery/index.py); None: no candidate index is built.
INDEX_KINDS = ("auto", "flat", "ivf", "ivfsq", "ivfpq", "hnsw")
DEFAULT_LOCK_TIMEOUT = 600.0


class OptionsError(ValueError):
    """An option outside its allowed values (names the option, what was expected and what was received)."""


def _positive_int(name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise OptionsError(f"{name} must be a positive integer, received {v!r}")


def _non_negative_int(name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise OptionsError(f"{name} must be a non-negative integer, received {v!r}")


def _one_of(name: str, v: object, allowed: tuple) -> None:
    if v not in allowed:
        raise OptionsError(f"{name} must be one of {', '.join(map(repr, allowed))}, received {v!r}")


class _Options:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EngineOptions(_Options):
    """How an export is opened: ``backend`` ("auto", "onnxruntime", "tensorrt", "numpy", "cupy"; checked
    by ``runtime.backends.choose_backend``), ``precision`` fp32 (exact) or fp16, ONNX Runtime ``device``,
    intra-op ``threads`` (None: the backend's default)."""

    backend: str = "auto"
    precision: str = "fp32"
    device: str = "cpu"
    threads: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.backend, str):
            raise OptionsError(f"backend must be a string, received {self.backend!r}")
        _one_of("precision", self.precision, PRECISIONS)
        _one_of("device", self.device, DEVICES)
        if self.threads is not None:
            _positive_int("threads", self.threads)


@dataclass(frozen=True)
class SearchOptions(_Options):
    """How a search runs.

    ``image_block`` / ``caption_block``: gallery items scored per head call (memory is bounded by them);
    ``query_batch``: queries per head call; ``resident``: keep the galleries in the head backend's memory
    (None: the backend's choice). ``candidates``: two-stage search (docs/two_stage.md): the candidate index
    proposes this many items per query and only those are scored exactly; 0 scores every item.
    ``neighbors`` / ``nprobe`` tune the index search (None: its defaults); ``candidate_source``: see
    ``CANDIDATE_SOURCES``; ``candidate_plan``: see ``CANDIDATE_PLANS``.
    """

    image_block: int = 512
    caption_block: int = 2048
    query_batch: int = 32
    resident: bool | None = None
    candidates: int = 0
    neighbors: int | None = None
    nprobe: int | None = None
    candidate_source: str = "union"
    candidate_plan: str = "auto"

    def __post_init__(self) -> None:
        for name in ("image_block", "caption_block", "query_batch"):
            _positive_int(name, getattr(self, name))
        _non_negative_int("candidates", self.candidates)
        for name in ("neighbors", "nprobe"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.resident not in (None, True, False):
            raise OptionsError(f"resident must be True, False or None, received {self.resident!r}")
        _one_of("candidate_source", self.candidate_source, CANDIDATE_SOURCES)
        _one_of("candidate_plan", self.candidate_plan, CANDIDATE_PLANS)


@dataclass(frozen=True)
class WriteOptions(_Options):
    """How a gallery is written: the cache's ``dtype``; ``append`` to the gallery there (False replaces
    it); ``progress`` bars; ``lock_timeout`` seconds a writer waits for another; ``index``: also build the
    candidate index of two-stage search (``INDEX_KINDS``; an existing index is extended on append anyway);
    ``key``: the write's idempotency key, recorded with the generation it commits (``store.Repeated``)."""

    dtype: str = "float32"
    append: bool = False
    progress: bool = True
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    index: str | None = None
    key: str | None = None  # an idempotency key: a write it already committed is not applied again

    def __post_init__(self) -> None:
        _one_of("dtype", self.dtype, GALLERY_DTYPES)
        if (
            not isinstance(self.lock_timeout, (int, float))
            or isinstance(self.lock_timeout, bool)
            or self.lock_timeout < 0
        ):
            raise OptionsError(f"lock_timeout must be a non-negative number of seconds, received {self.lock_timeout!r}")
        if self.index is not None:
            _one_of("index", self.index, INDEX_KINDS)
