"""The members layout of a gallery folder: one cache per member of an ensemble, committed together.

A cache is bound to the encoder that made it, so each member keeps its own, found by its encoder id. The
folder a single model uses (``images/``, ``captions/``) is left as it is; an ensemble adds::

    GALLERY/ensemble.json                      the members file: which caches form the current generation
    GALLERY/images/<image_encoder_id[:12]>.<generation>/     one member's image cache (a gallery folder)
    GALLERY/captions/<text_encoder_id[:12]>.<generation>/    one member's caption cache

A build or an append writes a new generation folder for every member (an append starts from hard links
to the current generation's immutable files, so it copies nothing) and only then replaces the members
file: a build that fails or is interrupted for any member leaves every member as it was. Folders of
older generations are removed after the commit. Writers take a lock on the folder. Members sharing an
encoder (the same image encoder in two models) share its cache.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime import atomic
from runtime.gallery.captions import CaptionGallery
from runtime.gallery.images import ImageGallery
from runtime.gallery.store import (
    MANIFEST,
    GalleryError,
    check_key,
    load_consistent,
    mapped,
    read_format,
    with_key,
    writer_lock,
)
from runtime.options import WriteOptions

logger = logging.getLogger(__name__)

ENSEMBLE = "ensemble.json"
FORMAT = "scan-ensemble-gallery/1"
KINDS = ("images", "captions")
_MEMBER_FOLDER = re.compile(r"^[0-9a-zA-Z_-]{1,64}\.\d+$")


def encoder_id(engine: Any, kind: str) -> str:
    """The id a member's ``kind`` cache is bound to: its image encoder's for images, text encoder's for captions."""
    return engine.manifest.image_encoder_id if kind == "images" else engine.manifest.text_encoder_id


def member_label(engine: Any, index: int | None = None) -> str:
    """How errors name a member: its position and manifest."""
    where = f"member {index + 1} " if index is not None else ""
    return f"{where}({engine.manifest.path})"


def check_distinct(engines: Sequence[Any]) -> None:
    """Refuse an ensemble with the same engine twice (the same image and text encoders, opened with the same
    options): it would score as that engine alone. (The same model on two backends or precisions is allowed.)"""
    seen: dict[tuple, int] = {}
    for i, e in enumerate(engines):
        key = (e.manifest.image_encoder_id, e.manifest.text_encoder_id, getattr(e, "options", None))
        if key in seen:
            first = seen[key]
            raise GalleryError(
                f"{member_label(engines[first], first)} and {member_label(e, i)} are the same engine (image "
                f"encoder {key[0][:12]}, text encoder {key[1][:12]}, same options): an ensemble of an engine with "
                f"itself scores as the engine alone; pass it once"
            )
        seen[key] = i


def read_members(root: Path) -> dict[str, Any] | None:
    """The members file of ``root``, or None when there is none."""
    path = root / ENSEMBLE
    if not path.is_file():
        return None
    data = read_format(path, FORMAT, "ensemble gallery index")
    for kind in KINDS:
        entry = data.get(kind)
        if entry is not None and not (isinstance(entry, dict) and isinstance(entry.get("members"), dict)):
            raise GalleryError(f"{path}: corrupted ensemble gallery index ({kind} has no members map)")
    return data


def _missing(engines: Sequence[Any], kind: str, have: dict[str, Any]) -> str:
    """Names the members without a cache in ``have`` ({encoder id: member record}) and what it holds."""
    key = "image encoder" if kind == "images" else "text encoder"
    missing = [
        f"{member_label(e, i)} ({key} {encoder_id(e, kind)[:12]})"
        for i, e in enumerate(engines)
        if encoder_id(e, kind) not in have
    ]
    held = ", ".join(f"{m.get('engine') or m.get('model', '?')} ({key} {eid[:12]})" for eid, m in have.items())
    return f"no cache for {'; '.join(missing)} (it holds: {held or 'none'})"


def _build_hint(engines: Sequence[Any], root: Path, kind: str, rebuild: str = " --rebuild") -> str:
    flags = " ".join(f"--engine {e.manifest.path}" for e in engines)
    source = "--images FEATS.npy" if kind == "images" else "--captions CAPTIONS.txt"
    return f"runtime/search.py {flags} --gallery {root} {source}{rebuild}"


def no_members(root: Path, engines: Sequence[Any], kind: str) -> str:
    """Why ``root`` holds no ``kind`` caches for these members."""
    single = root / kind / MANIFEST
    if single.is_file():
        try:
            data = json.loads(single.read_text(encoding="utf-8"))
            key = "image_encoder_id" if kind == "images" else "text_encoder_id"
            have = {str(data.get(key)): {"model": data.get("model", "?")}}
        except (OSError, ValueError, AttributeError):
            have = {}
        return (
            f"{root / kind}: this {kind} gallery was built for one model only, not for an ensemble: "
            f"{_missing(engines, kind, have)}. Build it for every member: {_build_hint(engines, root, kind)}"
        )
    return (
        f"{root}: no ensemble {kind} gallery here ({ENSEMBLE} has no {kind}); build one with "
        f"{_build_hint(engines, root, kind, '')}"
    )


# ---------------------------------------------------------------------------------------------- reading


def load_members(root: Path, engines: Sequence[Any], kind: str, verify: bool | None = None) -> tuple[list, int]:
    """Each member's ``kind`` cache in ``root``, in the engines' order, checked to agree (same items, same
    order), and the generation they belong to. A gallery without a cache for some member is refused,
    naming it."""

    def load() -> tuple[list, int]:
        index = read_members(root) or {}
        entry = index.get(kind)
        if entry is None:
            raise GalleryError(no_members(root, engines, kind))
        members = entry["members"]
        if any(encoder_id(e, kind) not in members for e in engines):
            raise GalleryError(
                f"{root}: the ensemble's {kind} gallery has {_missing(engines, kind, members)}. "
                f"Build it for every member: {_build_hint(engines, root, kind)}"
            )
        cls = ImageGallery if kind == "images" else CaptionGallery
        galleries = [
            cls.load(member_folder(root, members[encoder_id(e, kind)], kind), encoder_id(e, kind), verify=verify)
            for e in engines
        ]
        check_agreement(galleries, engines, kind)
        return galleries, index["generation"]

    return load_consistent(lambda: (read_members(root) or {}).get("generation"), load, root)


def member_folder(root: Path, member: Any, kind: str) -> Path:
    folder = member.get("folder") if isinstance(member, dict) else None
    if not isinstance(folder, str) or not _MEMBER_FOLDER.match(Path(folder).name) or Path(folder).parent.name != kind:
        raise GalleryError(f"{root / ENSEMBLE}: corrupted ensemble gallery index (member folder {folder!r})")
    return root / folder


def check_agreement(
    galleries: Sequence[ImageGallery] | Sequence[CaptionGallery], engines: Sequence[Any], kind: str
) -> None:
    """Refuse member galleries that do not hold the same items in the same order, naming the mismatch."""
    first = galleries[0]
    label0 = f"{member_label(engines[0], 0)}'s {first.folder}"
    for i, g in enumerate(galleries[1:], 1):
        label = f"{member_label(engines[i], i)}'s {g.folder}"
        if len(g) != len(first):
            raise GalleryError(
                f"the ensemble's members disagree on the {kind} gallery: {label0} holds {len(first)} "
                f"{kind}, {label} {len(g)}; rebuild them together"
            )
        arrays = [("ids", first.ids, g.ids)]
        if kind == "captions":
            arrays.append(("caption lengths", first.lengths, g.lengths))
        for name, a, b in arrays:
            a, b = np.asarray(a), np.asarray(b)
            if not np.array_equal(a, b):
                at = int(np.flatnonzero(a != b)[0])
                raise GalleryError(
                    f"the ensemble's members disagree on the {kind} gallery's order: {name} at "
                    f"position {at} is {a[at]} in {label0}, {b[at]} in {label}; rebuild them together"
                )
        labels = [("names", first.names, g.names)] if kind == "images" else [("texts", first.texts, g.texts)]
        for name, a, b in labels:
            if (a is None) != (b is None):
                raise GalleryError(
                    f"the ensemble's members disagree on the {kind} gallery: {label0} "
                    f"{'has' if a is not None else 'has no'} {name}, {label} "
                    f"{'has' if b is not None else 'has no'}; rebuild them together"
                )
            if a is not None and list(a) != list(b):
                at = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
                raise GalleryError(
                    f"the ensemble's members disagree on the {kind} gallery: {name}[{at}] is "
                    f"{a[at]!r} in {label0}, {b[at]!r} in {label}; rebuild them together"
                )


# ---------------------------------------------------------------------------------------------- writing


def _link_tree(src: Path, dst: Path) -> None:
    """``dst`` holding hard links to ``src``'s files (a copy where the filesystem has no hard links).

    Gallery files are never modified in place (a new generation writes new files and replaces
    ``gallery.json`` by a rename), so linking is as safe as copying.
    """
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if not p.is_file() or p.name.startswith("."):  # locks and temporaries stay behind
            continue
        try:
            os.link(p, dst / p.name)
        except OSError:
            shutil.copy2(p, dst / p.name)


def write_members(
    root: Path,
    engines: Sequence[Any],
    kind: str,
    build: Callable[[Any, Path, WriteOptions], Any],
    options: WriteOptions,
) -> tuple[list, int]:
    """Build (or, with ``options.append``, extend) every member's ``kind`` cache with ``build(engine, folder,
    options)`` (a ``build_image_gallery`` / ``build_caption_gallery`` call), then commit them together:
    (the galleries in the engines' order, the new generation).

    Appending to a gallery whose members are not exactly the engines' is refused (naming the difference):
    the members left out would fall behind. ``append=False`` replaces the ensemble's ``kind`` caches.
    """
    if root.exists() and not root.is_dir():
        raise GalleryError(f"{root}: expected a gallery folder, found a file")
    members: dict[str, Any] = {}  # {encoder id: first engine with it}: members sharing an encoder share its cache
    for e in engines:
        members.setdefault(encoder_id(e, kind), e)
    with writer_lock(root, options.lock_timeout):
        index = read_members(root) or {"format": FORMAT, "generation": 0}
        entry = index.get(kind)
        if options.append and entry is None and (root / kind / MANIFEST).is_file():
            raise GalleryError(
                f"{root / kind}: this {kind} gallery was built for one model only; an ensemble keeps "
                f"one cache per member beside it. Build the ensemble's with --rebuild (the "
                f"single-model gallery stays as it is)"
            )
        extend = options.append and entry is not None
        if extend and set(entry["members"]) != set(members):
            old = entry["members"]
            if set(members) - set(old):
                raise GalleryError(
                    f"{root}: the ensemble's {kind} gallery has {_missing(engines, kind, old)}; "
                    f"rebuild it with every member (--rebuild) to add one"
                )
            extra = [
                f"{m.get('engine') or m.get('model', '?')} ({eid[:12]})" for eid, m in old.items() if eid not in members
            ]
            raise GalleryError(
                f"{root}: the {kind} gallery also holds caches for {', '.join(extra)}, which "
                f"these engines do not include; appending without them would leave them behind. "
                f"Pass every member, or --rebuild"
            )
        if extend:
            check_key(entry, options.key)
        generation = int(index.get("generation", 0)) + 1
        member_options = WriteOptions(**{**options.to_dict(), "append": extend, "key": None})
        built: dict[str, Any] = {}
        folders: dict[str, Path] = {}
        try:
            for eid, engine in members.items():
                folder = root / kind / f"{eid[:12]}.{generation}"
                if folder.exists():  # left by an interrupted writer (never committed: generation is new)
                    shutil.rmtree(folder)
                folders[eid] = folder
                if extend:
                    _link_tree(root / entry["members"][eid]["folder"], folder)
                built[eid] = build(engine, folder, member_options)
            galleries = [built[encoder_id(e, kind)] for e in engines]
            check_agreement(galleries, engines, kind)
            count = len(galleries[0])
            index = {**index, "generation": generation}
            n_old = int(entry["count"]) if extend else 0
            index[kind] = {
                "count": count,
                **with_key(entry if extend else None, options.key, n_old, count - n_old),
                "members": {
                    eid: {
                        "folder": f"{kind}/{folders[eid].name}",
                        "model": engine.manifest.name,
                        "engine": str(engine.manifest.path),
                        "count": count,
                    }
                    for eid, engine in members.items()
                },
            }
            atomic.write_json(root / ENSEMBLE, index)  # the commit
        except BaseException:
            for folder in folders.values():
                shutil.rmtree(folder, ignore_errors=True)
            raise
        _remove_superseded(root, index)
    logger.info(
        "ensemble %s gallery %s: generation %d, %d members, %d items", kind, root, generation, len(members), count
    )
    return galleries, generation


def _remove_superseded(root: Path, index: dict[str, Any]) -> None:
    """Remove member folders no longer listed (older generations, interrupted writers), except those a
    gallery of this process still maps (runtime/gallery/store.py keeps such files too): a later commit removes
    them. A load in another process racing this retries on the new generation."""
    for kind in KINDS:
        keep = {m["folder"] for m in (index.get(kind) or {}).get("members", {}).values()}
        parent = root / kind
        if not parent.is_dir():
            continue
        for p in parent.iterdir():
            if not (p.is_dir() and _MEMBER_FOLDER.match(p.name)) or f"{kind}/{p.name}" in keep:
                continue
            if any(mapped(f) for f in p.iterdir()):
                logger.debug("%s: superseded, kept while this process maps it", p)
                continue
            shutil.rmtree(p, ignore_errors=True)
