"""A gallery folder, whatever its layout: what searches open and what writes extend.

* one model: ``images/`` and ``captions/``, one cache each (``runtime/gallery/__init__.py``);
* members (several engines, an ensemble): ``ensemble.json`` and one cache per member
  (``runtime/gallery/members.py``);
* shards: ``shards.json`` and ``shard-i/`` folders, each a gallery folder of one model
  (``runtime/gallery/shards.py``).

``GalleryFolder(path, engines)`` opens the first two by the number of engines; a shard is opened as a
gallery folder of its own. Loads retry when a writer commits meanwhile (``store.load_consistent``); writes
commit every member together and keep each cache's candidate index up to date under the writer lock.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.features import load_regions
from runtime.gallery.captions import CaptionGallery, build_caption_gallery
from runtime.gallery.images import ImageGallery, build_image_gallery, load_boxes
from runtime.gallery.members import (
    ENSEMBLE,
    KINDS,
    check_distinct,
    encoder_id,
    load_members,
    member_folder,
    member_label,
    no_members,
    read_members,
    write_members,
)
from runtime.gallery.store import MANIFEST, GalleryError, manifest_generation
from runtime.options import WriteOptions


@dataclass(frozen=True)
class Galleries:
    """A gallery folder's caches: per kind, one per member in the engines' order (None: no such gallery).

    ``generation``: the members file's (members layout); one model's caches each carry their own
    (``gallery.manifest["generation"]``)."""

    images: tuple[ImageGallery, ...] | None = None
    captions: tuple[CaptionGallery, ...] | None = None
    generation: int | None = None


class GalleryFolder:
    """The gallery folder ``path`` as ``engines`` (one ``ScanEngine`` or several: the members) use it."""

    def __init__(self, path: str | Path, engines: Any | Sequence[Any] = ()) -> None:
        self.path = Path(path)
        self.engines = list(engines) if isinstance(engines, (list, tuple)) else [engines]
        check_distinct(self.engines)
        self._seen: dict[tuple[Path, str], tuple[Any, int | None]] = {}  # generation() by the manifest's stat

    @property
    def members(self) -> bool:
        """Whether this is the members layout (several engines)."""
        return len(self.engines) > 1

    def load(self, verify: bool | None = None, kinds: Sequence[str] = KINDS) -> Galleries:
        """The folder's caches of ``kinds``, memory-mapped; ``verify`` as ``ImageGallery.load``'s.

        Members: a kind is loaded when the members file lists it or a single model's cache is there (which
        is refused, naming the missing members)."""
        found: dict[str, tuple | None] = {}
        generation = None
        members = read_members(self.path) if self.members and self.path.is_dir() else None
        for kind in kinds:
            if self.members and ((members or {}).get(kind) is not None or (self.path / kind / MANIFEST).is_file()):
                galleries, generation = load_members(self.path, self.engines, kind, verify)
                found[kind] = tuple(galleries)
            elif not self.members and (self.path / kind / MANIFEST).is_file():
                cls = ImageGallery if kind == "images" else CaptionGallery
                bound = encoder_id(self.engines[0], kind) if self.engines else None
                found[kind] = (cls.load(self.path / kind, bound, verify=verify),)
        return Galleries(found.get("images"), found.get("captions"), generation)

    def generation(self, kind: str) -> int | None:
        """The committed generation of the ``kind`` caches (None: none, or unreadable): one small read, so a
        server can look before each answer whether another writer committed."""
        path = self.path / ENSEMBLE if self.members else self.path / kind / MANIFEST
        try:
            st = os.stat(path)
        except OSError:
            return None
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)  # a commit renames a new file into place
        if self._seen.get((path, kind), (None,))[0] == seen:
            return self._seen[(path, kind)][1]
        if self.members:
            try:
                members = read_members(self.path)
            except GalleryError:
                return None
            number = members.get("generation") if members and members.get(kind) is not None else None
        else:
            number = manifest_generation(self.path / kind)
        self._seen[(path, kind)] = (seen, number)
        return number

    def missing(self, kind: str) -> str:
        """Why this folder has no ``kind`` gallery for these engines."""
        if self.members:
            return no_members(self.path, self.engines, kind)
        if kind == "images":
            return f"{self.path / kind}: no image gallery for text queries; build it with --images"
        return f"{self.path / kind}: no caption gallery for image queries; build it with --captions"

    # ------------------------------------------------------------------ writing

    def write_images(
        self,
        regions: np.ndarray | str | Path,
        names: Sequence[str] | None = None,
        options: WriteOptions = WriteOptions(),
        repeated: bool | None = None,
        boxes: np.ndarray | str | Path | None = None,
    ) -> Galleries:
        """Encode region features with every engine into the folder (or append them, ``options.append``), with
        the images' region ``boxes`` when given (every member's cache keeps them). Only ``images`` is set in
        the result."""
        if self.members:
            if len({e.config.img_dim for e in self.engines}) > 1:
                raise GalleryError(
                    "the ensemble's members take different region features: "
                    + ", ".join(f"{member_label(e, i)} img_dim {e.config.img_dim}" for i, e in enumerate(self.engines))
                )
            if isinstance(regions, (str, Path)):  # read (memory-mapped) once for all members
                regions = load_regions(regions, self.engines[0].config.img_dim)
            if isinstance(boxes, (str, Path)):
                boxes = load_boxes(boxes, len(regions), regions.shape[1] if regions.ndim == 3 else 0)
        return self._write(
            "images",
            lambda engine, folder, o: build_image_gallery(engine, regions, folder, names, o, repeated, boxes=boxes),
            options,
        )

    def write_captions(self, captions: Sequence[str], options: WriteOptions = WriteOptions()) -> Galleries:
        """Encode captions with every engine into the folder (or append them). Only ``captions`` is set."""
        if self.members:
            for e in self.engines:  # every member must accept every caption before any is encoded
                e.tokenizer.encode_batch(list(captions))
        return self._write(
            "captions", lambda engine, folder, o: build_caption_gallery(engine, captions, folder, o), options
        )

    def _write(self, kind: str, build, options: WriteOptions) -> Galleries:
        if not self.members:
            return Galleries(**{kind: (build(self.engines[0], self.path / kind, options),)})
        galleries, generation = write_members(self.path, self.engines, kind, build, options)
        return Galleries(**{kind: tuple(galleries)}, generation=generation)

    # ------------------------------------------------------------------ verification

    def verify(self) -> list[tuple[Path, str, int]]:
        """Every check (``_verify``) on every cache of the folder: ``[(cache folder, kind, items)]``."""
        if self.members:
            index = read_members(self.path)
            if index is None or not any(index.get(kind) for kind in KINDS):
                raise GalleryError(f"{self.path}: no ensemble gallery to verify ({ENSEMBLE} missing or empty)")
            folders = [
                (member_folder(self.path, m, kind), kind)
                for kind in KINDS
                for m in (index.get(kind) or {}).get("members", {}).values()
            ]
        else:
            folders = [(self.path / kind, kind) for kind in KINDS if (self.path / kind / MANIFEST).is_file()]
            if not folders:
                raise GalleryError(f"{self.path}: no gallery to verify (no images/{MANIFEST} or captions/{MANIFEST})")
        return [(folder, kind, _verify(folder, kind)) for folder, kind in folders]


def _verify(folder: Path, kind: str) -> int:
    """Open the cache in ``folder`` with every check (checksums, finite values, ids, consistency): its size."""
    with (ImageGallery if kind == "images" else CaptionGallery).load(folder, verify=True) as gallery:
        ids = np.asarray(gallery.ids)
        if len(ids) and np.bincount(ids, minlength=len(ids)).max() > 1:
            raise GalleryError(
                f"{folder / gallery.manifest['arrays']['ids']['file']}: corrupted gallery file: repeated ids"
            )
        return len(gallery)
