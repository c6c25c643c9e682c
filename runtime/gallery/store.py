"""On-disk mechanics of gallery caches (the format is described in ``runtime/gallery/__init__.py``).

The writer lock, generation numbers, the atomic commit (``gallery.json`` last), xxh3-64 checksums, removal of
a killed writer's temporaries and of superseded generations, and the in-process registry of mapped files
that keeps a generation's files while a gallery of this process still maps them. Image and caption
galleries (``images.py``, ``captions.py``) build on these.
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
import shutil
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

import numpy as np

from runtime import atomic
from runtime.options import DEFAULT_LOCK_TIMEOUT

logger = logging.getLogger(__name__)

FORMAT = "scan-gallery/1"
MANIFEST = "gallery.json"
LOCK = ".lock"
CHECKSUM = "xxh3_64"
# Verify checksums on open when the arrays total at most this many bytes: xxh3-64 reads a warm file at
# about 10 GB/s here (0.07-0.11 s per GiB, measured), so 1 GiB costs about 0.1 s, and the pages read are
# the ones the first search reads anyway. Larger caches are verified on request (verify=True).
VERIFY_ON_OPEN_BYTES = 1 << 30
_LOAD_ATTEMPTS = 5
# Files that belong to one generation: arrays "<name>.<generation>.npy" and side files "<kind>.<generation>.json".
_GENERATION_FILE = re.compile(r"^(?:[a-z_]+\.\d+\.npy|(?:names|texts)\.\d+\.json)$")

T = TypeVar("T")


class GalleryError(ValueError):
    """A gallery cache is missing, corrupted, or was built by another model."""


class StorageError(GalleryError):
    """A write the disk refused (no space, a read-only folder, no permission): the server's fault, not the
    client's (HTTP 507 when the disk is full, 500 otherwise). Nothing of the failed write remains."""

    def __init__(self, message: str, full: bool) -> None:
        super().__init__(message)
        self.full = full


def storage_error(e: OSError, folder: Path, needed: int | None = None) -> StorageError:
    """The ``StorageError`` for an ``OSError`` of a write into ``folder`` (``needed``: bytes, when known)."""
    path = e.filename or folder
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{shutil.disk_usage(folder).free} bytes are free"
        except OSError:
            free = "free space unknown"
        need = f"this write needs {needed} bytes" if needed is not None else "the write needs more space"
        return StorageError(f"{path}: no space left on the device: {need}, {free}; the gallery is left as it was", True)
    if e.errno == errno.EROFS:
        what = "the gallery folder is on a read-only file system"
    elif e.errno in (errno.EACCES, errno.EPERM):
        what = "permission denied (the server cannot write the gallery folder)"
    else:
        what = f"cannot write ({e.strerror or e})"
    return StorageError(f"{path}: {what}; the gallery is left as it was", False)


def reserve(folder: Path, needed: int) -> None:
    """Refuse a write of ``needed`` bytes into ``folder`` before it starts when the disk has not that much free."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise storage_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder)), folder, needed)


def open_rows(path: Path, dtype: str, shape: Sequence[int]) -> np.memmap:
    """``np.lib.format.open_memmap`` for writing, with the file's blocks allocated first: a full disk is then an
    ``OSError`` here, not a SIGBUS at the first store into a page the file system cannot provide."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=tuple(shape))
    try:
        with open(path, "rb+") as f:
            size = os.fstat(f.fileno()).st_size
            if size:
                os.posix_fallocate(f.fileno(), 0, size)
    except OSError as e:
        del out
        raise storage_error(e, path.parent, size) from e
    return out


# ---------------------------------------------------------------------------------------------- request keys

# Idempotency keys of the writes that made a cache, kept in its manifest (committed with the generation, so they
# survive a restart): the most recent ones, each with the answer its write gave.
KEYS_KEPT = 1000


class Repeated(Exception):
    """A write whose idempotency key a committed generation already records: ``answer`` is what it answered
    (``first_id``, ``added``, ``count``); nothing was written."""

    def __init__(self, key: str, answer: dict[str, int]) -> None:
        super().__init__(f"write {key!r} was already committed")
        self.key = key
        self.answer = answer


def check_key(record: dict[str, Any] | None, key: str | None) -> None:
    """Raise ``Repeated`` when ``record`` (a manifest, or the members file's entry) holds ``key``."""
    answer = ((record or {}).get("requests") or {}).get(key) if key is not None else None
    if answer is not None:
        raise Repeated(key, answer)


def with_key(record: dict[str, Any] | None, key: str | None, first_id: int, added: int) -> dict[str, Any]:
    """The ``requests`` entry of a new generation's manifest: the previous one's keys plus ``key``'s answer
    (the oldest dropped); none when no write had a key."""
    keys = dict((record or {}).get("requests") or {})
    if key is not None:
        keys[key] = {"first_id": first_id, "added": added, "count": first_id + added}
    return {"requests": dict(list(keys.items())[-KEYS_KEPT:])} if keys else {}


def progress_bar(total: int, desc: str, enabled: bool):
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


def mapped(path: Path) -> bool:
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
    try:
        _make_folder(folder)
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise storage_error(e, folder) from e
    path = folder / LOCK
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
        try:
            yield
        except BaseException as e:
            # A failed write leaves nothing: files of its uncommitted generation go too (the disk it
            # filled is free again for the next write).
            sweep(folder, failed=True)
            if isinstance(e, OSError):
                raise storage_error(e, folder) from e
            raise
        finally:
            # An interruption can land between a temporary's creation and its registration for removal;
            # while the lock is held every temporary here is this writer's, so none outlives it.
            _remove_temporaries(folder, quiet=True)
    finally:
        os.close(fd)  # releases the lock


def _make_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise GalleryError(f"{folder}: expected a gallery folder, found a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise GalleryError(f"{folder}: cannot create the gallery folder ({e})") from e


def _remove_temporaries(folder: Path, quiet: bool = False) -> None:
    for p in folder.glob(".*.tmp"):
        if not quiet:
            logger.info("removing %s, left by an interrupted writer", p)
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def sweep(folder: Path, failed: bool = False) -> None:
    """Remove files of superseded generations that this process no longer maps (``failed``: after a write that
    did not commit, with the lock held; where nothing was ever committed, all its files)."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        keep = {e["file"] for e in data["arrays"].values()} | {data.get("names_file"), data.get("texts_file")}
    except FileNotFoundError:
        if not failed:
            return
        keep = set()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # no readable current generation: remove nothing
    for p in folder.iterdir():
        if _GENERATION_FILE.match(p.name) and p.name not in keep and not mapped(p):
            with contextlib.suppress(OSError):  # already gone (another writer swept it): fine
                p.unlink()


# ---------------------------------------------------------------------------------------------- reading


def read_manifest(folder: Path, kind: str) -> dict[str, Any]:
    path = folder / MANIFEST
    if folder.exists() and not folder.is_dir():
        raise GalleryError(f"{folder}: expected a gallery folder, found a file")
    if not path.is_file():
        raise GalleryError(
            f"{folder}: no gallery here ({MANIFEST} missing); build one with "
            f"runtime/search.py --engine ENGINE --gallery {folder} --images FEATS.npy"
        )
    data = read_format(path, FORMAT, "gallery manifest")
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


def read_format(
    path: Path, fmt: str, what: str, error: type[GalleryError] = GalleryError, missing: str | None = None
) -> dict[str, Any]:
    """The JSON object in ``path`` (``what``: how errors name it), which must declare ``"format": fmt``.
    Errors are ``error``s; ``missing``: the message when the file does not exist."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise error(missing or f"{path}: {what} missing") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: corrupted {what} ({e})") from e
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise error(f"{path}: expected format {fmt!r}, got {data.get('format') if isinstance(data, dict) else data!r}")
    return data


def load_consistent(generation: Callable[[], Any], load: Callable[[], T], where: Path) -> T:
    """``load()``, retried when a writer commits a newer generation (and removes files) meanwhile.

    The one retry loop of every gallery layout: ``generation()`` reads the generation that ``load``
    opens (a cache's ``gallery.json``, an ensemble's ``ensemble.json``); a failure is retried only if it
    changed, so a corrupted gallery fails at once."""
    for attempt in range(_LOAD_ATTEMPTS):
        before = generation()
        try:
            return load()
        except GalleryError:
            try:
                newer = generation() != before
            except GalleryError:
                newer = False
            if not newer or attempt == _LOAD_ATTEMPTS - 1:
                raise
            logger.info("%s: generation %s was replaced while opening it; opening the new one", where, before)
    raise AssertionError("unreachable")


def manifest_generation(folder: Path) -> Any:
    """The generation ``folder/gallery.json`` names (None when it is missing or unreadable)."""
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("generation")
    except (OSError, ValueError, AttributeError):
        return None


def _open_array(folder: Path, entry: dict[str, Any], name: str) -> np.ndarray:
    path = folder / entry["file"]
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError as e:
        raise GalleryError(f"{path}: gallery file missing (listed in {folder / MANIFEST})") from e
    except (ValueError, OSError, EOFError) as e:
        raise GalleryError(f"{path}: truncated or corrupted gallery file ({e})") from e
    if list(arr.shape) != list(entry["shape"]) or arr.dtype.name != entry["dtype"]:
        raise GalleryError(
            f"{path}: corrupted gallery file: {name} is {arr.dtype.name}{list(arr.shape)}, "
            f"the manifest says {entry['dtype']}{list(entry['shape'])}"
        )
    _register(path, arr)
    return arr


def read_side_file(folder: Path, fname: Any, what: str) -> list:
    path = folder / str(fname)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise GalleryError(f"{path}: {what} file missing (listed in {folder / MANIFEST})") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GalleryError(f"{path}: corrupted {what} file ({e})") from e
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise GalleryError(f"{path}: corrupted {what} file (expected a list of strings)")
    return values


def open_arrays(
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
        raise GalleryError(f"{path}: gallery file missing (listed in {folder / MANIFEST})") from e
    if got != want:
        raise GalleryError(
            f"{path}: corrupted gallery file: {CHECKSUM} is {got}, {MANIFEST} records {want}; "
            f"rebuild the gallery (runtime/search.py ... --rebuild)"
        )


def check_binding(data: dict[str, Any], key: str, expected: str, folder: Path) -> None:
    if data.get(key) != expected:
        raise GalleryError(
            f"{folder}: this gallery was built by another model ({key} {str(data.get(key))[:12]}..., the engine's is "
            f"{expected[:12]}...); rebuild it with this engine, or pass the engine that built it"
        )


def check_finite(folder: Path, data: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
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


def temporary(folder: Path, name: str, generation: int) -> Path:
    """A unique temporary path in ``folder`` (removed by the next writer if this one is killed)."""
    return atomic.temporary(folder, f".{name}.{generation}.", ".npy.tmp")


def finish_array(
    folder: Path, tmp: Path, name: str, generation: int, shape: Sequence[int], dtype: str
) -> dict[str, Any]:
    """fsync ``tmp``, checksum it and move it to its generation's name: the manifest entry."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    digest = checksum_file(tmp)
    final = folder / f"{name}.{generation}.npy"
    os.replace(tmp, final)
    return {"file": final.name, "shape": [int(s) for s in shape], "dtype": dtype, CHECKSUM: digest}


def save_arrays(folder: Path, generation: int, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    entries = {}
    for name, arr in arrays.items():
        tmp = None
        try:
            tmp = temporary(folder, name, generation)
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
            entries[name] = finish_array(folder, tmp, name, generation, arr.shape, arr.dtype.name)
        finally:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
    return entries


def commit(folder: Path, manifest: dict[str, Any], extra_files: dict[str, Any]) -> None:
    """Write side files, then ``gallery.json`` (last: the commit). Called with the writer lock held."""
    for fname, obj in extra_files.items():
        atomic.write_json(folder / fname, obj)
    atomic.write_json(folder / MANIFEST, manifest)


def current_generation(folder: Path) -> int:
    path = folder / MANIFEST
    if path.is_file():
        try:
            return int(json.loads(path.read_text(encoding="utf-8")).get("generation", 0))
        except (ValueError, TypeError, AttributeError, json.JSONDecodeError):
            pass
    # No readable manifest: still never reuse a generation number whose files may exist.
    gens = [int(m.group(1)) for p in folder.iterdir() if (m := re.match(r"^[a-z_]+\.(\d+)\.(?:npy|json)$", p.name))]
    return max(gens, default=0)


def previous(cls: type[T], folder: Path, encoder_id: str, options: Any) -> T | None:
    """The cache an append extends (None when building, or when there is none yet), checked to store the dtype
    ``options`` (``WriteOptions``) asks for. Called with the writer lock held."""
    if not (options.append and (folder / MANIFEST).is_file()):
        return None
    old = cls.load(folder, encoder_id)
    if old.dtype.name != options.dtype:
        raise GalleryError(f"{folder}: the gallery stores {old.dtype.name}; append with dtype={old.dtype.name}")
    return old


class MappedGallery:
    """What image and caption galleries share: closing drops the memory maps of their ``ARRAYS``, and files
    of a superseded generation go once nothing maps them. A context manager that closes.

    ``ARRAYS[0]`` holds the encoded items (its dtype is the cache's); ``ids`` has one entry per item."""

    ARRAYS: ClassVar[tuple[str, ...]] = ()
    folder: Path
    ids: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def dtype(self) -> np.dtype:
        return getattr(self, self.ARRAYS[0]).dtype

    def close(self) -> None:
        for f in self.ARRAYS:
            setattr(self, f, np.zeros((0, *getattr(self, f).shape[1:]), getattr(self, f).dtype))
        folder = Path(self.folder)
        if (folder / MANIFEST).is_file():
            sweep(folder)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_CHUNK_ROWS = 4096


def save_rows(
    folder: Path, generation: int, name: str, shape: tuple[int, ...], dtype: str, chunks: Iterable[np.ndarray]
) -> dict[str, Any]:
    """Stream consecutive row blocks into ``name.<generation>.npy`` (memory bounded by one block)."""
    tmp = temporary(folder, name, generation)
    try:
        out = open_rows(tmp, dtype, shape)
        pos = 0
        for chunk in chunks:
            out[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
        if pos != shape[0]:
            raise GalleryError(f"{folder / name}: expected {shape[0]} rows, received {pos}")
        out.flush()
        del out
        return finish_array(folder, tmp, name, generation, shape, dtype)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def row_chunks(pieces: Sequence[np.ndarray]) -> Iterator[np.ndarray]:
    for piece in pieces:
        for start in range(0, len(piece), _CHUNK_ROWS):
            yield np.asarray(piece[start : start + _CHUNK_ROWS])


def require_new(folder: Path) -> int:
    if (folder / MANIFEST).is_file():
        raise GalleryError(f"{folder}: a gallery is already there; write encoded arrays into a new folder")
    return current_generation(folder) + 1
