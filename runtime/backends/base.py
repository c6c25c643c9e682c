"""The one small interface every backend implements (Polygraphy's split of loading and running)."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np


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

    def close(self) -> None:
        """Release sessions, contexts and device memory; idempotent."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        expected = set(self.input_names)
        if set(feeds) != expected:
            raise BackendError(f"{self.name}: expected inputs {sorted(expected)}, received {sorted(feeds)}")
