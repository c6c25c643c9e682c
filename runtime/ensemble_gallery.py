"""One gallery folder for an ensemble: every member's cache, built and extended together, atomically.

A cache is bound to the encoder that made it, so each member keeps its own (``runtime/gallery/``),
found by its encoder id. The folder a single model uses (``images/``, ``captions/``) is left as it is;
an ensemble adds::

    GALLERY/ensemble.json                      which member caches form the current generation (written last)
    GALLERY/images/<image_encoder_id[:12]>.<generation>/     one member's image cache (a gallery folder)
    GALLERY/captions/<text_encoder_id[:12]>.<generation>/    one member's caption cache

A build or an append writes a new generation folder for every member (an append starts from hard links
to the current generation's immutable files, so it copies nothing) and only then replaces
``ensemble.json``: a build that fails or is interrupted for any member leaves every member as it was.
Folders of older generations are removed after the commit. Writers take a lock on the folder. Members
sharing an encoder (the same image encoder in two models) share its cache.
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
from runtime.engine import ScanEngine
from runtime.features import load_regions
from runtime.gallery import verify_gallery
from runtime.gallery.captions import CaptionGallery, build_caption_gallery
from runtime.gallery.images import ImageGallery, build_image_gallery
from runtime.gallery.store import DEFAULT_LOCK_TIMEOUT, MANIFEST, GalleryError, mapped, read_format, writer_lock

logger = logging.getLogger(__name__)

ENSEMBLE = "ensemble.json"
FORMAT = "scan-ensemble-gallery/1"
KINDS = ("images", "captions")
_MEMBER_FOLDER = re.compile(r"^[0-9a-zA-Z_-]{1,64}\.\d+$")
_LOAD_ATTEMPTS = 5


def encoder_id(engine: ScanEngine, kind: str) -> str:
    """The id a member's ``kind`` cache is bound to: its image encoder's for images, text encoder's for captions."""
    return engine.manifest.image_encoder_id if kind == "images" else engine.manifest.text_encoder_id


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise GalleryError(f"gallery kind must be one of {KINDS}, received {kind!r}")


def read_index(root: Path) -> dict[str, Any] | None:
    """``ensemble.json`` of ``root``, or None when there is none."""
    path = root / ENSEMBLE
    if not path.is_file():
        return None
    data = read_format(path, FORMAT, "ensemble gallery index")
    for kind in KINDS:
        entry = data.get(kind)
        if entry is not None and not (isinstance(entry, dict) and isinstance(entry.get("members"), dict)):
            raise GalleryError(f"{path}: corrupted ensemble gallery index ({kind} has no members map)")
    return data


def _unique_members(engines: Sequence[ScanEngine], kind: str) -> dict[str, ScanEngine]:
    """``{encoder id: first engine with it}``: members sharing an encoder share its cache."""
    members: dict[str, ScanEngine] = {}
    for e in engines:
        members.setdefault(encoder_id(e, kind), e)
    return members


def _missing(engines: Sequence[ScanEngine], kind: str, have: dict[str, Any]) -> str:
    """Names the members without a cache in ``have`` ({encoder id: member record}) and what it holds."""
    key = "image encoder" if kind == "images" else "text encoder"
    missing = [
        f"{describe(e, i)} ({key} {encoder_id(e, kind)[:12]})"
        for i, e in enumerate(engines)
        if encoder_id(e, kind) not in have
    ]
    held = ", ".join(f"{m.get('engine') or m.get('model', '?')} ({key} {eid[:12]})" for eid, m in have.items())
    return f"no cache for {'; '.join(missing)} (it holds: {held or 'none'})"


def _rebuild_hint(engines: Sequence[ScanEngine], root: Path, kind: str) -> str:
    flags = " ".join(f"--engine {e.manifest.path}" for e in engines)
    source = "--images FEATS.npy" if kind == "images" else "--captions CAPTIONS.txt"
    return f"Build it for every member: runtime/search.py {flags} --gallery {root} {source} --rebuild"


# ---------------------------------------------------------------------------------------------- reading


def load_member_galleries(
    root: str | Path, engines: Sequence[ScanEngine], kind: str, verify: bool | None = None
) -> list[ImageGallery] | list[CaptionGallery]:
    """Each member's ``kind`` ("images" or "captions") cache in ``root``, in the engines' order, checked to
    agree (same items, same order). A gallery without a cache for some member is refused, naming it.
    ``verify``: as ``ImageGallery.load``'s."""
    _check_kind(kind)
    root = Path(root)
    engines = list(engines)
    for attempt in range(_LOAD_ATTEMPTS):
        index = read_index(root)
        entry = None if index is None else index.get(kind)
        if entry is None:
            raise GalleryError(_no_ensemble_gallery(root, engines, kind))
        members = entry["members"]
        if any(encoder_id(e, kind) not in members for e in engines):
            raise GalleryError(
                f"{root}: the ensemble's {kind} gallery has {_missing(engines, kind, members)}. "
                f"{_rebuild_hint(engines, root, kind)}"
            )
        try:
            galleries = [_load_member(root, members[encoder_id(e, kind)], e, kind, verify) for e in engines]
        except GalleryError:
            # A writer may have committed a newer generation (and removed this one) meanwhile: retry on it.
            newer = read_index(root)
            if attempt == _LOAD_ATTEMPTS - 1 or newer is None or newer.get("generation") == index.get("generation"):
                raise
            logger.info(
                "%s: generation %s was replaced while opening it; opening the new one", root, index.get("generation")
            )
            continue
        check_agreement(galleries, engines, kind)
        return galleries
    raise AssertionError("unreachable")


def _member_folder(root: Path, member: Any, kind: str) -> Path:
    folder = member.get("folder") if isinstance(member, dict) else None
    if not isinstance(folder, str) or not _MEMBER_FOLDER.match(Path(folder).name) or Path(folder).parent.name != kind:
        raise GalleryError(f"{root / ENSEMBLE}: corrupted ensemble gallery index (member folder {folder!r})")
    return root / folder


def _load_member(root: Path, member: dict[str, Any], engine: ScanEngine, kind: str, verify: bool | None):
    cls = ImageGallery if kind == "images" else CaptionGallery
    return cls.load(_member_folder(root, member, kind), encoder_id(engine, kind), verify=verify)


def verify_member_galleries(root: str | Path) -> list[tuple[Path, int]]:
    """Every check of ``runtime.gallery.verify_gallery`` on every member cache of the ensemble gallery in
    ``root``: ``[(member folder, items)]``."""
    root = Path(root)
    index = read_index(root)
    if index is None or not any(index.get(kind) for kind in KINDS):
        raise GalleryError(f"{root}: no ensemble gallery to verify ({ENSEMBLE} missing or empty)")
    checked = []
    for kind in KINDS:
        for member in (index.get(kind) or {}).get("members", {}).values():
            folder = _member_folder(root, member, kind)
            with verify_gallery(folder) as g:
                checked.append((folder, len(g)))
    return checked


def _no_ensemble_gallery(root: Path, engines: Sequence[ScanEngine], kind: str) -> str:
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
            f"{_missing(engines, kind, have)}. {_rebuild_hint(engines, root, kind)}"
        )
    source = "--images FEATS.npy" if kind == "images" else "--captions CAPTIONS.txt"
    flags = " ".join(f"--engine {e.manifest.path}" for e in engines)
    return (
        f"{root}: no ensemble {kind} gallery here ({ENSEMBLE} has no {kind}); build one with "
        f"runtime/search.py {flags} --gallery {root} {source}"
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


def build_member_galleries(
    root: str | Path,
    engines: Sequence[ScanEngine],
    kind: str,
    build: Callable[[ScanEngine, Path, bool], Any],
    append: bool = True,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> list:
    """Build (or, with ``append``, extend) every member's ``kind`` cache with ``build(engine, folder, append)``
    (a ``build_image_gallery`` / ``build_caption_gallery`` call), then commit them together.

    Appending to a gallery whose members are not exactly the engines' is refused (naming the difference):
    the members left out would fall behind. ``append=False`` replaces the ensemble's ``kind`` caches.
    """
    _check_kind(kind)
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise GalleryError(f"{root}: expected a gallery folder, found a file")
    engines = list(engines)
    members = _unique_members(engines, kind)
    with writer_lock(root, lock_timeout):
        index = read_index(root) or {"format": FORMAT, "generation": 0}
        entry = index.get(kind)
        if append and entry is None and (root / kind / MANIFEST).is_file():
            raise GalleryError(
                f"{root / kind}: this {kind} gallery was built for one model only; an ensemble keeps "
                f"one cache per member beside it. Build the ensemble's with --rebuild (the "
                f"single-model gallery stays as it is)"
            )
        extend = append and entry is not None
        if extend:
            old = entry["members"]
            if set(old) != set(members):
                if set(members) - set(old):
                    raise GalleryError(
                        f"{root}: the ensemble's {kind} gallery has {_missing(engines, kind, old)}; "
                        f"rebuild it with every member (--rebuild) to add one"
                    )
                extra = [
                    f"{m.get('engine') or m.get('model', '?')} ({eid[:12]})"
                    for eid, m in old.items()
                    if eid not in members
                ]
                raise GalleryError(
                    f"{root}: the {kind} gallery also holds caches for {', '.join(extra)}, which "
                    f"these engines do not include; appending without them would leave them behind. "
                    f"Pass every member, or --rebuild"
                )
        generation = int(index.get("generation", 0)) + 1
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
                built[eid] = build(engine, folder, extend)
            galleries = [built[encoder_id(e, kind)] for e in engines]
            check_agreement(galleries, engines, kind)
            count = len(galleries[0])
            index = dict(index)
            index["generation"] = generation
            index[kind] = {
                "count": count,
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
    return galleries


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


def build_member_image_galleries(
    root: str | Path,
    engines: Sequence[ScanEngine],
    regions: np.ndarray | str | Path,
    names: Sequence[str] | None = None,
    dtype: str = "float32",
    append: bool = True,
    progress: bool = True,
    repeated: bool | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    index: str | None = None,
) -> list[ImageGallery]:
    """Encode region features with every member into ``root`` (or append them), atomically across members.
    ``index``: also build each member's candidate index (two-stage search), as ``build_image_gallery``."""
    engines = list(engines)
    if len({e.config.img_dim for e in engines}) > 1:
        raise GalleryError(
            "the ensemble's members take different region features: "
            + ", ".join(f"{describe(e, i)} img_dim {e.config.img_dim}" for i, e in enumerate(engines))
        )
    if isinstance(regions, (str, Path)):  # read (memory-mapped) once for all members
        regions = load_regions(regions, engines[0].config.img_dim)

    options = {"dtype": dtype, "progress": progress, "lock_timeout": lock_timeout, "index": index}

    def build(engine: ScanEngine, folder: Path, extend: bool) -> ImageGallery:
        return build_image_gallery(engine, regions, folder, names=names, repeated=repeated, append=extend, **options)

    return build_member_galleries(root, engines, "images", build, append, lock_timeout)


def build_member_caption_galleries(
    root: str | Path,
    engines: Sequence[ScanEngine],
    captions: Sequence[str],
    dtype: str = "float32",
    append: bool = True,
    progress: bool = True,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    index: str | None = None,
) -> list[CaptionGallery]:
    """Encode captions with every member into ``root`` (or append them), atomically across members.
    ``index``: as for ``build_member_image_galleries``."""
    engines = list(engines)
    for e in engines:  # every member must accept every caption before any is encoded
        e.tokenizer.encode_batch(list(captions))

    options = {"dtype": dtype, "progress": progress, "lock_timeout": lock_timeout, "index": index}

    def build(engine: ScanEngine, folder: Path, extend: bool) -> CaptionGallery:
        return build_caption_gallery(engine, captions, folder, append=extend, **options)

    return build_member_galleries(root, engines, "captions", build, append, lock_timeout)


def describe(engine: ScanEngine, index: int | None = None) -> str:
    """How errors name a member: its position and manifest."""
    where = f"member {index + 1} " if index is not None else ""
    return f"{where}({engine.manifest.path})"


def check_agreement(
    galleries: Sequence[ImageGallery] | Sequence[CaptionGallery], engines: Sequence[ScanEngine], kind: str
) -> None:
    """Refuse member galleries that do not hold the same items in the same order, naming the mismatch."""
    first = galleries[0]
    label0 = f"{describe(engines[0], 0)}'s {first.folder}"
    for i, g in enumerate(galleries[1:], 1):
        label = f"{describe(engines[i], i)}'s {g.folder}"
        what = "images" if kind == "images" else "captions"
        if len(g) != len(first):
            raise GalleryError(
                f"the ensemble's members disagree on the {kind} gallery: {label0} holds {len(first)} "
                f"{what}, {label} {len(g)}; rebuild them together"
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
