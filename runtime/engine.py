"""An exported SCAN model at serve time: tokenizer, image and text encoders, similarity head.

Numpy and a backend only; PyTorch is never imported here.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from runtime.backends import ARRAY_BACKENDS, Backend, BackendError, choose_backend, open_backend
from runtime.backends.convert import cast
from runtime.features import check_regions
from runtime.manifest import Manifest, resolve_manifest
from runtime.options import EngineOptions
from runtime.tokenizer import Tokenizer
from runtime.vocab import Vocabulary

logger = logging.getLogger(__name__)


class ScanModel:
    """What an export is without its graphs: manifest, configuration and tokenizer. Enough to check queries
    (the driver of a sharded gallery, runtime/cluster.py, holds only this)."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.config = manifest.config
        self.tokenizer = Tokenizer(Vocabulary.from_json(manifest.vocab_path()), max_words=manifest.max_words)

    @classmethod
    def open(cls, engine: str | Path) -> ScanModel:
        return cls(resolve_manifest(engine))

    def close(self) -> None:
        """Nothing to release (a ``ScanEngine`` closes its backends)."""


class ScanEngine(ScanModel):
    """Owns the three backends of one export; use as a context manager or call ``close()``.

    ``options.backend`` must be a concrete backend here; ``ScanEngine.open`` resolves ``auto``."""

    def __init__(self, manifest: Manifest, options: EngineOptions = EngineOptions(backend="onnxruntime")) -> None:
        super().__init__(manifest)
        self.options = options
        self._backends: list[Backend] = []
        try:
            if options.backend in ARRAY_BACKENDS:
                self._open_arrays(options.backend, options.precision)
            else:
                self.image, self.text, self.head = (self._open(graph) for graph in ("image", "text", "head"))
        except Exception:
            self.close()
            raise
        self.head_inputs = self.head.input_names
        self.needs_image_gram = "image_gram" in self.head_inputs
        self.head_dtype = {t.name: t.dtype for t in self.head.inputs}["images"]

    def _open_arrays(self, module: str, precision: str) -> None:
        """numpy / cupy: one ArrayModel from the weights file serves all three graphs' contracts."""
        from runtime.backends.arrays import ArrayBackend, ArrayModel
        from runtime.weights import WeightsError, load_weights

        try:
            weights = load_weights(self.manifest)
        except WeightsError as e:
            raise BackendError(f"--backend {module}: {e}") from e
        self.array_model = ArrayModel(weights, module, precision)
        self.image, self.text, self.head = (
            ArrayBackend(self.array_model, graph) for graph in ("image", "text", "head")
        )
        self._backends += [self.image, self.text, self.head]

    @classmethod
    def open(cls, engine: str | Path, options: EngineOptions = EngineOptions()) -> ScanEngine:
        """``engine``: the manifest or any file it lists; ``options.backend`` as ``choose_backend`` resolves it."""
        manifest = resolve_manifest(engine)
        return cls(manifest, replace(options, backend=choose_backend(options.backend, engine, manifest)))

    def _open(self, graph: str) -> Backend:
        b = open_backend(self.manifest, graph, self.options)
        self._backends.append(b)
        return b

    def close(self) -> None:
        for b in self._backends:
            b.close()
        self._backends = []

    def __enter__(self) -> ScanEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ encoders

    def encode_images(self, regions: np.ndarray, name: str = "regions") -> tuple[np.ndarray, np.ndarray]:
        """(N, R, img_dim) features -> region embeddings (N, R, d) and Gram matrices (N, R, R), float32."""
        x = check_regions(regions, self.config.img_dim, name)
        out = self.image.run({"regions": x.astype(self.image.inputs[0].dtype, copy=False)})
        return _f32(out["images"]), _f32(out["image_gram"])

    def encode_ids(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Token ids (Q, L) + lengths (Q,) -> word embeddings (Q, L, d), zero past each length."""
        return _f32(self.text.run({"ids": ids, "lengths": lengths})["captions"])

    # ------------------------------------------------------------------ head

    def sims(
        self, images: np.ndarray, image_gram: np.ndarray | None, captions: np.ndarray, lengths: np.ndarray
    ) -> np.ndarray:
        """Similarities (N, Q) of N encoded images and Q encoded captions (zero-padded)."""
        feeds = {"images": images, "captions": captions, "lengths": lengths}
        if self.needs_image_gram:
            if image_gram is None:
                raise BackendError("this model's head (t2i) needs image_gram; encode images with encode_images")
            feeds["image_gram"] = image_gram
        dt = self.head_dtype
        feeds = {k: (v if k == "lengths" else cast(v, dt)) for k, v in feeds.items()}
        return _f32(self.head.run(feeds)["sims"])


def _f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32, copy=False)
