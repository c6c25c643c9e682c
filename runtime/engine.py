"""An exported SCAN model at serve time: tokenizer, image and text encoders, similarity head.

Numpy and a backend only; PyTorch is never imported here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runtime.backends import ARRAY_BACKENDS, Backend, BackendError, choose_backend, open_backend
from runtime.features import check_regions
from runtime.manifest import Manifest, resolve_manifest
from runtime.tokenizer import Tokenizer
from runtime.vocab import Vocabulary

logger = logging.getLogger(__name__)


class ScanEngine:
    """Owns the three backends of one export; use as a context manager or call ``close()``."""

    def __init__(
        self,
        manifest: Manifest,
        backend: str = "onnxruntime",
        precision: str = "fp32",
        device: str = "cpu",
        threads: int | None = None,
    ) -> None:
        self.manifest = manifest
        self.config = manifest.config
        self.backend_name = backend
        self.tokenizer = Tokenizer(Vocabulary.from_json(manifest.vocab_path()), max_words=manifest.max_words)
        self._backends: list[Backend] = []
        try:
            if backend in ARRAY_BACKENDS:
                self._open_arrays(backend, precision)
            else:
                self._open_graphs(backend, precision, device, threads)
        except Exception:
            self.close()
            raise
        self.head_inputs = self.head.input_names
        self.needs_image_gram = "image_gram" in self.head_inputs
        self.head_dtype = {t.name: t.dtype for t in self.head.inputs}["images"]

    def _open_graphs(self, backend: str, precision: str, device: str, threads: int | None) -> None:
        self.image = self._open("image", backend, precision, device, threads)
        self.text = self._open("text", backend, precision, device, threads)
        self.head = self._open("head", backend, precision, device, threads)

    def _open_arrays(self, module: str, precision: str) -> None:
        """numpy / cupy: one ArrayModel from the weights file serves all three graphs' contracts."""
        from runtime.backends.arrays import ArrayBackend, ArrayModel
        from runtime.weights import WeightsError, load_weights

        try:
            weights = load_weights(self.manifest)
        except WeightsError as e:
            raise BackendError(f"--backend {module}: {e}") from e
        self.array_model = ArrayModel(weights, module, precision)
        self.image, self.text, self.head = (ArrayBackend(self.array_model, kind) for kind in ("image", "text", "head"))
        self._backends += [self.image, self.text, self.head]

    @classmethod
    def open(
        cls,
        engine: str | Path,
        backend: str = "auto",
        precision: str = "fp32",
        device: str = "cpu",
        threads: int | None = None,
    ) -> ScanEngine:
        """``engine`` is the manifest or any file it lists; ``backend`` as ``runtime.backends.choose_backend``."""
        manifest = resolve_manifest(engine)
        concrete = choose_backend(backend, engine, manifest)
        if precision not in ("fp32", "fp16"):
            raise BackendError(f"precision must be 'fp32' or 'fp16', received {precision!r}")
        return cls(manifest, backend=concrete, precision=precision, device=device, threads=threads)

    def _open(self, kind: str, backend: str, precision: str, device: str, threads: int | None) -> Backend:
        b = open_backend(self.manifest, kind, backend, precision, device, threads)
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

    def encode_captions(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        ids, lengths = self.tokenizer.encode_batch(captions)
        return self.encode_ids(ids, lengths), lengths

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
        feeds = {k: (v if k == "lengths" else v.astype(dt, copy=False)) for k, v in feeds.items()}
        return _f32(self.head.run(feeds)["sims"])


def _f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32, copy=False)
