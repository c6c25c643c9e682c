"""Search a sharded gallery on a Ray cluster: one actor per shard, fan-out and an exact top-k merge.

    with ShardedSearcher("engines/scan.json", "gal-shards") as searcher:     # a local Ray instance
        scores, ids = searcher.search(["a dog on a beach"], k=10)             # global ids, faiss contract

Each shard is held by a Ray actor (``ShardServer``) that opens its own engine and its shard from
disk and keeps both resident. ``ShardedSearcher`` (the driver side) offers what ``Searcher`` and the
gallery appends offer (``search_text``, ``search_images``, ``add_images``, ``add_captions``,
sizes), so it can replace the single-node searcher inside the service. Every batch goes to all
shards at once; their per-shard top-k (global ids) merge into the global top-k with the running
top-k's contract (descending, ties to the lower id, -1 past the gallery): the same answer as one
``Searcher`` over the unsharded gallery.

Faults: Ray restarts a dead shard actor (``max_restarts=-1``), which reloads its shard, appends
included, from disk. A request that meets a dead, restarting or silent shard fails whole with
``ShardUnavailableError`` (the service answers 503), never with a partial top-k. Tasks are not
retried by Ray (an append is not idempotent); callers retry searches.

Appends go to the last shard (the only one whose id range is open-ended). Queries are encoded by
every shard (S encoder runs per batch, small next to scanning a gallery shard); ray is imported
only here, so the rest of the runtime does not need it.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.engine import ScanEngine
from runtime.features import check_regions
from runtime.gallery import GalleryError, build_caption_gallery, build_image_gallery
from runtime.gallery.shards import KINDS, check_contiguous, load_shard, read_layout
from runtime.manifest import resolve_manifest
from runtime.options import WriteOptions
from runtime.searcher import Searcher, SearcherContract, SearchError
from runtime.tokenizer import Tokenizer
from runtime.topk import MISSING_ID, RunningTopK
from runtime.vocab import Vocabulary

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
INLINE_BYTES = 100_000  # Ray inlines task arguments up to 100 KiB (max_direct_call_object_size)


class ShardUnavailableError(RuntimeError):
    """A shard is dead, restarting or did not answer in time: the request fails whole (HTTP 503)."""


def merge_topk(
    results: Sequence[tuple[np.ndarray, np.ndarray]], k: int, size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Global top-k (n, k) of per-shard top-k results with disjoint global ids (faiss's contract);
    ``size``: the whole gallery's, so only min(k, size) candidates are kept (the rest is -inf / -1)."""
    top = RunningTopK(len(results[0][0]), k, size)
    for scores, ids in results:
        top.merge(scores[:, : top.width], ids[:, : top.width])
    return top.result()


def globalize(ids: np.ndarray, offset: int) -> np.ndarray:
    """Local shard ids -> global ids; -1 (past the shard) stays -1."""
    return np.where(ids == MISSING_ID, MISSING_ID, ids + offset).astype(np.int64)


class ShardServer:
    """One shard with its engine, resident: searches answer global ids. Runs inside a Ray actor (or
    in-process: it does not need Ray)."""

    def __init__(
        self,
        engine: str | Path,
        folder: str | Path,
        backend: str = "auto",
        precision: str = "fp32",
        device: str = "cpu",
        threads: int | None = None,
        **searcher_options: Any,
    ) -> None:
        self.engine = ScanEngine.open(engine, backend=backend, precision=precision, device=device, threads=threads)
        self.precision = precision
        self.folder = Path(folder)
        self.searcher_options = searcher_options
        self._load()

    def _load(self) -> None:
        self.shard, images, captions = load_shard(self.folder, self.engine)
        self.searcher = Searcher(self.engine, images=images, captions=captions, **self.searcher_options)

    def search_text(self, captions: Sequence[str], k: int, labels: bool = False) -> tuple:
        """(scores, global ids), plus {global id: image name} of the hits when ``labels``."""
        scores, ids = self.searcher.search_text(captions, k)
        return self._answer("images", scores, ids, labels)

    def search_images(self, regions: np.ndarray, k: int, labels: bool = False) -> tuple:
        """(scores, global ids), plus {global id: caption text} of the hits when ``labels``."""
        scores, ids = self.searcher.search_images(regions, k)
        return self._answer("captions", scores, ids, labels)

    def _answer(self, kind: str, scores: np.ndarray, ids: np.ndarray, labels: bool) -> tuple:
        global_ids = globalize(ids, self.shard.offset(kind))
        if not labels:
            return scores, global_ids
        texts = self._texts(kind)
        found = (
            {}
            if texts is None
            else {g: texts[i] for g, i in zip(global_ids.ravel().tolist(), ids.ravel().tolist()) if i >= 0}
        )
        return scores, global_ids, found

    def _texts(self, kind: str) -> list[str] | None:
        gallery = self.searcher.images if kind == "images" else self.searcher.captions
        if gallery is None:
            return None
        return gallery.names if kind == "images" else gallery.texts

    def labels(self, kind: str, ids: Sequence[int]) -> list[str | None]:
        """Names of images / texts of captions for global ``ids`` held by this shard."""
        texts, offset = self._texts(kind), self.shard.offset(kind)
        return [texts[int(i) - offset] if texts is not None else None for i in ids]

    def add_images(self, regions: np.ndarray, names: Sequence[str] | None = None) -> dict[str, Any]:
        images = self.searcher.images
        dtype = images.dtype.name if images is not None else "float32"
        build_image_gallery(
            self.engine, regions, self.folder / "images", names, WriteOptions(dtype, append=True, progress=False)
        )
        self._load()
        return self.info()

    def add_captions(self, texts: Sequence[str]) -> dict[str, Any]:
        captions = self.searcher.captions
        dtype = captions.dtype.name if captions is not None else "float32"
        build_caption_gallery(
            self.engine, list(texts), self.folder / "captions", WriteOptions(dtype, append=True, progress=False)
        )
        self._load()
        return self.info()

    def info(self) -> dict[str, Any]:
        s = self.searcher
        out = {
            "index": self.shard.index,
            "folder": str(self.folder),
            "pid": os.getpid(),
            "node": _node_id(),
            "backend": self.engine.backend_name,
            "precision": self.precision,
            "images": {"offset": self.shard.images_offset, "size": len(s.images) if s.images is not None else 0},
            "captions": {
                "offset": self.shard.captions_offset,
                "size": len(s.captions) if s.captions is not None else 0,
            },
        }
        for kind, gallery in (("images", s.images), ("captions", s.captions)):
            if gallery is not None:
                out[kind]["dtype"] = gallery.dtype.name
        if s.images is not None:
            out["images"]["names"] = s.images.names is not None
        return out

    def close(self) -> None:
        self.searcher.close()
        self.engine.close()


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # outside Ray, or a Ray without a runtime context
        return None


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at ``address`` or start a local instance; True when this call started Ray.

    A local instance must be started from the main thread: Ray's own processes (raylet, object store)
    die with the thread that started them, and the driver process exits with them. Workers import this
    code: the repository root goes on their PYTHONPATH (it exists on this machine; on other nodes install
    the project at the same path or in site-packages)."""
    import ray

    if ray.is_initialized():
        return False
    if not address and threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "start the local Ray instance from the main thread (runtime.cluster.connect()) before "
            "opening shards in another thread: Ray's processes die with the thread that started them"
        )
    paths = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
    else:  # "local": never attach to a cluster someone else started on this machine
        # worker_niceness 0: Ray starts workers at nice 15, which starves the shards (the critical path of
        # every request) whenever anything else runs on the machine; on a cluster: RAY_worker_niceness=0
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            runtime_env=runtime_env,
            logging_level=logging.WARNING,
            _system_config={"worker_niceness": 0},
        )
    return True


_ACTOR = None


def _actor_class():
    global _ACTOR
    if _ACTOR is None:
        import ray

        # max_restarts=-1: Ray restarts a dead shard forever (it reloads from disk); max_task_retries=0:
        # a task in flight when the shard dies fails (appends are not idempotent), the caller decides.
        _ACTOR = ray.remote(max_restarts=-1, max_task_retries=0)(ShardServer)
    return _ACTOR


class ShardedSearcher(SearcherContract):
    """Driver side: fans each batch out to every shard actor and merges the global top-k."""

    def __init__(
        self,
        engine: str | Path,
        shards: str | Path,
        *,
        address: str | None = None,
        num_cpus: int | None = None,
        timeout_s: float = 30.0,
        startup_timeout_s: float = 600.0,
        shard_cpus: float | None = None,
        backend: str = "auto",
        precision: str = "fp32",
        device: str = "cpu",
        threads: int | None = None,
        **searcher_options: Any,
    ) -> None:
        """``shards``: a folder made by runtime/shards.py split. ``timeout_s``: how long a request waits
        for all shards. ``shard_cpus``: CPUs Ray reserves per shard actor (None: Ray's default for
        actors, which reserves none once placed). ``threads``: ONNX Runtime threads per shard."""

        self.timeout_s = float(timeout_s)
        self.layout = read_layout(shards)
        self.manifest = resolve_manifest(engine)
        self.config = self.manifest.config
        # Queries are validated here, once, so a bad request is a 4xx before any shard sees it.
        self.tokenizer = Tokenizer(Vocabulary.from_json(self.manifest.vocab_path()), max_words=self.manifest.max_words)
        self._started_ray = connect(address, num_cpus)
        self._lock = threading.Lock()  # appends one at a time; sizes change only under it
        options: dict[str, Any] = {"scheduling_strategy": "SPREAD"}
        if shard_cpus is not None:
            options["num_cpus"] = shard_cpus
        actor = _actor_class()
        self.actors = [
            actor.options(**options).remote(
                str(engine),
                str(s.folder),
                backend=backend,
                precision=precision,
                device=device,
                threads=threads,
                **searcher_options,
            )
            for s in self.layout
        ]
        try:
            infos = self._gather(
                [a.info.remote() for a in self.actors], "starting the shards", timeout_s=startup_timeout_s
            )
        except Exception:
            self.close()
            raise
        check_contiguous(self.layout, [{kind: info[kind]["size"] for kind in KINDS} for info in infos])
        self._sizes = {kind: [info[kind]["size"] for info in infos] for kind in KINDS}
        self._image_names: bool | None = infos[-1]["images"].get("names")  # None: no image gallery yet
        logger.info(
            "%d shards ready: %s",
            len(infos),
            ", ".join(f"{i['index']}: {i['images']['size']} images, {i['captions']['size']} captions" for i in infos),
        )

    # ------------------------------------------------------------------ the searcher contract

    def search_text(self, captions: Sequence[str], k: int, labels: bool = False) -> tuple:
        """(scores, ids) as ``Searcher.search_text``; with ``labels``, also the hits' image names (n, k)."""
        k = self._check_text_search(k, captions, sum(self._sizes["images"]) > 0, "this sharded gallery has no images")
        captions = list(captions)
        self.tokenizer.encode_batch(captions)  # validates every query, as Searcher does
        return self._fan_out("search_text", captions, k, "images", labels)

    def search_images(self, regions: np.ndarray, k: int, labels: bool = False) -> tuple:
        """(scores, ids) as ``Searcher.search_images``; with ``labels``, also the hits' caption texts (n, k)."""
        k = self._check_image_search(k, sum(self._sizes["captions"]) > 0, "this sharded gallery has no captions")
        regions = check_regions(regions, self.config.img_dim, "query regions")
        return self._fan_out("search_images", regions, k, "captions", labels)

    def _fan_out(self, method: str, queries: Any, k: int, kind: str, labels: bool) -> tuple:
        import ray

        # A large batch goes to the object store once and every shard reads it; a small one travels
        # inside each task (cheaper than a store round trip, which a 1-shard request would pay for nothing).
        arg = ray.put(queries) if isinstance(queries, np.ndarray) and queries.nbytes > INLINE_BYTES else queries
        results = self._gather([getattr(a, method).remote(arg, k, labels) for a in self.actors], method)
        scores, ids = merge_topk([r[:2] for r in results], k, sum(self._sizes[kind]))
        if not labels:
            return scores, ids
        found = {}
        for r in results:
            found.update(r[2])
        return scores, ids, [[found.get(i) for i in row] for row in ids.tolist()]

    def labels(self, kind: str, ids: np.ndarray) -> list[list[str | None]]:
        """Names (kind "images") or texts ("captions") for a (n, k) array of global ids; None for -1."""
        if kind not in KINDS:
            raise SearchError(f"kind must be one of {KINDS}, received {kind!r}")
        ids = np.asarray(ids, np.int64)
        starts = [s.offset(kind) for s in self.layout]
        wanted: dict[int, list[int]] = {}
        for i in np.unique(ids[ids >= 0]):
            wanted.setdefault(bisect.bisect_right(starts, int(i)) - 1, []).append(int(i))
        shards = sorted(wanted)
        answers = self._gather([self.actors[s].labels.remote(kind, wanted[s]) for s in shards], "labels", shards)
        found = {i: label for s, labels in zip(shards, answers) for i, label in zip(wanted[s], labels)}
        return [[found.get(int(i)) if i >= 0 else None for i in row] for row in ids]

    def add_images(self, regions: np.ndarray, names: Sequence[str] | None = None) -> int:
        """Append to the last shard (atomically, persisted); returns the image gallery's new size."""
        regions = check_regions(regions, self.config.img_dim, "regions")
        if names is not None and len(names) != len(regions):
            raise GalleryError(f"names: expected one name per image ({len(regions)}), received {len(names)}")
        with self._lock:
            if self._image_names is not None and self._image_names != (names is not None):
                raise GalleryError(
                    f"names: the image gallery {'has' if self._image_names else 'has no'} names; "
                    f"append {'one name per image' if self._image_names else 'without names'}"
                )
            info = self._gather([self.actors[-1].add_images.remote(regions, names)], "add_images", [-1])[0]
            self._sizes["images"][-1] = info["images"]["size"]
            self._image_names = info["images"].get("names")
            return sum(self._sizes["images"])

    def add_captions(self, texts: Sequence[str]) -> int:
        """Append to the last shard (atomically, persisted); returns the caption gallery's new size."""
        texts = list(texts)
        if not texts:
            raise GalleryError("captions: expected at least one caption, received none")
        self.tokenizer.encode_batch(texts)
        with self._lock:
            info = self._gather([self.actors[-1].add_captions.remote(texts)], "add_captions", [-1])[0]
            self._sizes["captions"][-1] = info["captions"]["size"]
            return sum(self._sizes["captions"])

    # ------------------------------------------------------------------ sizes and health

    @property
    def num_images(self) -> int:
        return sum(self._sizes["images"])

    @property
    def num_captions(self) -> int:
        return sum(self._sizes["captions"])

    def __len__(self) -> int:
        return len(self.actors)

    def info(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """One entry per shard (index, sizes and offsets, node id, pid), asked of the live actors."""
        return self._gather([a.info.remote() for a in self.actors], "info", timeout_s=timeout_s)

    def _gather(
        self, refs: list, what: str, shards: Sequence[int] | None = None, timeout_s: float | None = None
    ) -> list:
        """All results or an error: never a subset. ``shards``: the shard index of each ref (default:
        one ref per shard, in order). User errors raised in a shard are raised as they are."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        shards = list(range(len(refs))) if shards is None else [s % len(self.actors) for s in shards]
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)  # a dead shard's ref is ready
        if pending:
            late = [shards[i] for i, ref in enumerate(refs) if ref in pending]
            raise ShardUnavailableError(
                f"{what}: shard {', '.join(map(str, late))} did not answer within "
                f"{timeout_s:g} s (dead, restarting or overloaded)"
            )
        out = []
        for shard, ref in zip(shards, refs):
            try:
                out.append(ray.get(ref))
            except RayActorError as e:
                raise ShardUnavailableError(
                    f"{what}: shard {shard} is unavailable (dead or restarting; Ray restarts it): {type(e).__name__}"
                ) from e
            except RayTaskError as e:
                if isinstance(e.cause, ValueError):  # the project's input errors (SearchError, GalleryError, ...)
                    raise e.cause from None
                raise
        return out

    def close(self) -> None:
        import ray

        for a in getattr(self, "actors", []):
            with contextlib.suppress(Exception):  # already gone
                ray.kill(a, no_restart=True)
        self.actors = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
