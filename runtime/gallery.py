"""Gallery caches: encoded images (text -> image search) and encoded captions (image -> text search).

A cache is a folder with ``gallery.json`` and ``.npy`` arrays, loaded memory-mapped:

* images:   ``images`` (N, R, d), ``image_gram`` (N, R, R) (the per-image term of the exact head),
            ``ids`` (N,) int64, optional ``names.json``;
* captions: ``words`` (W, d) ragged (all captions' words concatenated), ``offsets`` (M+1,),
            ``lengths`` (M,), ``ids`` (M,), ``texts.json``. Captions are stored sorted by length, so
            every run of equal-length captions is a (B, L, d) view of ``words`` with no padding and no copy.

``gallery.json`` binds the cache to the encoder that made it (``image_encoder_id`` /
``text_encoder_id`` from the export manifest) and records each array's shape and dtype. Writes are
atomic: array files carry a generation number and ``gallery.json`` is replaced last, so an
interrupted build or append leaves the previous cache intact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime import atomic
from runtime.buckets import encode_by_length
from runtime.features import FeatureError, check_layout, load_regions

logger = logging.getLogger(__name__)

FORMAT = "scan-gallery/1"
MANIFEST = "gallery.json"
DTYPES = ("float32", "float16")


class GalleryError(ValueError):
    """A gallery cache is missing, corrupted, or was built by another model."""


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="img" if "image" in desc else "cap",
        disable=not enabled,
        leave=False,
        dynamic_ncols=True,
    )


# ---------------------------------------------------------------------------------------------- common


def _read_manifest(folder: Path, kind: str) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise GalleryError(
            f"{folder}: no gallery here ({MANIFEST} missing); build one with "
            f"runtime/search.py --engine ENGINE --gallery {folder} --images FEATS.npy"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GalleryError(f"{path}: corrupted gallery manifest ({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise GalleryError(
            f"{path}: expected format {FORMAT!r}, got {data.get('format') if isinstance(data, dict) else data!r}"
        )
    if data.get("kind") != kind:
        raise GalleryError(f"{path}: this is a {data.get('kind')} gallery, expected a {kind} gallery")
    return data


def _open_array(folder: Path, entry: dict[str, Any], name: str) -> np.ndarray:
    path = folder / entry["file"]
    if not path.is_file():
        raise GalleryError(f"{path}: gallery file missing (listed in {folder / MANIFEST})")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise GalleryError(f"{path}: truncated or corrupted gallery file ({e})") from e
    if list(arr.shape) != list(entry["shape"]) or arr.dtype.name != entry["dtype"]:
        raise GalleryError(
            f"{path}: corrupted gallery file: {name} is {arr.dtype.name}{list(arr.shape)}, "
            f"the manifest says {entry['dtype']}{list(entry['shape'])}"
        )
    return arr


def _check_binding(data: dict[str, Any], key: str, expected: str, folder: Path) -> None:
    if data.get(key) != expected:
        raise GalleryError(
            f"{folder}: this gallery was built by another model ({key} {str(data.get(key))[:12]}..., the engine's is "
            f"{expected[:12]}...); rebuild it with this engine, or pass the engine that built it"
        )


def _save_arrays(folder: Path, generation: int, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    entries = {}
    for name, arr in arrays.items():
        fname = f"{name}.{generation}.npy"
        with atomic.atomic_path(folder / fname) as tmp, open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        entries[name] = {"file": fname, "shape": list(arr.shape), "dtype": arr.dtype.name}
    return entries


def _commit(folder: Path, manifest: dict[str, Any], extra_files: dict[str, Any]) -> None:
    """Write side files and ``gallery.json`` (last), then remove files of older generations."""
    for fname, obj in extra_files.items():
        atomic.write_json(folder / fname, obj)
    atomic.write_json(folder / MANIFEST, manifest)
    keep = {e["file"] for e in manifest["arrays"].values()} | set(extra_files) | {MANIFEST}
    for p in folder.iterdir():
        old_side_file = p.suffix == ".json" and p.name.split(".")[0] in ("names", "texts")
        if (p.suffix == ".npy" or old_side_file) and p.name not in keep:
            with contextlib.suppress(OSError):  # another reader may hold it on some platforms; harmless leftover
                p.unlink()


def _next_generation(folder: Path) -> int:
    path = folder / MANIFEST
    if path.is_file():
        try:
            return int(json.loads(path.read_text(encoding="utf-8")).get("generation", 0)) + 1
        except (ValueError, json.JSONDecodeError):
            return 1
    return 1


# ---------------------------------------------------------------------------------------------- images


@dataclass
class ImageGallery:
    folder: Path
    images: np.ndarray  # (N, R, d)
    image_gram: np.ndarray  # (N, R, R)
    ids: np.ndarray  # (N,) int64
    names: list[str] | None
    manifest: dict[str, Any]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def dtype(self) -> np.dtype:
        return self.images.dtype

    def nbytes_per_item(self) -> float:
        return (self.images[:1].nbytes + self.image_gram[:1].nbytes + 8) if len(self) else 0.0

    def blocks(self, block: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(offset, images view, gram view) for consecutive blocks: slices of the memory map, no copies."""
        for start in range(0, len(self), block):
            yield start, self.images[start : start + block], self.image_gram[start : start + block]

    @classmethod
    def load(cls, folder: str | Path, image_encoder_id: str | None = None) -> ImageGallery:
        folder = Path(folder)
        data = _read_manifest(folder, "images")
        if image_encoder_id is not None:
            _check_binding(data, "image_encoder_id", image_encoder_id, folder)
        arrays = {name: _open_array(folder, e, name) for name, e in data["arrays"].items()}
        names = None
        if data.get("names_file"):
            try:
                names = json.loads((folder / data["names_file"]).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise GalleryError(f"{folder / data['names_file']}: corrupted names file ({e})") from e
            if len(names) != len(arrays["ids"]):
                raise GalleryError(f"{folder}: {len(names)} names for {len(arrays['ids'])} images")
        return cls(folder, arrays["images"], arrays["image_gram"], arrays["ids"], names, data)

    @classmethod
    def from_arrays(
        cls,
        images: np.ndarray,
        image_gram: np.ndarray,
        names: Sequence[str] | None = None,
        folder: str | Path = "<memory>",
    ) -> ImageGallery:
        """An in-memory gallery of encoded images (nothing is written): ``images`` (N, R, d), ``image_gram``
        (N, R, R) of the same dtype; ids are 0..N-1. For galleries that come from elsewhere than an engine
        (benchmarks' synthetic ones) and are too large to write."""
        if images.ndim != 3 or image_gram.shape != (images.shape[0], images.shape[1], images.shape[1]):
            raise GalleryError(
                f"expected images (N, R, d) and image_gram (N, R, R), received {images.shape} and {image_gram.shape}"
            )
        if images.dtype.name not in DTYPES or image_gram.dtype != images.dtype:
            raise GalleryError(
                f"expected images and image_gram of one dtype in {DTYPES}, received "
                f"{images.dtype.name} and {image_gram.dtype.name}"
            )
        n, r, d = images.shape
        if names is not None and len(names) != n:
            raise GalleryError(f"names: expected one name per image ({n}), received {len(names)}")
        manifest = {
            "format": FORMAT,
            "kind": "images",
            "count": n,
            "dtype": images.dtype.name,
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


def build_image_gallery(
    engine,
    regions: np.ndarray | str | Path,
    folder: str | Path,
    names: Sequence[str] | None = None,
    dtype: str = "float32",
    batch: int = 128,
    append: bool = False,
    progress: bool = True,
    repeated: bool | None = None,
) -> ImageGallery:
    """Encode region features into ``folder`` (or append to the gallery there), atomically.

    ``regions`` is an array or a ``.npy`` path (memory-mapped). ``repeated``: the original's layout
    that repeats every image 5 times (keep every 5th row); None leaves the rows as they are.
    """
    folder = Path(folder)
    if dtype not in DTYPES:
        raise GalleryError(f"dtype must be one of {DTYPES}, received {dtype!r}")
    cfg = engine.config
    if isinstance(regions, (str, Path)):
        regions = load_regions(regions, cfg.img_dim)
    else:
        regions = check_layout(regions, cfg.img_dim)
    if repeated:
        regions = regions[::5]
    n_new = int(regions.shape[0])
    if names is not None and len(names) != n_new:
        raise GalleryError(f"names: expected one name per image ({n_new}), received {len(names)}")
    old: ImageGallery | None = None
    if append and (folder / MANIFEST).is_file():
        old = ImageGallery.load(folder, engine.manifest.image_encoder_id)
        if old.dtype.name != dtype:
            raise GalleryError(f"{folder}: the gallery stores {old.dtype.name}; append with dtype={old.dtype.name}")
        if old.images.shape[1] != regions.shape[1]:
            raise GalleryError(
                f"{folder}: the gallery has {old.images.shape[1]} regions per image, "
                f"the new features have {regions.shape[1]}"
            )
        if (old.names is None) != (names is None):
            raise GalleryError(
                f"{folder}: the gallery {'has' if old.names else 'has no'} names; "
                f"append {'with' if old.names else 'without'} --names"
            )
    n_old = len(old) if old else 0
    n, r, d = n_old + n_new, int(regions.shape[1]), cfg.embed_size
    folder.mkdir(parents=True, exist_ok=True)
    generation = _next_generation(folder)
    files = {"images": (n, r, d), "image_gram": (n, r, r)}
    out = {}
    tmp_paths = {}
    try:
        for name, shape in files.items():
            tmp_paths[name] = folder / f".{name}.{generation}.npy.tmp"
            out[name] = np.lib.format.open_memmap(tmp_paths[name], mode="w+", dtype=np.dtype(dtype), shape=shape)
        if old is not None:
            for start in range(0, n_old, 4096):  # streamed, so memory stays bounded
                stop = min(start + 4096, n_old)
                out["images"][start:stop] = old.images[start:stop]
                out["image_gram"][start:stop] = old.image_gram[start:stop]
        with _progress(n_new, "encoding images", progress) as bar:
            for start in range(0, n_new, batch):
                chunk = np.asarray(regions[start : start + batch])
                try:
                    emb, gram = engine.encode_images(chunk, name=f"regions[{start}:{start + len(chunk)}]")
                except FeatureError as e:
                    raise GalleryError(f"cannot build the gallery: {e}") from e
                out["images"][n_old + start : n_old + start + len(chunk)] = emb
                out["image_gram"][n_old + start : n_old + start + len(chunk)] = gram
                bar.update(len(chunk))
        entries = {}
        for name, arr in out.items():
            arr.flush()
            final = folder / f"{name}.{generation}.npy"
            del arr
            os.replace(tmp_paths[name], final)
            entries[name] = {"file": final.name, "shape": list(files[name]), "dtype": dtype}
        out = {}
        ids = np.concatenate(
            [np.asarray(old.ids) if old else np.zeros(0, np.int64), np.arange(n_old, n, dtype=np.int64)]
        )
        entries.update(_save_arrays(folder, generation, {"ids": ids}))
    finally:
        out = {}
        for p in tmp_paths.values():
            if p.exists():
                p.unlink()
    all_names = (list(old.names) if old and old.names else []) + list(names) if names is not None else None
    extra = {f"names.{generation}.json": all_names} if all_names is not None else {}
    manifest = {
        "format": FORMAT,
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
    }
    _commit(folder, manifest, extra)
    logger.info("image gallery %s: %d images (%d new), %s", folder, n, n_new, dtype)
    return ImageGallery.load(folder)


# ---------------------------------------------------------------------------------------------- captions


@dataclass
class CaptionGallery:
    folder: Path
    words: np.ndarray  # (W, d): words of all captions, captions sorted by length
    offsets: np.ndarray  # (M+1,)
    lengths: np.ndarray  # (M,)
    ids: np.ndarray  # (M,): caption id of each stored caption
    texts: list[str]  # by caption id
    manifest: dict[str, Any]

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def dtype(self) -> np.dtype:
        return self.words.dtype

    def blocks(self, block: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(position, captions (B, L, d) view, lengths (B,)) over runs of equal length, at most ``block`` each."""
        m = len(self)
        start = 0
        while start < m:
            length = int(self.lengths[start])
            stop = int(np.searchsorted(self.lengths, length, side="right"))
            for a in range(start, stop, block):
                b = min(a + block, stop)
                lo, hi = int(self.offsets[a]), int(self.offsets[b])
                yield a, self.words[lo:hi].reshape(b - a, length, -1), self.lengths[a:b]
            start = stop

    @classmethod
    def load(cls, folder: str | Path, text_encoder_id: str | None = None) -> CaptionGallery:
        folder = Path(folder)
        data = _read_manifest(folder, "captions")
        if text_encoder_id is not None:
            _check_binding(data, "text_encoder_id", text_encoder_id, folder)
        arrays = {name: _open_array(folder, e, name) for name, e in data["arrays"].items()}
        try:
            texts = json.loads((folder / data["texts_file"]).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise GalleryError(f"{folder / data['texts_file']}: corrupted captions file ({e})") from e
        lengths = np.asarray(arrays["lengths"])
        offsets = np.asarray(arrays["offsets"])
        if len(texts) != len(lengths) or offsets[-1] != arrays["words"].shape[0] or np.any(np.diff(lengths) < 0):
            raise GalleryError(f"{folder}: corrupted caption gallery (inconsistent lengths/offsets/texts)")
        return cls(folder, arrays["words"], offsets, lengths, np.asarray(arrays["ids"]), texts, data)

    @classmethod
    def from_arrays(
        cls,
        words: np.ndarray,
        lengths: np.ndarray,
        texts: Sequence[str],
        ids: np.ndarray | None = None,
        folder: str | Path = "<memory>",
    ) -> CaptionGallery:
        """An in-memory gallery of encoded captions (nothing is written), in the stored layout.

        ``words`` (W, d): every stored caption's words, concatenated; ``lengths`` (M,): their lengths,
        non-decreasing (the stored order); ``ids`` (M,): the caption id of each stored caption (default
        0..M-1); ``texts``: the captions' texts by id.
        """
        lengths = np.asarray(lengths, dtype=np.int64)
        ids = np.arange(len(lengths), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        if words.ndim != 2 or words.dtype.name not in DTYPES:
            raise GalleryError(
                f"words: expected a (W, d) array of a dtype in {DTYPES}, received {words.dtype.name}{list(words.shape)}"
            )
        if lengths.ndim != 1 or np.any(lengths < 1) or np.any(np.diff(lengths) < 0):
            raise GalleryError("lengths: expected positive caption lengths in non-decreasing order (the stored order)")
        if int(lengths.sum()) != words.shape[0]:
            raise GalleryError(
                f"words: expected {int(lengths.sum())} rows (the sum of lengths), received {words.shape[0]}"
            )
        if ids.shape != lengths.shape or len(texts) != len(lengths):
            raise GalleryError(
                f"expected one id and one text per caption ({len(lengths)}), received {len(ids)} ids "
                f"and {len(texts)} texts"
            )
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        manifest = {
            "format": FORMAT,
            "kind": "captions",
            "count": len(lengths),
            "dtype": words.dtype.name,
            "embed_size": int(words.shape[1]),
            "arrays": {},
        }
        return cls(Path(folder), words, offsets, lengths, ids, list(texts), manifest)


def build_caption_gallery(
    engine,
    captions: Sequence[str],
    folder: str | Path,
    dtype: str = "float32",
    batch: int = 256,
    append: bool = False,
    progress: bool = True,
) -> CaptionGallery:
    """Encode ``captions`` into a ragged, length-sorted caption gallery (or append to one), atomically."""
    folder = Path(folder)
    if dtype not in DTYPES:
        raise GalleryError(f"dtype must be one of {DTYPES}, received {dtype!r}")
    if len(captions) == 0:
        raise GalleryError("captions: expected at least one caption, received none")
    old: CaptionGallery | None = None
    if append and (folder / MANIFEST).is_file():
        old = CaptionGallery.load(folder, engine.manifest.text_encoder_id)
        if old.dtype.name != dtype:
            raise GalleryError(f"{folder}: the gallery stores {old.dtype.name}; append with dtype={old.dtype.name}")
    ids, lengths = engine.tokenizer.encode_batch(list(captions))  # validates every caption first
    n_old = len(old) if old else 0
    d = engine.config.embed_size
    # Encode length-sorted batches (little padding), then keep each caption's unpadded words.
    new_words: list[np.ndarray] = [np.zeros((0, d), np.float32)] * len(captions)
    with _progress(len(captions), "encoding captions", progress) as bar:
        for idx, emb in encode_by_length(engine, ids, lengths, batch):  # emb (B, width, d)
            for row, j in enumerate(idx):
                new_words[j] = emb[row, : lengths[j]]
            bar.update(len(idx))
    all_lengths = np.concatenate([old.lengths if old else np.zeros(0, np.int64), lengths]).astype(np.int64)
    all_ids = np.concatenate(
        [old.ids if old else np.zeros(0, np.int64), np.arange(n_old, n_old + len(captions), dtype=np.int64)]
    )
    sort = np.argsort(all_lengths, kind="stable")
    total = int(all_lengths.sum())
    generation = _next_generation(folder) if folder.exists() else 1
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".words.{generation}.npy.tmp"
    try:
        words = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(total, d))
        pos = 0
        for s in sort:
            length = int(all_lengths[s])
            if s < n_old:  # s is a stored position of the old gallery
                src = old.words[int(old.offsets[s]) : int(old.offsets[s]) + length]
            else:
                src = new_words[s - n_old]
            words[pos : pos + length] = src
            pos += length
        words.flush()
        del words
        final = folder / f"words.{generation}.npy"
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    sorted_lengths = all_lengths[sort]
    offsets = np.concatenate([[0], np.cumsum(sorted_lengths)]).astype(np.int64)
    entries = {"words": {"file": final.name, "shape": [total, d], "dtype": dtype}}
    entries.update(
        _save_arrays(folder, generation, {"offsets": offsets, "lengths": sorted_lengths, "ids": all_ids[sort]})
    )
    texts = (list(old.texts) if old else []) + [str(c) for c in captions]
    texts_file = f"texts.{generation}.json"
    manifest = {
        "format": FORMAT,
        "kind": "captions",
        "generation": generation,
        "count": len(texts),
        "text_encoder_id": engine.manifest.text_encoder_id,
        "config": engine.config.to_dict(),
        "model": engine.manifest.name,
        "dtype": dtype,
        "embed_size": d,
        "arrays": entries,
        "texts_file": texts_file,
    }
    _commit(folder, manifest, {texts_file: texts})
    logger.info("caption gallery %s: %d captions (%d new), %s", folder, len(texts), len(captions), dtype)
    return CaptionGallery.load(folder)
