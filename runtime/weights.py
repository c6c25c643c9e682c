"""The encoders' weights as plain arrays: ``<name>.weights.npz`` beside the graphs.

Written by the exporter (``export/weights.py``) and listed in the manifest with its sha256; read here
with numpy alone (``allow_pickle=False``: no pickled code can run), checked against the model's
configuration name by name, shape by shape. The array backend (``runtime/backends/array.py``) serves
from these, with no graph runtime at all.

Arrays (float32; weight norm already folded; GRU gates in PyTorch's row order r, z, n):

* ``image.weight`` (d, img_dim), ``image.bias`` (d,)
* ``text.embed`` (vocab_size, word_dim)
* ``text.gru.l{layer}.{forward|backward}.{weight_ih (3d, in), weight_hh (3d, d), bias_ih (3d,), bias_hh (3d,)}``
  with ``in`` = word_dim for layer 0, else d times the number of directions; ``backward`` for a bi-GRU only.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.atomic import sha256_file
from runtime.config import SCANConfig

GRU_KEYS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


class WeightsError(ValueError):
    """A weights file is missing, does not match its recorded sha256, or does not fit the model."""


def gru_names(layer: int, direction: str) -> tuple[str, str, str, str]:
    return tuple(f"text.gru.l{layer}.{direction}.{k}" for k in GRU_KEYS)  # type: ignore[return-value]


def directions(cfg: SCANConfig) -> tuple[str, ...]:
    return ("forward", "backward") if cfg.bi_gru else ("forward",)


def expected_shapes(cfg: SCANConfig) -> dict[str, tuple[int, ...]]:
    d = cfg.embed_size
    shapes: dict[str, tuple[int, ...]] = {
        "image.weight": (d, cfg.img_dim),
        "image.bias": (d,),
        "text.embed": (cfg.vocab_size, cfg.word_dim),
    }
    for layer in range(cfg.num_layers):
        in_size = cfg.word_dim if layer == 0 else d * len(directions(cfg))
        for direction in directions(cfg):
            for name, shape in zip(gru_names(layer, direction), ((3 * d, in_size), (3 * d, d), (3 * d,), (3 * d,))):
                shapes[name] = shape
    return shapes


@dataclass(frozen=True)
class GRUWeights:
    weight_ih: np.ndarray  # (3d, in)
    weight_hh: np.ndarray  # (3d, d)
    bias_ih: np.ndarray  # (3d,)
    bias_hh: np.ndarray  # (3d,)


@dataclass(frozen=True)
class ScanWeights:
    """Both encoders' parameters; ``gru[layer]`` holds one GRUWeights per direction (forward first)."""

    config: SCANConfig
    image_weight: np.ndarray
    image_bias: np.ndarray
    embed: np.ndarray
    gru: tuple[tuple[GRUWeights, ...], ...]

    @classmethod
    def from_arrays(cls, cfg: SCANConfig, arrays: Mapping[str, np.ndarray], source: str = "weights") -> ScanWeights:
        expected = expected_shapes(cfg)
        missing = sorted(set(expected) - set(arrays))
        extra = sorted(set(arrays) - set(expected))
        if missing or extra:
            raise WeightsError(
                f"{source}: arrays do not fit the model's configuration (missing {missing}, unexpected {extra})"
            )
        for name, shape in expected.items():
            a = arrays[name]
            if tuple(a.shape) != shape or a.dtype != np.float32:
                raise WeightsError(f"{source}: {name} is {a.dtype}{list(a.shape)}, expected float32{list(shape)}")
        gru = tuple(
            tuple(
                GRUWeights(*(np.asarray(arrays[n]) for n in gru_names(layer, direction)))
                for direction in directions(cfg)
            )
            for layer in range(cfg.num_layers)
        )
        return cls(
            cfg,
            np.asarray(arrays["image.weight"]),
            np.asarray(arrays["image.bias"]),
            np.asarray(arrays["text.embed"]),
            gru,
        )

    @classmethod
    def load(cls, path: str | Path, cfg: SCANConfig, sha256: str | None = None) -> ScanWeights:
        """Read ``path``, refusing it when its sha256 differs from ``sha256`` (when given)."""
        path = Path(path)
        if not path.is_file():
            raise WeightsError(f"{path}: weights file missing; re-export with export/to_onnx.py CKPT")
        if sha256 is not None and sha256_file(path) != sha256:
            raise WeightsError(
                f"{path}: sha256 differs from the one recorded in the manifest; the file was changed "
                f"or belongs to another export. Re-export rather than mixing artifacts."
            )
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise WeightsError(f"{path}: not a readable weights archive ({e})") from e
        return cls.from_arrays(cfg, arrays, source=str(path))


def weights_entry(manifest) -> dict:
    """The manifest's record of the weights file, or a clear error for exports that predate it."""
    entry = manifest.weights
    if not entry:
        raise WeightsError(
            f"{manifest.path}: this export has no weights file (exported before the array backend "
            f"existed); re-export with export/to_onnx.py CKPT to serve it with --backend numpy/cupy"
        )
    return entry


def load_weights(manifest) -> ScanWeights:
    """The weights listed in ``manifest`` (a ``runtime.manifest.Manifest``), sha256-verified."""
    entry = weights_entry(manifest)
    return ScanWeights.load(manifest.directory / entry["file"], manifest.config, sha256=entry["sha256"])
