"""Validation of user-supplied region features: clear errors instead of tracebacks from deep inside numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class FeatureError(ValueError):
    """Region features of the wrong rank, size, dtype, or with NaN/inf."""


def check_regions(x: object, img_dim: int, name: str = "regions") -> np.ndarray:
    """Return ``x`` as a float32 (N, R, img_dim) array, or raise naming what was expected and received."""
    x = check_layout(x, img_dim, name)
    bad = ~np.isfinite(x).all(axis=(1, 2))
    if bad.any():
        rows = np.flatnonzero(bad)
        raise FeatureError(f"{name}: {len(rows)} image(s) contain NaN or inf, first at index {int(rows[0])}")
    return x.astype(np.float32, copy=False)


def check_layout(x: object, img_dim: int, name: str = "regions") -> np.ndarray:
    """Rank, size and dtype checks only (cheap on a memory-mapped file of any size)."""
    if not isinstance(x, np.ndarray):
        raise FeatureError(f"{name}: expected a numpy array (N, R, {img_dim}), received {type(x).__name__}")
    if x.dtype.kind != "f":
        raise FeatureError(f"{name}: expected floating-point features, received dtype {x.dtype}")
    if x.ndim == 2 and x.shape[1] == img_dim:
        raise FeatureError(
            f"{name}: expected (N, R, {img_dim}) region features, received a 2-D array {x.shape}; "
            f"for a single image pass x[None]"
        )
    if x.ndim != 3:
        raise FeatureError(f"{name}: expected rank 3 (N, R, {img_dim}), received rank {x.ndim} shape {x.shape}")
    if x.shape[2] != img_dim:
        raise FeatureError(
            f"{name}: expected {img_dim} features per region (the model's img_dim), "
            f"received {x.shape[2]} (shape {x.shape})"
        )
    if x.shape[1] < 1:
        raise FeatureError(f"{name}: expected at least one region per image, received shape {x.shape}")
    return x


def load_regions(path: str | Path, img_dim: int, mmap: bool = True) -> np.ndarray:
    """Open a precomputed ``.npy`` of region features (memory-mapped), validating its header."""
    path = Path(path)
    if not path.is_file():
        raise FeatureError(f"{path}: no such file")
    try:
        x = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise FeatureError(f"{path}: not a readable .npy array ({e})") from e
    # Finite-ness is checked batch by batch while encoding, not here: the file may be many GB.
    return check_layout(x, img_dim, name=str(path))


def model_regions(engine: object) -> int | None:
    """Regions per image the engine's image graph accepts at most: a TensorRT plan's profile maximum, or a fixed
    dimension of the graph's input; None where it is dynamic (an ONNX export takes any count) or where the engine
    has no image graph here (a sharded searcher's driver holds the model's manifest only)."""
    graph = getattr(engine, "image", None)
    if graph is None:
        return None
    spec = graph.inputs[0]
    profile = getattr(graph, "profile", None)
    if isinstance(profile, dict) and spec.name in profile:
        return int(profile[spec.name]["max"][1])
    regions = spec.shape[1] if len(spec.shape) == 3 else None
    return regions if isinstance(regions, int) and regions > 0 else None
