"""Gallery caches: encoded images (text -> image search) and encoded captions (image -> text search).

A cache is a folder with ``gallery.json`` and ``.npy`` arrays, loaded memory-mapped:

* images:   ``images`` (N, R, d), ``image_gram`` (N, R, R) (the per-image term of the exact head),
            ``ids`` (N,) int64, optional ``names.json``;
* captions: ``words`` (W, d) ragged (all captions' words concatenated), ``offsets`` (M+1,),
            ``lengths`` (M,), ``ids`` (M,), ``texts.json``. Captions are stored sorted by length, so
            every run of equal-length captions is a (B, L, d) view of ``words`` with no padding and no copy.

``gallery.json`` binds the cache to the encoder that made it (``image_encoder_id`` /
``text_encoder_id`` from the export manifest) and records each array's shape, dtype and xxh3-64
checksum of its file.

Concurrency. Files carry a generation number and ``gallery.json`` is replaced last, so an interrupted
build or append leaves the previous cache intact and a reader sees one whole generation. Writers (in
this process or others) take an exclusive ``fcntl.flock`` on ``.lock`` from reading the current
generation to the commit; a second writer waits up to ``lock_timeout`` seconds. A reader keeps the
generation it opened while later ones commit: a commit removes an older generation's files only once no
gallery in this process still maps them (readers in other processes keep their memory maps of unlinked
files; a load that races a commit retries on the new generation). Temporary files of a killed writer
are removed by the next writer.

Integrity. Each array's checksum is verified on open when the cache is small enough for it to cost little
(``VERIFY_ON_OPEN_BYTES``), always with ``verify=True`` (``runtime/search.py --verify``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import mmap
import os
import re
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from runtime import atomic
from runtime.buckets import encode_by_length
from runtime.features import FeatureError, check_layout, load_regions

logger = logging.getLogger(__name__)

FORMAT = "scan-gallery/1"
MANIFEST = "gallery.json"
LOCK = ".lock"
DTYPES = ("float32", "float16")
CHECKSUM = "xxh3_64"
# Verify checksums on open when the arrays total at most this many bytes: xxh3-64 reads a warm file at
# about 10 GB/s here (0.07-0.11 s per GiB, measured), so 1 GiB costs about 0.1 s, and the pages read are
# the ones the first search reads anyway. Larger caches are verified on request (verify=True).
VERIFY_ON_OPEN_BYTES = 1 << 30
DEFAULT_LOCK_TIMEOUT = 600.0
_LOAD_ATTEMPTS = 5
# Files that belong to one generation: arrays "<name>.<generation>.npy" and side files "<kind>.<generation>.json".
_GENERATION_FILE = re.compile(r"^(?:[a-z_]+\.\d+\.npy|(?:names|texts)\.\d+\.json)$")

T = TypeVar("T")


class GalleryError(ValueError):
    """A gallery cache is missing, corrupted, or was built by another model."""


class _FileGone(GalleryError):
    """A file listed by gallery.json vanished: a writer may have committed a newer generation meanwhile."""


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


# ---------------------------------------------------------------------------------------------- open files

# Arrays memory-mapped by this process, by file: a commit keeps a superseded generation's files while any
# gallery (or a view of its arrays) still maps them, and removes them at the next commit or close after.
_MAPPED: dict[str, list[weakref.ref]] = {}
_MAPPED_LOCK = threading.Lock()


def _register(path: Path, arr: np.ndarray) -> None:
    with _MAPPED_LOCK:
        _MAPPED.setdefault(str(path.resolve()), []).append(weakref.ref(arr))


def _mapped(path: Path) -> bool:
    """Whether an array of this process still maps ``path`` (views keep their base array alive)."""
    with _MAPPED_LOCK:
        key = str(path.resolve())
        live = [r for r in _MAPPED.get(key, ()) if r() is not None]
        if live:
            _MAPPED[key] = live
        else:
            _MAPPED.pop(key, None)
        return bool(live)


def checksum_file(path: str | Path) -> str:
    """xxh3-64 of the whole file (header included), as hex."""
    import xxhash

    digest = xxhash.xxh3_64()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                view = memoryview(m)
                try:
                    for a in range(0, size, 16 << 20):
                        digest.update(view[a : a + (16 << 20)])
                finally:
                    view.release()
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- writer lock


@contextlib.contextmanager
def writer_lock(folder: str | Path, timeout: float = DEFAULT_LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the gallery's exclusive writer lock (``folder/.lock``), waiting at most ``timeout`` seconds.

    Inside, no other writer runs, so temporary files left in the folder are a killed writer's: removed here.
    """
    folder = Path(folder)
    _make_folder(folder)
    path = folder / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise GalleryError(f"{path}: cannot lock the gallery ({e})") from e
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
                raise GalleryError(
                    f"{folder}: another writer (pid {holder}) has held the gallery lock {path} for "
                    f"more than {timeout:g} s; wait for it to finish, or allow longer "
                    f"(--lock-timeout)"
                )
            if not announced:
                logger.warning("%s: waiting for another writer to finish (lock %s)", folder, path)
                announced = True
            time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _remove_temporaries(folder)
        yield
    finally:
        os.close(fd)  # releases the lock


def _make_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise GalleryError(f"{folder}: expected a gallery folder, found a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise GalleryError(f"{folder}: cannot create the gallery folder ({e})") from e


def _remove_temporaries(folder: Path) -> None:
    for p in folder.glob(".*.tmp"):
        logger.info("removing %s, left by an interrupted writer", p)
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _sweep(folder: Path) -> None:
    """Remove files of superseded generations that this process no longer maps."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        keep = {e["file"] for e in data["arrays"].values()} | {data.get("names_file"), data.get("texts_file")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # no readable current generation: remove nothing
    for p in folder.iterdir():
        if _GENERATION_FILE.match(p.name) and p.name not in keep and not _mapped(p):
            with contextlib.suppress(OSError):  # already gone (another writer swept it): fine
                p.unlink()


# ---------------------------------------------------------------------------------------------- reading


def _read_manifest(folder: Path, kind: str) -> dict[str, Any]:
    path = folder / MANIFEST
    if folder.exists() and not folder.is_dir():
        raise GalleryError(f"{folder}: expected a gallery folder, found a file")
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
    arrays = data.get("arrays")
    if not isinstance(arrays, dict) or not all(
        isinstance(e, dict)
        and isinstance(e.get("file"), str)
        and isinstance(e.get("shape"), list)
        and isinstance(e.get("dtype"), str)
        for e in arrays.values()
    ):
        raise GalleryError(f"{path}: corrupted gallery manifest (arrays must map names to file, shape and dtype)")
    return data


def _load_consistent(folder: Path, kind: str, load: Callable[[dict[str, Any]], T]) -> T:
    """``load(manifest)``, retried when a writer commits a newer generation (and removes files) meanwhile."""
    for attempt in range(_LOAD_ATTEMPTS):
        data = _read_manifest(folder, kind)
        try:
            return load(data)
        except _FileGone:
            try:
                newer = _read_manifest(folder, kind).get("generation") != data.get("generation")
            except GalleryError:
                newer = False
            if not newer or attempt == _LOAD_ATTEMPTS - 1:
                raise
            logger.info(
                "%s: generation %s was replaced while opening it; opening the new one", folder, data.get("generation")
            )
    raise AssertionError("unreachable")


def _open_array(folder: Path, entry: dict[str, Any], name: str) -> np.ndarray:
    path = folder / entry["file"]
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError as e:
        raise _FileGone(f"{path}: gallery file missing (listed in {folder / MANIFEST})") from e
    except (ValueError, OSError, EOFError) as e:
        raise GalleryError(f"{path}: truncated or corrupted gallery file ({e})") from e
    if list(arr.shape) != list(entry["shape"]) or arr.dtype.name != entry["dtype"]:
        raise GalleryError(
            f"{path}: corrupted gallery file: {name} is {arr.dtype.name}{list(arr.shape)}, "
            f"the manifest says {entry['dtype']}{list(entry['shape'])}"
        )
    _register(path, arr)
    return arr


def _read_side_file(folder: Path, fname: Any, what: str) -> list:
    path = folder / str(fname)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise _FileGone(f"{path}: {what} file missing (listed in {folder / MANIFEST})") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GalleryError(f"{path}: corrupted {what} file ({e})") from e
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise GalleryError(f"{path}: corrupted {what} file (expected a list of strings)")
    return values


def _open_arrays(
    folder: Path, data: dict[str, Any], expected: Sequence[str], verify: bool | None
) -> dict[str, np.ndarray]:
    missing = set(expected) - set(data["arrays"])
    if missing:
        raise GalleryError(f"{folder / MANIFEST}: corrupted gallery manifest (no {', '.join(sorted(missing))} array)")
    arrays = {name: _open_array(folder, data["arrays"][name], name) for name in expected}
    if verify or (verify is None and sum(a.nbytes for a in arrays.values()) <= VERIFY_ON_OPEN_BYTES):
        for name in expected:
            _verify_checksum(folder, data["arrays"][name], required=bool(verify))
    ids = arrays["ids"]
    count = len(ids)
    if ids.ndim != 1 or ids.dtype != np.int64 or data.get("count") != count:
        raise GalleryError(
            f"{folder}: corrupted gallery: ids is {ids.dtype.name}{list(ids.shape)} for count {data.get('count')!r}"
        )
    if count and (int(ids.min()) < 0 or int(ids.max()) >= count):
        bad = int(np.flatnonzero((ids < 0) | (ids >= count))[0])
        raise GalleryError(
            f"{folder / data['arrays']['ids']['file']}: corrupted gallery file: ids[{bad}] = "
            f"{int(ids[bad])} is outside 0..{count - 1}"
        )
    return arrays


def _verify_checksum(folder: Path, entry: dict[str, Any], required: bool) -> None:
    path = folder / entry["file"]
    want = entry.get(CHECKSUM)
    if want is None:
        if required:
            raise GalleryError(
                f"{path}: cannot verify: {MANIFEST} records no {CHECKSUM} checksum (a gallery "
                f"built before checksums); rebuild it with --rebuild"
            )
        return
    try:
        got = checksum_file(path)
    except FileNotFoundError as e:
        raise _FileGone(f"{path}: gallery file missing (listed in {folder / MANIFEST})") from e
    if got != want:
        raise GalleryError(
            f"{path}: corrupted gallery file: {CHECKSUM} is {got}, {MANIFEST} records {want}; "
            f"rebuild the gallery (runtime/search.py ... --rebuild)"
        )


def _check_binding(data: dict[str, Any], key: str, expected: str, folder: Path) -> None:
    if data.get(key) != expected:
        raise GalleryError(
            f"{folder}: this gallery was built by another model ({key} {str(data.get(key))[:12]}..., the engine's is "
            f"{expected[:12]}...); rebuild it with this engine, or pass the engine that built it"
        )


def _check_finite(folder: Path, data: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Every cached float is finite (streamed, so memory stays bounded)."""
    for name, arr in arrays.items():
        if arr.dtype.kind != "f":
            continue
        flat = arr.reshape(len(arr), -1) if arr.ndim > 1 else arr.reshape(-1, 1)
        for a in range(0, len(flat), 4096):
            ok = np.isfinite(flat[a : a + 4096]).all(axis=1)
            if not ok.all():
                row = a + int(np.flatnonzero(~ok)[0])
                raise GalleryError(
                    f"{folder / data['arrays'][name]['file']}: corrupted gallery file: {name} row "
                    f"{row} holds NaN or inf"
                )


# ---------------------------------------------------------------------------------------------- writing


def _temporary(folder: Path, name: str, generation: int) -> Path:
    """A unique temporary path in ``folder`` (removed by the next writer if this one is killed)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.{generation}.", suffix=".npy.tmp", dir=folder)
    os.close(fd)
    return Path(tmp)


def _finish_array(
    folder: Path, tmp: Path, name: str, generation: int, shape: Sequence[int], dtype: str
) -> dict[str, Any]:
    """fsync ``tmp``, checksum it and move it to its generation's name: the manifest entry."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    digest = checksum_file(tmp)
    final = folder / f"{name}.{generation}.npy"
    os.replace(tmp, final)
    return {"file": final.name, "shape": [int(s) for s in shape], "dtype": dtype, CHECKSUM: digest}


def _save_arrays(folder: Path, generation: int, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    entries = {}
    for name, arr in arrays.items():
        tmp = None
        try:
            tmp = _temporary(folder, name, generation)
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
            entries[name] = _finish_array(folder, tmp, name, generation, arr.shape, arr.dtype.name)
        finally:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
    return entries


def _commit(folder: Path, manifest: dict[str, Any], extra_files: dict[str, Any]) -> None:
    """Write side files, then ``gallery.json`` (last: the commit). Called with the writer lock held."""
    for fname, obj in extra_files.items():
        atomic.write_json(folder / fname, obj)
    atomic.write_json(folder / MANIFEST, manifest)


def _current_generation(folder: Path) -> int:
    path = folder / MANIFEST
    if path.is_file():
        try:
            return int(json.loads(path.read_text(encoding="utf-8")).get("generation", 0))
        except (ValueError, TypeError, AttributeError, json.JSONDecodeError):
            pass
    # No readable manifest: still never reuse a generation number whose files may exist.
    gens = [int(m.group(1)) for p in folder.iterdir() if (m := re.match(r"^[a-z_]+\.(\d+)\.(?:npy|json)$", p.name))]
    return max(gens, default=0)


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

    def label(self, item: int) -> str:
        """How errors name gallery item ``item``."""
        name = f" ({self.names[item]!r})" if self.names and 0 <= item < len(self.names) else ""
        return f"image {item}{name} of the gallery {self.folder}"

    def nbytes_per_item(self) -> float:
        return (self.images[:1].nbytes + self.image_gram[:1].nbytes + 8) if len(self) else 0.0

    def blocks(self, block: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(offset, images view, gram view) for consecutive blocks: slices of the memory map, no copies."""
        for start in range(0, len(self), block):
            yield start, self.images[start : start + block], self.image_gram[start : start + block]

    def close(self) -> None:
        """Drop this gallery's memory maps; files of a superseded generation go once nothing maps them."""
        _close(self, ("images", "image_gram", "ids"))

    def __enter__(self) -> ImageGallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def load(cls, folder: str | Path, image_encoder_id: str | None = None, verify: bool | None = None) -> ImageGallery:
        """Open the cache in ``folder`` memory-mapped. ``verify``: check every array's checksum (and that all
        values are finite); None checks checksums only when the arrays total at most ``VERIFY_ON_OPEN_BYTES``."""
        folder = Path(folder)

        def load(data: dict[str, Any]) -> ImageGallery:
            if image_encoder_id is not None:
                _check_binding(data, "image_encoder_id", image_encoder_id, folder)
            arrays = _open_arrays(folder, data, ("images", "image_gram", "ids"), verify)
            if verify:
                _check_finite(folder, data, arrays)
            names = None
            if data.get("names_file"):
                names = _read_side_file(folder, data["names_file"], "names")
                if len(names) != len(arrays["ids"]):
                    raise GalleryError(f"{folder}: {len(names)} names for {len(arrays['ids'])} images")
            return cls(folder, arrays["images"], arrays["image_gram"], arrays["ids"], names, data)

        return _load_consistent(folder, "images", load)

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


def _close(gallery: Any, fields: Sequence[str]) -> None:
    for f in fields:
        setattr(gallery, f, np.zeros((0, *getattr(gallery, f).shape[1:]), getattr(gallery, f).dtype))
    folder = Path(gallery.folder)
    if (folder / MANIFEST).is_file():
        _sweep(folder)


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
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    index: str | None = None,
) -> ImageGallery:
    """Encode region features into ``folder`` (or append to the gallery there), atomically.

    ``regions`` is an array or a ``.npy`` path (memory-mapped). ``repeated``: the original's layout
    that repeats every image 5 times (keep every 5th row); None leaves the rows as they are.
    Concurrent writers to one folder take turns (see the module doc); ``lock_timeout`` bounds the wait.
    ``index``: also build the candidate index of two-stage search (runtime/candidates.py) of this kind
    ("auto", "flat", ...); an index already in the folder is extended on append in any case.
    """
    folder = Path(folder)
    if dtype not in DTYPES:
        raise GalleryError(f"dtype must be one of {DTYPES}, received {dtype!r}")
    cfg = engine.config
    source = str(regions) if isinstance(regions, (str, Path)) else "regions"
    if isinstance(regions, (str, Path)):
        regions = load_regions(regions, cfg.img_dim)
    else:
        regions = check_layout(regions, cfg.img_dim)
    if repeated:
        regions = regions[::5]
    n_new = int(regions.shape[0])
    if n_new == 0:
        raise GalleryError(
            f"{source}: expected at least one image, received none; the gallery {folder} is left as it was"
        )
    if names is not None and len(names) != n_new:
        raise GalleryError(f"names: expected one name per image ({n_new}), received {len(names)}")
    with writer_lock(folder, lock_timeout):
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
        generation = _current_generation(folder) + 1
        files = {"images": (n, r, d), "image_gram": (n, r, r)}
        tmp_paths: dict[str, Path] = {}
        try:  # the temporaries are made inside, so that an interruption at any point removes them
            for name in files:
                tmp_paths[name] = _temporary(folder, name, generation)
            out = {
                name: np.lib.format.open_memmap(tmp_paths[name], mode="w+", dtype=np.dtype(dtype), shape=shape)
                for name, shape in files.items()
            }
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
            for arr in out.values():
                arr.flush()
            out = {}  # unmap before the files move
            entries = {
                name: _finish_array(folder, tmp_paths[name], name, generation, files[name], dtype) for name in files
            }
            ids = np.concatenate(
                [np.asarray(old.ids) if old else np.zeros(0, np.int64), np.arange(n_old, n, dtype=np.int64)]
            )
            entries.update(_save_arrays(folder, generation, {"ids": ids}))
        finally:
            out = {}
            for p in tmp_paths.values():
                with contextlib.suppress(FileNotFoundError):
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
        old = None  # this writer's own map of the previous generation must not keep its files
        _sweep(folder)
        logger.info("image gallery %s: %d images (%d new), %s", folder, n, n_new, dtype)
        return _with_index(ImageGallery.load(folder), index, n_old, progress)


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

    def label(self, item: int) -> str:
        """How errors name gallery item ``item`` (a caption id)."""
        text = f" ({self.texts[item]!r})" if 0 <= item < len(self.texts) else ""
        return f"caption {item}{text} of the gallery {self.folder}"

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

    def close(self) -> None:
        """Drop this gallery's memory maps; files of a superseded generation go once nothing maps them."""
        _close(self, ("words", "offsets", "lengths", "ids"))

    def __enter__(self) -> CaptionGallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def load(cls, folder: str | Path, text_encoder_id: str | None = None, verify: bool | None = None) -> CaptionGallery:
        """Open the cache in ``folder`` memory-mapped; ``verify`` as in :meth:`ImageGallery.load`."""
        folder = Path(folder)

        def load(data: dict[str, Any]) -> CaptionGallery:
            if text_encoder_id is not None:
                _check_binding(data, "text_encoder_id", text_encoder_id, folder)
            arrays = _open_arrays(folder, data, ("words", "offsets", "lengths", "ids"), verify)
            if verify:
                _check_finite(folder, data, {"words": arrays["words"]})
            texts = _read_side_file(folder, data.get("texts_file"), "captions")
            lengths = np.asarray(arrays["lengths"])
            offsets = np.asarray(arrays["offsets"])
            if (
                len(texts) != len(lengths)
                or len(offsets) != len(lengths) + 1
                or offsets[-1] != arrays["words"].shape[0]
                or np.any(np.diff(lengths) < 0)
                or np.any(np.diff(offsets) != lengths)
            ):
                raise GalleryError(f"{folder}: corrupted caption gallery (inconsistent lengths/offsets/texts)")
            return cls(folder, arrays["words"], offsets, lengths, np.asarray(arrays["ids"]), texts, data)

        return _load_consistent(folder, "captions", load)

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
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    index: str | None = None,
) -> CaptionGallery:
    """Encode ``captions`` into a ragged, length-sorted caption gallery (or append to one), atomically.

    ``index``: as for ``build_image_gallery``.

    The new captions are encoded before the writer lock is taken, so concurrent writers wait only for the copy.
    """
    folder = Path(folder)
    if dtype not in DTYPES:
        raise GalleryError(f"dtype must be one of {DTYPES}, received {dtype!r}")
    if len(captions) == 0:
        raise GalleryError("captions: expected at least one caption, received none")
    ids, lengths = engine.tokenizer.encode_batch(list(captions))  # validates every caption first
    d = engine.config.embed_size
    # Encode length-sorted batches (little padding), then keep each caption's unpadded words.
    new_words: list[np.ndarray] = [np.zeros((0, d), np.float32)] * len(captions)
    with _progress(len(captions), "encoding captions", progress) as bar:
        for idx, emb in encode_by_length(engine, ids, lengths, batch):  # emb (B, width, d)
            for row, j in enumerate(idx):
                new_words[j] = emb[row, : lengths[j]]
            bar.update(len(idx))
    with writer_lock(folder, lock_timeout):
        old: CaptionGallery | None = None
        if append and (folder / MANIFEST).is_file():
            old = CaptionGallery.load(folder, engine.manifest.text_encoder_id)
            if old.dtype.name != dtype:
                raise GalleryError(f"{folder}: the gallery stores {old.dtype.name}; append with dtype={old.dtype.name}")
        n_old = len(old) if old else 0
        all_lengths = np.concatenate([old.lengths if old else np.zeros(0, np.int64), lengths]).astype(np.int64)
        all_ids = np.concatenate(
            [old.ids if old else np.zeros(0, np.int64), np.arange(n_old, n_old + len(captions), dtype=np.int64)]
        )
        sort = np.argsort(all_lengths, kind="stable")
        total = int(all_lengths.sum())
        generation = _current_generation(folder) + 1
        tmp = None
        try:
            tmp = _temporary(folder, "words", generation)
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
            del words, src
            entries = {"words": _finish_array(folder, tmp, "words", generation, (total, d), dtype)}
        finally:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        sorted_lengths = all_lengths[sort]
        offsets = np.concatenate([[0], np.cumsum(sorted_lengths)]).astype(np.int64)
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
        old = None  # this writer's own map of the previous generation must not keep its files
        _sweep(folder)
        logger.info("caption gallery %s: %d captions (%d new), %s", folder, len(texts), len(captions), dtype)
        return _with_index(CaptionGallery.load(folder), index, n_old, progress)


def _with_index(gallery, kind: str | None, n_old: int, progress: bool):
    """Build or extend the gallery's candidate index, with the writer lock held (written after the gallery's
    commit: an interruption leaves a stale index, rebuilt on use)."""
    if kind is not None or (gallery.folder / "candidates.json").is_file():
        from runtime.candidates import build_index

        build_index(gallery, kind=kind or "auto", appended_from=n_old, progress=progress)
    return gallery


def verify_gallery(folder: str | Path) -> ImageGallery | CaptionGallery:
    """Open the cache in ``folder`` with every check: checksums, finite values, ids, consistency."""
    folder = Path(folder)
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        kind = data.get("kind") if isinstance(data, dict) else None
    except (OSError, ValueError):
        kind = None
    gallery = (CaptionGallery if kind == "captions" else ImageGallery).load(folder, verify=True)
    ids = np.asarray(gallery.ids)
    if len(ids) and np.bincount(ids, minlength=len(ids)).max() > 1:
        raise GalleryError(
            f"{folder / gallery.manifest['arrays']['ids']['file']}: corrupted gallery file: repeated ids"
        )
    return gallery


# ---------------------------------------------------------------------------------------------- encoded arrays
# Writers for arrays that are already encoded (shard split and merge): no engine runs; the new cache
# is bound to the encoder of the gallery the arrays came from, with the same locking and checksums.

_IMAGE_BINDING = ("image_encoder_id", "config", "model", "dtype", "regions", "embed_size")
_CAPTION_BINDING = ("text_encoder_id", "config", "model", "dtype", "embed_size")
_CHUNK_ROWS = 4096


def _save_rows(
    folder: Path, generation: int, name: str, shape: tuple[int, ...], dtype: str, chunks: Iterable[np.ndarray]
) -> dict[str, Any]:
    """Stream consecutive row blocks into ``name.<generation>.npy`` (memory bounded by one block)."""
    tmp = _temporary(folder, name, generation)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=shape)
        pos = 0
        for chunk in chunks:
            out[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
        if pos != shape[0]:
            raise GalleryError(f"{folder / name}: expected {shape[0]} rows, received {pos}")
        out.flush()
        del out
        return _finish_array(folder, tmp, name, generation, shape, dtype)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _row_chunks(pieces: Sequence[np.ndarray]) -> Iterator[np.ndarray]:
    for piece in pieces:
        for start in range(0, len(piece), _CHUNK_ROWS):
            yield np.asarray(piece[start : start + _CHUNK_ROWS])


def _require_new(folder: Path) -> int:
    if (folder / MANIFEST).is_file():
        raise GalleryError(f"{folder}: a gallery is already there; write encoded arrays into a new folder")
    return _current_generation(folder) + 1


def write_image_gallery(
    folder: str | Path,
    images: Sequence[np.ndarray],
    image_gram: Sequence[np.ndarray],
    names: Sequence[str] | None,
    like: dict[str, Any],
) -> ImageGallery:
    """Commit encoded images (the concatenation of the ``images``/``image_gram`` pieces, ids 0..N-1) as a
    new gallery at ``folder``, bound to the encoder recorded in ``like`` (a source gallery's manifest)."""
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
    with writer_lock(folder):
        generation = _require_new(folder)
        entries = {
            "images": _save_rows(folder, generation, "images", (n, r, d), dtype, _row_chunks(images)),
            "image_gram": _save_rows(folder, generation, "image_gram", (n, r, r), dtype, _row_chunks(image_gram)),
        }
        entries.update(_save_arrays(folder, generation, {"ids": np.arange(n, dtype=np.int64)}))
        extra = {f"names.{generation}.json": list(names)} if names is not None else {}
        manifest = {
            "format": FORMAT,
            "kind": "images",
            "generation": generation,
            "count": n,
            **{key: like[key] for key in _IMAGE_BINDING},
            "arrays": entries,
            "names_file": next(iter(extra), None),
        }
        _commit(folder, manifest, extra)
    return ImageGallery.load(folder)


def write_caption_gallery(
    folder: str | Path,
    words: Iterable[np.ndarray],
    lengths: np.ndarray,
    ids: np.ndarray,
    texts: Sequence[str],
    like: dict[str, Any],
) -> CaptionGallery:
    """Commit encoded captions as a new gallery at ``folder``: ``words`` yields the word rows of the
    captions in stored order (sorted by length, then id), ``lengths`` and ``ids`` (a permutation of
    0..M-1) are per stored caption, ``texts`` by id. Bound to the encoder recorded in ``like``."""
    folder = Path(folder)
    lengths, ids = np.asarray(lengths, np.int64), np.asarray(ids, np.int64)
    m = len(texts)
    if m == 0 or len(lengths) != m or len(ids) != m or not np.array_equal(np.sort(ids), np.arange(m)):
        raise GalleryError(
            f"{folder}: expected lengths and ids for each of the {m} captions (ids 0..{m - 1}), "
            f"received {len(lengths)} lengths and {len(ids)} ids"
        )
    if np.any(np.diff(lengths) < 0):
        raise GalleryError(f"{folder}: captions must be given sorted by length")
    total = int(lengths.sum())
    with writer_lock(folder):
        generation = _require_new(folder)
        entries = {
            "words": _save_rows(folder, generation, "words", (total, int(like["embed_size"])), like["dtype"], words)
        }
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        entries.update(_save_arrays(folder, generation, {"offsets": offsets, "lengths": lengths, "ids": ids}))
        texts_file = f"texts.{generation}.json"
        manifest = {
            "format": FORMAT,
            "kind": "captions",
            "generation": generation,
            "count": m,
            **{key: like[key] for key in _CAPTION_BINDING},
            "arrays": entries,
            "texts_file": texts_file,
        }
        _commit(folder, manifest, {texts_file: [str(t) for t in texts]})
    return CaptionGallery.load(folder)
