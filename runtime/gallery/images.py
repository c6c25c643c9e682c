"""Image galleries (text -> image search): the cache of encoded images, its builder from region features and
its writer from encoded arrays.

A gallery may also keep each image's region boxes (``boxes`` (N, R, 4) float32, x1 y1 x2 y2 in the picture's
pixels, as bottom-up-attention features come; ``--boxes``), an optional array of the cache with its checksum,
appended with the images; galleries without boxes load as before. Explanations outline the attended
regions with them."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

import runtime.gallery.store as store
from runtime.features import FeatureError, check_layout, load_regions
from runtime.gallery.index import update_index
from runtime.gallery.quantize import Dequantized, dequantize, gram_of, is_quantized, quantize
from runtime.gallery.store import GalleryError
from runtime.options import GALLERY_DTYPES, WriteOptions

logger = logging.getLogger(__name__)


@dataclass
class ImageGallery(store.MappedGallery):
    ARRAYS: ClassVar[tuple[str, ...]] = ("images", "image_gram", "ids")

    folder: Path
    images: np.ndarray  # (N, R, d)
    image_gram: np.ndarray  # (N, R, R)
    ids: np.ndarray  # (N,) int64
    names: list[str] | None
    manifest: dict[str, Any]
    boxes: np.ndarray | None = None  # (N, R, 4) float32, or None: no boxes

    # An int8 cache (runtime/gallery/quantize.py): ``images`` is the float32 face (``Dequantized``) of the
    # stored int8 codes and their per-region scales; ``image_gram`` float32, the Grams of the dequantized vectors.

    @property
    def dtype(self) -> np.dtype:
        """How the cache stores its region vectors: float32, float16 or int8."""
        return np.dtype(np.int8) if isinstance(self.images, Dequantized) else self.images.dtype

    def close(self) -> None:
        if self.boxes is not None:
            self.boxes = np.zeros((0, *self.boxes.shape[1:]), self.boxes.dtype)
        super().close()

    def label(self, item: int) -> str:
        """How errors name gallery item ``item``."""
        name = f" ({self.names[item]!r})" if self.names and 0 <= item < len(self.names) else ""
        return f"image {item}{name} of the gallery {self.folder}"

    def nbytes_per_item(self) -> float:
        if not len(self):
            return 0.0
        stored = self.images.nbytes // len(self) if isinstance(self.images, Dequantized) else self.images[:1].nbytes
        return stored + self.image_gram[:1].nbytes + 8

    def blocks(self, block: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(offset, images view, gram view) for consecutive blocks: slices of the memory map, no copies (an int8
        cache: its blocks dequantized to float32)."""
        for start in range(0, len(self), block):
            yield start, self.images[start : start + block], self.image_gram[start : start + block]

    @classmethod
    def load(cls, folder: str | Path, image_encoder_id: str | None = None, verify: bool | None = None) -> ImageGallery:
        """Open the cache in ``folder`` memory-mapped. ``verify``: check every array's checksum (and that all
        values are finite); None checks checksums only when the arrays total at most ``VERIFY_ON_OPEN_BYTES``."""
        folder = Path(folder)

        def load() -> ImageGallery:
            data = store.read_manifest(folder, "images")
            if image_encoder_id is not None:
                store.check_binding(data, "image_encoder_id", image_encoder_id, folder)
            optional = tuple(name for name in ("boxes", "image_scales") if name in data["arrays"])
            arrays = store.open_arrays(folder, data, ("images", "image_gram", "ids", *optional), verify)
            images = _images(folder, arrays["images"], arrays.get("image_scales"))
            if verify:
                store.check_finite(folder, data, arrays)
            names = None
            if data.get("names_file"):
                names = store.read_side_file(folder, data["names_file"], "names")
                if len(names) != len(arrays["ids"]):
                    raise GalleryError(f"{folder}: {len(names)} names for {len(arrays['ids'])} images")
            boxes = arrays.get("boxes")
            if boxes is not None and boxes.shape != (*arrays["images"].shape[:2], 4):
                raise GalleryError(
                    f"{folder}: corrupted gallery: boxes {list(boxes.shape)} for images {list(arrays['images'].shape)}"
                )
            if isinstance(images, Dequantized):
                logger.warning("%s: %s", folder, describe_quantization(data))
            return cls(folder, images, arrays["image_gram"], arrays["ids"], names, data, boxes)

        return store.load_consistent(lambda: store.manifest_generation(folder), load, folder)

    @classmethod
    def from_arrays(
        cls,
        images: np.ndarray,
        image_gram: np.ndarray,
        names: Sequence[str] | None = None,
        folder: str | Path = "<memory>",
        image_scales: np.ndarray | None = None,
    ) -> ImageGallery:
        """An in-memory gallery of encoded images (nothing is written): ``images`` (N, R, d), ``image_gram``
        (N, R, R) of the same dtype; ids are 0..N-1. For galleries that come from elsewhere than an engine
        (benchmarks' synthetic ones) and are too large to write. An int8 gallery: int8 ``images`` (codes),
        their ``image_scales`` (N, R) and float32 ``image_gram`` (``runtime/gallery/quantize.py``)."""
        if images.ndim != 3 or image_gram.shape != (images.shape[0], images.shape[1], images.shape[1]):
            raise GalleryError(
                f"expected images (N, R, d) and image_gram (N, R, R), received {images.shape} and {image_gram.shape}"
            )
        if images.dtype.name not in GALLERY_DTYPES or image_gram.dtype != _gram_dtype(images.dtype.name):
            raise GalleryError(
                f"expected images of a dtype in {GALLERY_DTYPES} and image_gram of the same float dtype "
                f"(float32 for int8 images), received {images.dtype.name} and {image_gram.dtype.name}"
            )
        stored = images
        images = _images(Path(folder), images, image_scales)
        n, r, d = images.shape
        if names is not None and len(names) != n:
            raise GalleryError(f"names: expected one name per image ({n}), received {len(names)}")
        manifest = {
            "format": store.FORMAT,
            "kind": "images",
            "count": n,
            "dtype": stored.dtype.name,
            "regions": r,
            "embed_size": d,
            "arrays": {},
        }
        return cls(
            Path(folder),
            images,
            image_gram,
            np.arange(n, dtype=np.int64),
            None if names is None else list(names),
            manifest,
        )


# An int8 write measures its top-10 agreement with float32 on up to this many of its new images, against
# PROBE_QUERIES captions of random words (the engine scores both; recorded in the manifest, logged on use).
PROBE_IMAGES = 256
PROBE_QUERIES = 20
PROBE_WORDS = 12


def probe_agreement(engine, emb: np.ndarray, gram: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Top-10 agreement of int8 with float32 scores of images ``emb`` (float32, their Grams ``gram``) for
    random-word captions: what ``describe_quantization`` reports."""
    emb, gram = emb[:PROBE_IMAGES], gram[:PROBE_IMAGES]
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, engine.config.vocab_size, (PROBE_QUERIES, PROBE_WORDS)).astype(np.int64)
    lengths = np.full(PROBE_QUERIES, PROBE_WORDS, np.int64)
    words = engine.encode_ids(ids, lengths)
    codes, scales = quantize(emb)
    approx = dequantize(codes, scales)
    exact = engine.sims(emb, gram, words, lengths)  # (N, Q)
    got = engine.sims(approx, gram_of(approx), words, lengths)
    k = min(10, len(emb))
    top = [
        len(set(np.argsort(-exact[:, q], kind="stable")[:k]) & set(np.argsort(-got[:, q], kind="stable")[:k])) / k
        for q in range(PROBE_QUERIES)
    ]
    return {
        "scheme": "int8 codes, one float32 scale per region vector (max |x| / 127)",
        "top10_agreement": float(np.mean(top)),
        "max_abs_score_diff": float(np.abs(exact - got).max()),
        "probe_images": len(emb),
        "probe_queries": PROBE_QUERIES,
    }


def describe_quantization(manifest: dict[str, Any]) -> str:
    """The log line of an int8 cache: approximate, and how well it agreed with float32 when written."""
    q = manifest.get("quantization") or {}
    if "top10_agreement" not in q:
        return "int8 cache: approximate scores (no agreement with float32 recorded)"
    return (
        f"int8 cache: approximate scores; top-10 agreement with float32 {q['top10_agreement']:.3f} (max score "
        f"difference {q['max_abs_score_diff']:.1e}), measured when written on {q['probe_images']} of its images "
        f"and {q['probe_queries']} random-word captions; bench/formats.py measures it on real queries"
    )


def _gram_dtype(dtype: str) -> str:
    """The Gram matrices' dtype in a cache storing region vectors as ``dtype``: the same float, float32 for int8."""
    return "float32" if is_quantized(dtype) else dtype


def _file_dtypes(dtype: str) -> dict[str, str]:
    """The arrays an image cache of ``dtype`` stores row by row, with their dtypes."""
    files = {"images": dtype, "image_gram": _gram_dtype(dtype)}
    return {**files, "image_scales": "float32"} if is_quantized(dtype) else files


def _images(folder: Path, images: np.ndarray, scales: np.ndarray | None) -> np.ndarray | Dequantized:
    """The region vectors a gallery serves: the stored array, or for int8 codes their float32 face."""
    if not is_quantized(images.dtype):
        if scales is not None:
            raise GalleryError(f"{folder}: corrupted gallery: image_scales for {images.dtype.name} images")
        return images
    if scales is None or scales.dtype != np.float32 or scales.shape != images.shape[:2]:
        got = "none" if scales is None else f"{scales.dtype.name}{list(scales.shape)}"
        raise GalleryError(
            f"{folder}: corrupted gallery: int8 images {list(images.shape)} need float32 image_scales "
            f"{list(images.shape[:2])}, received {got}"
        )
    return Dequantized(images, scales)


def encoded_rows(emb: np.ndarray, gram: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """Encoded images (float32 embeddings and Grams) as the arrays a cache of ``dtype`` stores for them."""
    if not is_quantized(dtype):
        return {"images": emb, "image_gram": gram}
    codes, scales = quantize(emb)
    return {"images": codes, "image_gram": gram_of(dequantize(codes, scales)), "image_scales": scales}


def load_boxes(boxes: np.ndarray | str | Path, n: int, regions: int, source: str = "boxes") -> np.ndarray:
    """Region boxes checked against the images they belong to: (n, regions, 4) finite numbers, float32.
    ``boxes``: an array or a ``.npy`` path."""
    if isinstance(boxes, (str, Path)):
        source = str(boxes)
        try:
            boxes = np.load(boxes, allow_pickle=False)
        except FileNotFoundError:
            raise GalleryError(f"--boxes {source}: no such file") from None
        except (ValueError, OSError, EOFError) as e:
            raise GalleryError(f"--boxes {source}: not a readable .npy array ({e})") from e
    boxes = np.asarray(boxes)
    if boxes.dtype.kind not in "fiu" or boxes.shape != (n, regions, 4):
        raise GalleryError(
            f"{source}: expected region boxes ({n}, {regions}, 4) (images, regions, x1 y1 x2 y2), received "
            f"{boxes.dtype.name}{list(boxes.shape)}"
        )
    if not np.isfinite(boxes).all():
        raise GalleryError(f"{source}: boxes hold NaN or inf")
    return boxes.astype(np.float32)


@dataclass(frozen=True)
class RegionStream:
    """Region features that arrive in chunks ((n_i, regions, img_dim) arrays), ``count`` images in all: a
    gallery of any size is encoded chunk by chunk, never holding the features of all its images
    (bench/synthetic.py's ``SceneStream`` feeds one). ``chunks`` is read once; a chunk may be overwritten
    once the next one is asked for."""

    count: int
    regions: int
    chunks: Iterable[np.ndarray]


def _batches(regions: np.ndarray | RegionStream, img_dim: int, batch: int) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, features) in batches of ``batch`` images (the last one shorter), from an array or a stream:
    the same batches either way, so a streamed gallery holds the same values as one built from the array."""
    if isinstance(regions, np.ndarray):
        for start in range(0, len(regions), batch):
            yield start, np.asarray(regions[start : start + batch])
        return
    pending: list[np.ndarray] = []
    have = done = 0
    for i, chunk in enumerate(regions.chunks):
        check_layout(chunk, img_dim, name=f"regions chunk {i}")
        if chunk.shape[1] != regions.regions or done + have + len(chunk) > regions.count:
            raise GalleryError(
                f"regions chunk {i}: expected chunks of ({regions.regions} regions) adding up to "
                f"{regions.count} images, received {list(chunk.shape)} after {done + have} images"
            )
        while len(chunk):
            take = chunk[: batch - have]
            chunk = chunk[len(take) :]
            if not pending and len(take) == batch:
                yield done, take  # a whole batch of this chunk: no copy
                done += batch
                continue
            pending.append(np.array(take))  # kept past this chunk, which the stream may overwrite
            have += len(take)
            if have == batch:
                yield done, np.concatenate(pending)
                done, pending, have = done + have, [], 0
    if have:
        yield done, np.concatenate(pending)
    if done + have != regions.count:
        raise GalleryError(f"regions: the stream promised {regions.count} images and gave {done + have}")


def build_image_gallery(
    engine,
    regions: np.ndarray | str | Path | RegionStream,
    folder: str | Path,
    names: Sequence[str] | None = None,
    options: WriteOptions = WriteOptions(),
    repeated: bool | None = None,
    batch: int = 128,
    boxes: np.ndarray | str | Path | None = None,
) -> ImageGallery:
    """Encode region features into ``folder`` (or append to the gallery there), atomically.

    ``regions`` is an array, a ``.npy`` path (memory-mapped) or a ``RegionStream`` (chunks, encoded as they
    come; without ``repeated`` or ``boxes``). ``repeated``: the original's layout
    that repeats every image 5 times (keep every 5th row); None leaves the rows as they are.
    Concurrent writers to one folder take turns (see the module doc); ``options.lock_timeout`` bounds the
    wait. ``options.index``: also build the candidate index of two-stage search (runtime/gallery/index.py);
    an index already in the folder is extended on append in any case. ``boxes``: the images' region boxes
    (``load_boxes``; an array or a ``.npy`` path, one row per row of ``regions``), required on appending to a
    gallery that has boxes and refused on appending to one without.
    """
    folder = Path(folder)
    dtype = options.dtype
    cfg = engine.config
    source = str(regions) if isinstance(regions, (str, Path)) else "regions"
    if isinstance(regions, RegionStream):
        if repeated or boxes is not None:
            raise GalleryError("regions: a RegionStream takes neither repeated nor boxes")
    elif isinstance(regions, (str, Path)):
        regions = load_regions(regions, cfg.img_dim)
    else:
        regions = check_layout(regions, cfg.img_dim)
    if boxes is not None:  # one row per row of regions, as given
        boxes = load_boxes(boxes, int(regions.shape[0]), int(regions.shape[1]))
        boxes = boxes[::5] if repeated else boxes
    if repeated:
        regions = regions[::5]
    n_new, n_regions = (
        (regions.count, regions.regions)
        if isinstance(regions, RegionStream)
        else (int(regions.shape[0]), int(regions.shape[1]))
    )
    if n_new == 0:
        raise GalleryError(
            f"{source}: expected at least one image, received none; the gallery {folder} is left as it was"
        )
    if names is not None and len(names) != n_new:
        raise GalleryError(f"names: expected one name per image ({n_new}), received {len(names)}")
    with store.writer_lock(folder, options.lock_timeout):
        old = store.previous(ImageGallery, folder, engine.manifest.image_encoder_id, options)
        store.check_key(old.manifest if old else None, options.key)
        if old is not None and old.images.shape[1] != n_regions:
            raise GalleryError(
                f"{folder}: the gallery has {old.images.shape[1]} regions per image, the new features have {n_regions}"
            )
        if old is not None and (old.names is None) != (names is None):
            raise GalleryError(
                f"{folder}: the gallery {'has' if old.names else 'has no'} names; "
                f"append {'with' if old.names else 'without'} --names"
            )
        if old is not None and (old.boxes is None) != (boxes is None):
            raise GalleryError(
                f"{folder}: the gallery {'has' if old.boxes is not None else 'has no'} region boxes; "
                f"append {'with' if old.boxes is not None else 'without'} --boxes (or --rebuild)"
            )
        n_old = len(old) if old else 0
        n, r, d = n_old + n_new, n_regions, cfg.embed_size
        generation = store.current_generation(folder) + 1
        dtypes = _file_dtypes(dtype)
        files = {
            name: shape
            for name, shape in {"images": (n, r, d), "image_gram": (n, r, r), "image_scales": (n, r)}.items()
            if name in dtypes
        }
        tmp_paths: dict[str, Path] = {}
        try:  # the temporaries are made inside, so that an interruption at any point removes them
            for name in files:
                tmp_paths[name] = store.temporary(folder, name, generation)
            store.reserve(folder, 8 * n + sum(np.dtype(dtypes[k]).itemsize * int(np.prod(s)) for k, s in files.items()))
            out = {name: store.open_rows(tmp_paths[name], dtypes[name], shape) for name, shape in files.items()}
            if old is not None:
                stored = _stored(old)
                for start in range(0, n_old, 4096):  # streamed, so memory stays bounded
                    stop = min(start + 4096, n_old)
                    for name in files:
                        out[name][start:stop] = stored[name][start:stop]
                stored = {}  # no map of the previous generation may outlive the commit (its files are swept)
            probe = (np.zeros((0, r, d), np.float32), np.zeros((0, r, r), np.float32))  # int8: float rows kept
            with store.progress_bar(n_new, "encoding images", options.progress) as bar:
                for start, chunk in _batches(regions, cfg.img_dim, batch):
                    try:
                        emb, gram = engine.encode_images(chunk, name=f"regions[{start}:{start + len(chunk)}]")
                    except FeatureError as e:
                        raise GalleryError(f"cannot build the gallery: {e}") from e
                    if is_quantized(dtype) and len(probe[0]) < PROBE_IMAGES:
                        probe = (np.concatenate([probe[0], emb]), np.concatenate([probe[1], gram]))
                    for name, rows in encoded_rows(emb, gram, dtype).items():
                        out[name][n_old + start : n_old + start + len(chunk)] = rows
                    bar.update(len(chunk))
            for arr in out.values():
                arr.flush()
            out = {}  # unmap before the files move
            entries = {
                name: store.finish_array(folder, tmp_paths[name], name, generation, files[name], dtypes[name])
                for name in files
            }
            ids = np.concatenate(
                [np.asarray(old.ids) if old else np.zeros(0, np.int64), np.arange(n_old, n, dtype=np.int64)]
            )
            kept = {"ids": ids}
            if boxes is not None:
                kept["boxes"] = np.concatenate([np.asarray(old.boxes) if old else boxes[:0], boxes])
            entries.update(store.save_arrays(folder, generation, kept))
        finally:
            out = {}
            for p in tmp_paths.values():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        all_names = (list(old.names) if old and old.names else []) + list(names) if names is not None else None
        extra = {f"names.{generation}.json": all_names} if all_names is not None else {}
        manifest = {
            "format": store.FORMAT,
            "kind": "images",
            "generation": generation,
            "count": n,
            "image_encoder_id": engine.manifest.image_encoder_id,
            "config": cfg.to_dict(),
            "model": engine.manifest.name,
            "dtype": dtype,
            "regions": r,
            "embed_size": d,
            "arrays": entries,
            "names_file": next(iter(extra), None),
            **store.with_key(old.manifest if old else None, options.key, n_old, n_new),
        }
        if is_quantized(dtype):
            manifest["quantization"] = probe_agreement(engine, *probe)  # logged by the load below
        store.commit(folder, manifest, extra)
        old = None  # this writer's own map of the previous generation must not keep its files
        store.sweep(folder)
        logger.info("image gallery %s: %d images (%d new), %s", folder, n, n_new, dtype)
        gallery = ImageGallery.load(folder)
        update_index(gallery, options.index, n_old, options.progress)
        return gallery


# Bound to the encoder of the gallery the arrays came from (shard split and merge): no engine runs.
_IMAGE_BINDING = ("image_encoder_id", "config", "model", "dtype", "regions", "embed_size")


def _stored(gallery: ImageGallery) -> dict[str, np.ndarray]:
    """The arrays ``gallery`` stores row by row (an int8 cache: its codes and scales, not their float face)."""
    if isinstance(gallery.images, Dequantized):
        return {"images": gallery.images.codes, "image_gram": gallery.image_gram, "image_scales": gallery.images.scales}
    return {"images": gallery.images, "image_gram": gallery.image_gram}


def write_image_gallery(
    folder: str | Path,
    images: Sequence[np.ndarray],
    image_gram: Sequence[np.ndarray],
    names: Sequence[str] | None,
    like: dict[str, Any],
    boxes: Sequence[np.ndarray] | None = None,
) -> ImageGallery:
    """Commit encoded images (the concatenation of the ``images``/``image_gram`` pieces, ids 0..N-1, and of
    the ``boxes`` pieces when given) as a new gallery at ``folder``, bound to the encoder recorded in ``like``
    (a source gallery's manifest)."""
    folder = Path(folder)
    n = sum(len(p) for p in images)
    if n != sum(len(p) for p in image_gram) or n == 0:
        raise GalleryError(
            f"{folder}: expected as many Gram matrices as images (at least one), received "
            f"{sum(len(p) for p in image_gram)} for {n} images"
        )
    if names is not None and len(names) != n:
        raise GalleryError(f"names: expected one name per image ({n}), received {len(names)}")
    dtype, (r, d) = like["dtype"], images[0].shape[1:]
    dtypes = _file_dtypes(dtype)
    shapes = {"images": (n, r, d), "image_gram": (n, r, r), "image_scales": (n, r)}
    with store.writer_lock(folder):
        generation = store.require_new(folder)
        if is_quantized(dtype):  # float rows (an int8 gallery's dequantized face) quantized again: the same codes
            pieces = [
                encoded_rows(np.asarray(i, np.float32), np.asarray(g, np.float32), dtype)
                for i, g in zip(store.row_chunks(images), store.row_chunks(image_gram))
            ]
        else:
            pieces = None
        entries = {
            name: store.save_rows(
                folder,
                generation,
                name,
                shapes[name],
                dtypes[name],
                (p[name] for p in pieces)
                if pieces is not None
                else store.row_chunks(images if name == "images" else image_gram),
            )
            for name in dtypes
        }
        kept = {"ids": np.arange(n, dtype=np.int64)}
        if boxes is not None:
            kept["boxes"] = load_boxes(np.concatenate(list(boxes)), n, r)
        entries.update(store.save_arrays(folder, generation, kept))
        extra = {f"names.{generation}.json": list(names)} if names is not None else {}
        manifest = {
            "format": store.FORMAT,
            "kind": "images",
            "generation": generation,
            "count": n,
            **{key: like[key] for key in _IMAGE_BINDING},
            "arrays": entries,
            "names_file": next(iter(extra), None),
        }
        store.commit(folder, manifest, extra)
    return ImageGallery.load(folder)
