"""The array backend: SCAN from plain weights on numpy (CPU) or CuPy (GPU), no graph runtime at all.

``ArrayModel`` loads the export's weights file (``runtime/weights.py``), places the weights on the
array module's device once and runs ``runtime/array_model.py`` there:

* ``numpy``: float32, or float16 storage (a float16 gallery) with float32 GEMMs (numpy has no float16 BLAS);
* ``cupy``: float32, or float16 storage with float16 GEMMs on cuBLAS (tensor cores, float32
  accumulation, CuPy's default compute type for float16); elementwise chains fused by ``cupy.fuse``;
  queries uploaded through pinned host buffers; a gallery uploaded once stays resident; the block
  top-k runs on the device so only (q, k) candidates come back.

CuPy is imported lazily, only for ``--backend cupy``: ``pip install 'scan-runtime[cupy]'`` installs
``cupy-cuda12x`` (CUDA 12 drivers); for CUDA 13 install ``cupy-cuda13x`` instead (docs/backends.md).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from runtime import array_model as am
from runtime.backends.base import Backend, BackendError, Block, GalleryBlocks, TensorSpec
from runtime.backends.convert import cast
from runtime.install import install_command
from runtime.weights import ScanWeights

logger = logging.getLogger(__name__)

MODULES = ("numpy", "cupy")
# Rows per resident block on a GPU: 8192 images x 36 regions x 32 queries x 14 words of float32 logits are
# 0.5 GB per intermediate, large enough to fill an H200, small enough to leave the gallery its memory.
DEVICE_BLOCK_ROWS = 8192


def cupy_status() -> str | None:
    """None when CuPy can run here, else why not (for skips and errors)."""
    try:
        import cupy
    except ImportError as e:
        cuda12, cuda13 = install_command("cupy"), install_command("cupy13")
        return f"CuPy is not installed ({e}); {cuda12} (cupy-cuda12x), or for CUDA 13 {cuda13} (cupy-cuda13x)"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError without a driver
        return f"CuPy cannot reach a CUDA device ({e})"
    return None if count > 0 else "CuPy sees no CUDA device"


def array_module(name: str):
    if name == "numpy":
        return np
    if name == "cupy":
        reason = cupy_status()
        if reason is not None:
            raise BackendError(f"--backend cupy: {reason}")
        import cupy

        return cupy
    raise BackendError(f"unknown array module {name!r}; expected one of {', '.join(MODULES)}")


class _Staging(threading.local):
    """Per-thread pinned host buffers (CuPy): queries are copied into page-locked memory, then uploaded."""

    def __init__(self) -> None:
        self.buffers: dict[str, Any] = {}


class ArrayModel:
    """Both encoders and the head of one export on one array module; thread-safe (no mutable state)."""

    def __init__(self, weights: ScanWeights, module: str = "numpy", precision: str = "fp32") -> None:
        if precision not in ("fp32", "fp16"):
            raise BackendError(f"precision must be 'fp32' or 'fp16', received {precision!r}")
        xp = array_module(module)
        self.xp = xp
        self.module = module
        self.precision = precision
        self.config = weights.config
        self.storage = np.dtype(np.float16 if precision == "fp16" else np.float32)
        self.gemm_dtype = np.dtype(np.float16 if precision == "fp16" and module == "cupy" else np.float32)
        self._staging = _Staging()
        st = self.storage
        # As the fp16 graphs: the Linear and the embedding table stored in float16, the GRU in float32.
        self.image_weight = self._put(weights.image_weight, st)
        self.image_bias = self._put(weights.image_bias, st)
        self.embed = self._put(weights.embed, st)
        self.gru = tuple(
            tuple(
                type(g)(*(self._put(a, np.float32) for a in (g.weight_ih, g.weight_hh, g.bias_ih, g.bias_hh)))
                for g in layer
            )
            for layer in weights.gru
        )

    # ------------------------------------------------------------------ transfers

    def _put(self, a: np.ndarray, dtype) -> Any:
        return self.xp.asarray(cast(np.asarray(a), dtype))

    def upload(self, a: np.ndarray, dtype=None, slot: str = "query") -> Any:
        """Host -> device. CuPy: staged through a reusable pinned buffer of this thread (``slot``)."""
        a = np.asarray(a) if dtype is None else cast(np.asarray(a), dtype)
        if self.xp is np:
            return np.ascontiguousarray(a)
        buf = self._staging.buffers.get(slot)
        if buf is None or buf.nbytes < a.nbytes:
            nbytes = max(a.nbytes, 1 << 16)
            buf = np.frombuffer(self.xp.cuda.alloc_pinned_memory(nbytes), np.uint8, nbytes)  # keeps the memory alive
            self._staging.buffers[slot] = buf
        host = buf[: a.nbytes].view(a.dtype).reshape(a.shape)
        host[...] = a
        dev = self.xp.empty(a.shape, a.dtype)
        dev.set(host)
        return dev

    def download(self, a: Any) -> np.ndarray:
        return a if isinstance(a, np.ndarray) else self.xp.asnumpy(a)

    # ------------------------------------------------------------------ model (device arrays in and out)

    def images_on_device(self, regions: Any) -> tuple[Any, Any]:
        return am.encode_images(
            self.xp, regions, self.image_weight, self.image_bias, self.config.no_imgnorm, self.gemm_dtype, self.storage
        )

    def text_on_device(self, ids: Any, lengths: Any) -> Any:
        return am.encode_text(self.xp, ids, lengths, self.embed, self.gru, self.config.no_txtnorm, self.storage)

    def sims_on_device(self, images: Any, image_gram: Any, captions: Any, lengths: Any) -> Any:
        return am.sims(self.xp, images, image_gram, captions, lengths, self.config, self.gemm_dtype)

    # ------------------------------------------------------------------ host in, host out

    def encode_images(self, regions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images, gram = self.images_on_device(self.upload(regions, self.storage))
        return self.download(images), self.download(gram)

    def encode_ids(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        _check_lengths(ids, lengths)
        return self.download(
            self.text_on_device(self.upload(ids, np.int64, "ids"), self.upload(lengths, np.int64, "lengths"))
        )

    def sims(
        self, images: np.ndarray, image_gram: np.ndarray | None, captions: np.ndarray, lengths: np.ndarray
    ) -> np.ndarray:
        gram = None if image_gram is None else self.upload(image_gram, self.storage, "gram")
        return self.download(
            self.sims_on_device(
                self.upload(images, self.storage, "images"),
                gram,
                self.upload(captions, self.storage, "captions"),
                self.upload(lengths, np.int64, "lengths"),
            )
        )

    # ------------------------------------------------------------------ gallery blocks, device top-k

    def on_device(self, a: Any) -> bool:
        """Whether ``a`` already lives on this model's device (numpy: never; its arrays are host arrays)."""
        return self.xp is not np and self.xp.get_array_module(a) is self.xp

    def device_feeds(self, feeds: Mapping[str, Any], slot: str) -> dict[str, Any]:
        """Head feeds on the device: host arrays uploaded (``lengths`` int64, the rest in the storage dtype),
        device arrays passed through."""
        return {
            name: (
                v
                if self.on_device(v)
                else self.upload(v, np.int64 if name == "lengths" else self.storage, f"{slot}.{name}")
            )
            for name, v in feeds.items()
        }

    def upload_blocks(self, blocks: Iterable[Block], merge_rows: int = 0) -> list[Block]:
        """Copy a gallery's blocks to the device once (CuPy; numpy: into memory), in the storage dtype.

        ``merge_rows``: consecutive blocks whose arrays agree in every dimension but the first are joined
        into device blocks of up to that many rows (a GPU scores a few large blocks faster than many small
        ones); offsets stay those of the gallery.
        """
        out: list[Block] = []
        run: list[Block] = []

        def flush() -> None:
            if run:
                offset = run[0][0]
                names = run[0][1].keys()
                joined = {
                    n: np.concatenate([np.asarray(f[n]) for _, f in run]) if len(run) > 1 else run[0][1][n]
                    for n in names
                }
                out.append(
                    (
                        offset,
                        {
                            n: self._put(np.asarray(v), np.int64 if n == "lengths" else self.storage)
                            for n, v in joined.items()
                        },
                    )
                )
                run.clear()

        rows = 0
        for offset, feeds in blocks:
            n = len(next(iter(feeds.values())))
            if run:
                last_offset, last = run[-1]
                same = (
                    all(np.shape(feeds[k])[1:] == np.shape(last[k])[1:] for k in feeds) and feeds.keys() == last.keys()
                )
                if not same or offset != last_offset + len(next(iter(last.values()))) or rows + n > merge_rows:
                    flush()
                    rows = 0
            run.append((offset, feeds))
            rows += n
        flush()
        return out

    def head_scores(self, feeds: Mapping[str, Any]) -> Any:
        """Device sims (N images, Q captions) of device feeds named as the head graph's inputs."""
        return self.sims_on_device(feeds["images"], feeds.get("image_gram"), feeds["captions"], feeds["lengths"])

    def _device_topk(self, scores: Any, k: int) -> tuple[Any, Any, Any]:
        """Device (q, k) candidate scores and columns of device ``scores`` (q, B > k), and per row the count
        of scores >= the k-th: above k, argpartition chose arbitrarily among ties at the k-th score."""
        xp = self.xp
        part = xp.argpartition(-scores, k - 1, axis=1)[:, :k]  # (q, k), unordered
        picked = xp.take_along_axis(scores, part, axis=1)
        n_at_least = (scores >= picked.min(axis=1, keepdims=True)).sum(axis=1)
        return picked, part, n_at_least

    def _block_scores(self, feeds: Mapping[str, Any], query: Mapping[str, Any], axis: int) -> Any:
        s = self.head_scores({**feeds, **query})  # (N, Q)
        return s.T if axis == 0 else s  # (queries, block)

    def blocks_topk(
        self, blocks: Iterable[Block], query: Mapping[str, Any], k: int, axis: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Per block: the top-k rows of each query, ``(scores (q, k'), rows (q, k'))`` on the host.

        ``axis``: the gallery's axis of the head's (N images, Q captions) similarities. Each candidate set
        is exact, ties at the k-th score going to the lower row (faiss's rule); the order within it is left
        to ``RunningTopK.merge``. With CuPy, blocks already on the device keep their candidates there and
        one transfer after the last block brings back every (q, k); a block whose k-th score was tied
        beyond k is rescored for that row. Blocks streamed from host arrays are resolved one by one, so
        the device holds one such block at a time.
        """
        query = self.device_feeds(query, "query")
        deferred = []  # (offset, device feeds, device candidates)
        for offset, feeds in blocks:
            streamed = not all(self.on_device(v) for v in feeds.values())
            feeds = self.device_feeds(feeds, "block")
            s = self._block_scores(feeds, query, axis)
            if s.shape[1] <= k or streamed or self.xp is np:
                yield self.topk_candidates(s, k, offset)
            else:
                deferred.append((offset, feeds, self._device_topk(s, k)))
        if deferred:
            xp = self.xp
            v, c, m = (self.download(xp.stack([d[2][i] for d in deferred])) for i in range(3))
            for (offset, feeds, _), vb, cb, mb in zip(deferred, v, c, m):
                rescore = (lambda f=feeds: self._block_scores(f, query, axis)) if (mb > k).any() else None
                yield self._resolve(offset, rescore, vb, cb, mb, k)

    def topk_candidates(self, scores: Any, k: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Host ``(scores (q, k'), rows (q, k'))``, k' = min(k, B), of device ``scores`` (q, B) whose column j
        is gallery row ``offset + j``: the exact top-k set, ties at the k-th score to the lower row."""
        q, b = scores.shape
        if b <= k:
            return self.download(scores).astype(np.float32), np.tile(np.arange(offset, offset + b), (q, 1))
        return self._resolve(offset, scores, *(self.download(a) for a in self._device_topk(scores, k)), k)

    def blocks_sims(
        self, blocks: Iterable[Block], query: Mapping[str, Any], axis: int
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Per block: ``(offset, scores (queries, block))`` float32 on the host (an ensemble combines these)."""
        query = self.device_feeds(query, "query")
        for offset, feeds in blocks:
            yield (
                offset,
                self.download(self._block_scores(self.device_feeds(feeds, "block"), query, axis)).astype(
                    np.float32, copy=False
                ),
            )

    def _resolve(
        self, offset: int, scores: Any, picked: np.ndarray, cols: np.ndarray, n_at_least: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Host candidates of one block; rows tied at the k-th score beyond k are redone from ``scores``
        (device (q, B), or a callable that recomputes them: the same feeds give the same scores)."""
        picked, cols = picked.astype(np.float32), cols.astype(np.int64)
        rows = np.flatnonzero(n_at_least > k)
        if len(rows):
            full = self.download((scores() if callable(scores) else scores)[self.xp.asarray(rows)])  # (rows, B)
            for i, row in enumerate(rows):
                order = np.argsort(-full[i], kind="stable")[:k]  # stable: equal scores keep column order
                picked[row], cols[row] = full[i][order], order
        return picked, cols + offset


def _check_lengths(ids: np.ndarray, lengths: np.ndarray) -> None:
    lengths = np.asarray(lengths)
    if (
        lengths.ndim != 1
        or len(lengths) != len(ids)
        or (len(lengths) and (lengths.min() < 1 or lengths.max() > ids.shape[1]))
    ):
        raise BackendError(
            f"lengths: expected {len(ids)} values in [1, {ids.shape[1]}], received "
            f"{lengths.tolist() if lengths.size < 20 else lengths.shape}"
        )


# ---------------------------------------------------------------------------------------------- Backend


def specs(cfg, kind: str, storage: np.dtype) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph contract of ``kind`` (export/graphs.py), in the backend's storage dtype."""
    d = cfg.embed_size
    i64 = np.dtype(np.int64)
    if kind == "image":
        return (
            [TensorSpec("regions", storage, ("N", "R", cfg.img_dim))],
            [TensorSpec("images", storage, ("N", "R", d)), TensorSpec("image_gram", storage, ("N", "R", "R"))],
        )
    if kind == "text":
        return (
            [TensorSpec("ids", i64, ("Q", "L")), TensorSpec("lengths", i64, ("Q",))],
            [TensorSpec("captions", storage, ("Q", "L", d))],
        )
    if kind == "head":
        inputs = [TensorSpec("images", storage, ("N", "R", d))]
        if cfg.cross_attn == "t2i":
            inputs.append(TensorSpec("image_gram", storage, ("N", "R", "R")))
        inputs += [TensorSpec("captions", storage, ("Q", "L", d)), TensorSpec("lengths", i64, ("Q",))]
        return inputs, [TensorSpec("sims", np.dtype(np.float32), ("N", "Q"))]
    raise BackendError(f"unknown graph kind {kind!r}; expected image, text or head")


class ArrayBackend(Backend):
    """One of the three graphs (image, text, head) served by an ``ArrayModel``: same feeds, same outputs."""

    def __init__(self, model: ArrayModel, kind: str) -> None:
        self.model = model
        self.kind = kind
        self.name = model.module
        self.device = "cpu" if model.module == "numpy" else "cuda"
        self._inputs, self._outputs = specs(model.config, kind, model.storage)

    # ------------------------------------------------------------------ placement (runtime/backends/base.py)

    def upload(self, blocks, resident: bool | None = None) -> GalleryBlocks:
        """CuPy: the gallery's blocks copied to the GPU once, in the storage dtype (float16 with --precision
        fp16), unless ``resident`` is False. numpy: host arrays read per search unless ``resident`` is True."""
        keep = resident if resident is not None else self.model.module == "cupy"
        if not keep:
            return GalleryBlocks(blocks)
        uploaded = self.model.upload_blocks(blocks(), merge_rows=DEVICE_BLOCK_ROWS if self.device == "cuda" else 0)
        return GalleryBlocks(uploaded, release=uploaded.clear)

    def block_topk(
        self, gallery: GalleryBlocks, queries: Mapping[str, np.ndarray], k: int, axis: int, output: str = "sims"
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Each block scored on the array module's device; only (q, k) candidates come back per block."""
        if self.kind != "head" or output != "sims":
            yield from super().block_topk(gallery, queries, k, axis, output)
            return
        yield from self.model.blocks_topk(gallery, queries, k, axis)

    def block_sims(
        self, gallery: GalleryBlocks, queries: Mapping[str, np.ndarray], axis: int, output: str = "sims"
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Each block scored on the array module's device (resident blocks included), rows back to the host."""
        if self.kind != "head" or output != "sims":
            yield from super().block_sims(gallery, queries, axis, output)
            return
        yield from self.model.blocks_sims(gallery, queries, axis)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_feeds(feeds)
        m = self.model
        if self.kind == "image":
            images, gram = m.encode_images(feeds["regions"])
            return {"images": images, "image_gram": gram}
        if self.kind == "text":
            return {"captions": m.encode_ids(feeds["ids"], feeds["lengths"])}
        return {"sims": m.sims(feeds["images"], feeds.get("image_gram"), feeds["captions"], feeds["lengths"])}
