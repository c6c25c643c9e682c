"""The shards layout of a gallery folder: S shards of contiguous id ranges, split from one gallery folder
and merged back (the command line: runtime/shards.py).

A sharded gallery is a folder with ``shards.json`` and one gallery folder per shard (``shard-0``,
``shard-1``, ...), each holding ``images/`` and/or ``captions/`` caches exactly as runtime/search.py
lays them out, so a shard loads (and searches, with local ids) on its own. Each shard folder also
holds ``shard.json``: its index and the global id of its first image and first caption. A shard
answers with global ids: local id + offset. Shard i's range ends where shard i + 1's begins;
appends go to the last shard (its range is open-ended), so global ids stay those of the unsharded
gallery followed by the appended items, exactly as if the gallery had never been split.

Split and merge only copy encoded arrays (no engine runs) through the gallery module's writers,
into a temporary sibling folder renamed into place at the end: an interrupted run leaves the
source untouched and no half-written output.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime import atomic
from runtime.gallery.captions import CaptionGallery, write_caption_gallery
from runtime.gallery.folder import GalleryFolder
from runtime.gallery.images import ImageGallery, write_image_gallery
from runtime.gallery.store import MANIFEST, GalleryError, read_format

logger = logging.getLogger(__name__)

FORMAT = "scan-shards/1"
SHARD_FORMAT = "scan-shard/1"
LAYOUT = "shards.json"
SHARD = "shard.json"
KINDS = ("images", "captions")


class ShardError(GalleryError):
    """A sharded gallery is missing, inconsistent, or cannot be split as asked."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard folder and the global id of its first image / caption."""

    folder: Path
    index: int
    images_offset: int
    captions_offset: int

    def offset(self, kind: str) -> int:
        return self.images_offset if kind == "images" else self.captions_offset


def read_shard(folder: str | Path) -> ShardInfo:
    folder = Path(folder)
    path = folder / SHARD
    missing = f"{folder}: not a shard ({SHARD} missing); make shards with runtime/shards.py split"
    data = read_format(path, SHARD_FORMAT, "shard file", ShardError, missing)
    try:
        return ShardInfo(folder, int(data["index"]), int(data["images_offset"]), int(data["captions_offset"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(f"{path}: corrupted shard file (missing or non-integer {e})") from e


def read_layout(folder: str | Path) -> list[ShardInfo]:
    """The shards of a sharded gallery, in id order, checked to be numbered 0..S-1 with ascending offsets.
    (Whether each range ends where the next begins needs the galleries' sizes: see ``check_contiguous``.)"""
    folder = Path(folder)
    path = folder / LAYOUT
    if not path.is_file():
        hint = " (it is an unsharded gallery: split it with runtime/shards.py split)" if _has_gallery(folder) else ""
        raise ShardError(f"{folder}: no sharded gallery here ({LAYOUT} missing){hint}")
    names = read_format(path, FORMAT, "shard layout", ShardError).get("shards")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ShardError(f"{path}: expected format {FORMAT!r} with a non-empty list of shard folders")
    shards = [read_shard(folder / name) for name in names]
    for i, s in enumerate(shards):
        if s.index != i:
            raise ShardError(f"{s.folder / SHARD}: shard index {s.index}, but it is listed at position {i} in {path}")
    return shards


def check_contiguous(shards: list[ShardInfo], sizes: list[dict[str, int]]) -> None:
    """Shard i's ids end where shard i + 1's begin, for both kinds (``sizes``: item counts per shard)."""
    for kind in KINDS:
        expected = 0
        for s, size in zip(shards, sizes):
            if s.offset(kind) != expected:
                raise ShardError(
                    f"{s.folder}: its {kind} start at global id {s.offset(kind)}, but the shards before "
                    f"it hold {expected}; was a shard other than the last appended to?"
                )
            expected += size.get(kind, 0)


def load_shard(folder: str | Path, engine=None) -> tuple[ShardInfo, ImageGallery | None, CaptionGallery | None]:
    """A shard's info and its galleries (None where the shard has no gallery of that kind), checked to be
    ``engine``'s when one is given."""
    info = read_shard(folder)
    return (info, *_single(info.folder, engine))


def _single(folder: Path, engine=None) -> tuple[ImageGallery | None, CaptionGallery | None]:
    """The caches of a gallery folder of one model (None where it has no gallery of that kind)."""
    loaded = GalleryFolder(folder, () if engine is None else engine).load()
    return tuple(None if g is None else g[0] for g in (loaded.images, loaded.captions))


def boundaries(n: int, shards: int, kind: str) -> np.ndarray:
    """Start ids of ``shards`` contiguous ranges over n items, as even as possible: (shards + 1,)."""
    if n < shards:
        raise ShardError(
            f"--shards: cannot split {n} {kind} into {shards} shards (each needs at least one); use at most {n} shards"
        )
    return np.array([i * n // shards for i in range(shards + 1)], np.int64)


# ---------------------------------------------------------------------------------------------- split


def split(gallery: str | Path, out: str | Path, shards: int) -> list[ShardInfo]:
    """Split the gallery folder ``gallery`` (images/ and/or captions/) into ``shards`` shards at ``out``."""
    gallery, out = Path(gallery), Path(out)
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ShardError(f"--shards must be a positive integer, received {shards!r}")
    images, captions = _single(gallery)
    if images is None and captions is None:
        raise ShardError(f"{gallery}: no gallery to split (expected images/{MANIFEST} or captions/{MANIFEST})")
    image_starts = boundaries(len(images), shards, "images") if images is not None else np.zeros(shards + 1, np.int64)
    caption_starts = (
        boundaries(len(captions), shards, "captions") if captions is not None else np.zeros(shards + 1, np.int64)
    )
    with _staging(out) as tmp:
        names = []
        for i in range(shards):
            folder = tmp / f"shard-{i}"
            a, b = int(image_starts[i]), int(image_starts[i + 1])
            if images is not None:
                write_image_gallery(
                    folder / "images",
                    [images.images[a:b]],
                    [images.image_gram[a:b]],
                    images.names[a:b] if images.names is not None else None,
                    images.manifest,
                    None if images.boxes is None else [images.boxes[a:b]],
                )
            c, d = int(caption_starts[i]), int(caption_starts[i + 1])
            if captions is not None:
                _write_caption_range(captions, c, d, folder / "captions")
            atomic.write_json(
                folder / SHARD, {"format": SHARD_FORMAT, "index": i, "images_offset": a, "captions_offset": c}
            )
            names.append(folder.name)
        source = {"folder": str(gallery.resolve()), **_generations(images, captions)}
        atomic.write_json(tmp / LAYOUT, {"format": FORMAT, "shards": names, "source": source})
    logger.info("split %s into %d shards at %s", gallery, shards, out)
    return read_layout(out)


def ensure_split(gallery: str | Path, shards: int) -> Path:
    """The sharded gallery to serve for ``gallery`` with ``shards`` shards: ``gallery`` itself when it is
    sharded; else ``<gallery>.shards-<S>`` beside it, split now if it does not exist
    yet, refused if it was split from an older generation of ``gallery`` (it would miss later appends)."""
    gallery = Path(gallery)
    if (gallery / LAYOUT).is_file():
        layout = read_layout(gallery)
        if len(layout) != shards:
            raise ShardError(
                f"{gallery}: holds {len(layout)} shards, --shards says {shards}; merge and split it "
                f"again with runtime/shards.py to change the number of shards"
            )
        return gallery
    out = gallery.with_name(f"{gallery.name}.shards-{shards}")
    if not (out / LAYOUT).is_file():
        split(gallery, out, shards)
        return out
    layout = read_layout(out)
    recorded = json.loads((out / LAYOUT).read_text(encoding="utf-8")).get("source", {})
    current = _generations(*_single(gallery))
    if len(layout) != shards or any(recorded.get(key) != value for key, value in current.items()):
        raise ShardError(
            f"{out}: split from another state of {gallery} (or into another number of shards); "
            f"remove it to split again, or serve it directly with --gallery {out}"
        )
    return out


def _generations(images: ImageGallery | None, captions: CaptionGallery | None) -> dict[str, int | None]:
    return {
        "images_generation": images.manifest.get("generation") if images is not None else None,
        "captions_generation": captions.manifest.get("generation") if captions is not None else None,
    }


def _write_caption_range(captions: CaptionGallery, start: int, stop: int, folder: Path) -> None:
    """Captions with ids in [start, stop), relabelled from 0, keeping the stored (length, id) order."""
    keep = np.flatnonzero((captions.ids >= start) & (captions.ids < stop))  # stored positions, still sorted
    lengths = captions.lengths[keep]
    write_caption_gallery(
        folder,
        _word_rows(captions, [keep]),
        lengths,
        captions.ids[keep] - start,
        captions.texts[start:stop],
        captions.manifest,
    )


def _word_rows(
    captions: CaptionGallery | list[CaptionGallery], positions: list[np.ndarray], rows: int = 4096
) -> Iterator[np.ndarray]:
    """Word rows of the captions at stored ``positions`` (one array per gallery), in that order, in
    blocks of about ``rows`` rows (memory stays bounded for any gallery)."""
    galleries = captions if isinstance(captions, list) else [captions]
    for gallery, pos in zip(galleries, positions):
        starts, lengths = gallery.offsets[pos], gallery.lengths[pos]
        step = max(1, rows // max(1, int(lengths.max(initial=1))))
        for a in range(0, len(pos), step):
            s, n = starts[a : a + step], lengths[a : a + step]
            ends = np.cumsum(n)
            yield np.asarray(gallery.words[np.repeat(s - (ends - n), n) + np.arange(int(ends[-1]))])


# ---------------------------------------------------------------------------------------------- merge


def merge(shards_dir: str | Path, out: str | Path) -> Path:
    """Merge a sharded gallery back into one gallery folder at ``out`` (global ids become its ids)."""
    shards = read_layout(shards_dir)
    out = Path(out)
    loaded = [load_shard(s.folder) for s in shards]
    check_contiguous(shards, [_sizes(im, cap) for _, im, cap in loaded])
    with _staging(out) as tmp:
        for kind in KINDS:
            parts = [im if kind == "images" else cap for _, im, cap in loaded]
            if all(p is None for p in parts):
                continue
            if any(p is None for p in parts):
                missing = [str(s.folder) for s, p in zip(shards, parts) if p is None]
                raise ShardError(f"{', '.join(missing)}: no {kind} gallery in this shard, the others have one")
            _check_same_encoder(parts, kind)
            if kind == "images":
                with_names = [p.names is not None for p in parts]
                if any(with_names) and not all(with_names):
                    raise ShardError(f"{shards_dir}: some shards' images have names and some do not")
                names = [n for p in parts for n in p.names] if all(with_names) else None
                with_boxes = [p.boxes is not None for p in parts]
                if any(with_boxes) and not all(with_boxes):
                    raise ShardError(f"{shards_dir}: some shards' images have region boxes and some do not")
                write_image_gallery(
                    tmp / "images",
                    [p.images for p in parts],
                    [p.image_gram for p in parts],
                    names,
                    parts[0].manifest,
                    [p.boxes for p in parts] if all(with_boxes) else None,
                )
            else:
                _write_caption_merge(parts, tmp / "captions")
    logger.info("merged %d shards of %s into %s", len(shards), shards_dir, out)
    return out


def _write_caption_merge(parts: list[CaptionGallery], folder: Path) -> None:
    offsets = np.cumsum([0] + [len(p) for p in parts])
    lengths = np.concatenate([p.lengths for p in parts])
    ids = np.concatenate([p.ids + off for p, off in zip(parts, offsets)])
    order = np.lexsort((ids, lengths))  # the unsharded gallery's stored order: by length, then id
    which = np.searchsorted(offsets, order, side="right") - 1  # the part each stored caption comes from
    local = order - offsets[which]
    # Word rows in merged order, read part by part in runs so each read is one fancy-index per run.
    runs = np.flatnonzero(np.diff(which)) + 1
    pieces_parts, pieces_pos = [], []
    for seg in np.split(np.arange(len(order)), runs):
        if len(seg):
            pieces_parts.append(parts[int(which[seg[0]])])
            pieces_pos.append(local[seg])
    texts = [t for p in parts for t in p.texts]
    write_caption_gallery(
        folder, _word_rows(pieces_parts, pieces_pos), lengths[order], ids[order], texts, parts[0].manifest
    )


def _check_same_encoder(parts: list, kind: str) -> None:
    key = "image_encoder_id" if kind == "images" else "text_encoder_id"
    for p in parts[1:]:
        for field in (key, "dtype"):
            if p.manifest.get(field) != parts[0].manifest.get(field):
                raise ShardError(
                    f"{p.folder}: {field} {str(p.manifest.get(field))[:12]} differs from "
                    f"{parts[0].folder}'s {str(parts[0].manifest.get(field))[:12]}; these shards do "
                    f"not belong together"
                )


def _sizes(images: ImageGallery | None, captions: CaptionGallery | None) -> dict[str, int]:
    return {
        "images": len(images) if images is not None else 0,
        "captions": len(captions) if captions is not None else 0,
    }


def _has_gallery(folder: Path) -> bool:
    return any((folder / kind / MANIFEST).is_file() for kind in KINDS)


class _staging:
    """Write into a hidden sibling of ``out`` and rename it into place on success (``out`` must not exist)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.tmp = out.parent / f".{out.name}.partial-{os.getpid()}"

    def __enter__(self) -> Path:
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise ShardError(f"{self.out}: already exists; choose a new output folder (nothing was written)")
        for stale in self.out.parent.glob(f".{self.out.name}.partial-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            if self.out.is_dir():
                self.out.rmdir()  # empty (checked on entry)
            os.replace(self.tmp, self.out)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
