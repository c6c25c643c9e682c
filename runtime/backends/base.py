"""The one small interface every backend implements (Polygraphy's split of loading and running).

A backend runs one graph or plan (``run``) and owns *placement* for gallery search, the way faiss picks
CPU or GPU by index type:

* ``limits`` -- the largest size along axis 0 it accepts per input (a TensorRT profile's max; empty
  when unlimited). Callers cap their blocks and batches to it.
* ``upload(blocks, resident=None)`` -- take a gallery once, as blocks of head inputs, and keep it where
  this backend scores best (``resident=False`` forces host arrays): host arrays streamed per search
  (the default), OrtValues on the CUDA device (ONNX Runtime), device buffers (TensorRT; a future
  CuPy array backend: fp16 on the GPU). Returns a :class:`GalleryBlocks` to ``close()`` when done.
* ``block_topk(gallery, queries, k, axis)`` -- score query feeds against every block and yield the
  block's top-k per query: ``(scores (q, k'), rows (q, k'))``, ``k' <= k``, scores float32 descending
  with ties to the lower row, rows int64 positions in the gallery. ``axis`` is the gallery's axis of
  the head's ``sims`` output (N images, Q captions): 0 when images are the gallery, 1 for captions.
  The default runs ``run`` and ``runtime.topk.block_topk`` on the host; TensorRT runs its top-k plan
  on the device so only (k, q) values come back. The caller merges blocks with ``RunningTopK``, so a
  sharded service can implement the same two calls per shard.
* ``block_sims(gallery, queries, axis)`` -- the blocks' whole similarity rows ``(offset, scores (q, B))``,
  for callers that combine several models' scores before the top-k (a Searcher of several members).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.backends.convert import cast
from runtime.topk import block_topk

# One gallery block: (offset of its first row in the gallery, head inputs for its rows).
Block = tuple[int, Mapping[str, Any]]


class GalleryBlocks:
    """A gallery as a backend holds it: its blocks in order, re-iterable; ``close()`` frees what was uploaded.

    ``blocks`` is either a sequence of blocks (uploaded once) or a callable returning a fresh iterator of
    blocks (host arrays read per search, so memory stays bounded by one block).
    """

    def __init__(
        self, blocks: Callable[[], Iterable[Block]] | list[Block], release: Callable[[], None] | None = None
    ) -> None:
        self._blocks = blocks
        self._release = release

    def __iter__(self) -> Iterator[Block]:
        return iter(self._blocks() if callable(self._blocks) else self._blocks)

    def close(self) -> None:
        release, self._release = self._release, None
        self._blocks = []
        if release is not None:
            release()

    def __enter__(self) -> GalleryBlocks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BackendError(RuntimeError):
    """A backend cannot be opened or cannot run; the message says which file and why."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple[Any, ...]  # ints, or strings for dynamic dimensions


class Backend(abc.ABC):
    """``run(feeds) -> outputs`` over named numpy arrays; opened and closed as a context manager.

    Implementations must be safe to call from several threads (each keeps per-thread execution state
    where the library needs it).
    """

    name: str = "backend"
    # Filled by each backend when it opens its graph or engine.
    _inputs: list[TensorSpec]
    _outputs: list[TensorSpec]

    @property
    def inputs(self) -> list[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self._outputs

    @abc.abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None:  # noqa: B027 - a no-op by default: a backend without resources need not override it
        """Release sessions, contexts and device memory; idempotent."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    # ------------------------------------------------------------------ placement (see the module docstring)

    @property
    def limits(self) -> dict[str, int]:
        """``{input: largest size along axis 0}``; an input not listed is unlimited."""
        return {}

    def host_feeds(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Numpy feeds cast to the inputs' dtypes; anything else (already on a device) is passed through."""
        dtypes = {t.name: t.dtype for t in self.inputs}
        return {k: (cast(v, dtypes[k]) if k in dtypes else v) for k, v in feeds.items()}

    def upload(self, blocks: Callable[[], Iterable[Block]], resident: bool | None = None) -> GalleryBlocks:
        """Hold a gallery for ``block_topk``; ``blocks()`` yields its blocks. ``resident``: keep it in the
        backend's memory (True), read the host arrays per search (False), or the backend's choice (None).

        The default keeps the host arrays (often memory-mapped) and reads them per search.
        """
        return GalleryBlocks(blocks)

    def block_topk(
        self, gallery: GalleryBlocks, queries: Mapping[str, np.ndarray], k: int, axis: int, output: str = "sims"
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Per block of ``gallery``: the top-k gallery rows of each query, ``(scores (q, k'), rows (q, k'))``."""
        for offset, scores in self.block_sims(gallery, queries, axis, output):
            rows = np.arange(offset, offset + scores.shape[1], dtype=np.int64)
            yield block_topk(scores, k, rows)

    def block_sims(
        self, gallery: GalleryBlocks, queries: Mapping[str, np.ndarray], axis: int, output: str = "sims"
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Per block of ``gallery``: ``(offset, scores (q, block))``, float32 on the host. What a Searcher of
        several members combines across models before its top-k; a single model uses ``block_topk``."""
        queries = self.host_feeds(queries)
        for offset, feeds in gallery:
            sims = self.run({**self.host_feeds(feeds), **queries})[output]  # (N, Q)
            scores = sims.T if axis == 0 else sims  # (queries, block)
            yield offset, scores.astype(np.float32, copy=False)

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        expected = set(self.input_names)
        if set(feeds) != expected:
            raise BackendError(f"{self.name}: expected inputs {sorted(expected)}, received {sorted(feeds)}")
