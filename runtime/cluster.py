"""Search a sharded gallery on a Ray cluster: one actor per shard, fan-out and an exact top-k merge.

    with open_shards("engines/scan.json", "gal-shards") as searcher:       # a Searcher; a local Ray instance
        scores, ids = searcher.search(["a dog on a beach"], k=10)           # global ids, faiss contract
        names = searcher.labels("text_to_image", ids)

Each shard is held by a Ray actor (``ShardServer``) that opens its own engine and a ``Searcher`` over its
shard folder, resident. The driver's ``Searcher`` holds a ``Shards`` (the actors): its scoring sends every
batch of queries, checked and tokenised once by the driver, to all shards at once and merges their top-k
(global ids) with the running top-k's contract (descending, ties to the lower id, -1 past the gallery): the
same answer as one ``Searcher`` over the unsharded gallery.

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

from runtime.engine import ScanEngine, ScanModel
from runtime.gallery import GalleryError
from runtime.gallery.shards import KINDS, check_contiguous, read_layout, read_shard
from runtime.options import EngineOptions, SearchOptions
from runtime.searcher import DIRECTIONS, OutcomeUnknown, Queries, Searcher, ShardUnavailableError, check_names
from runtime.topk import MISSING_ID

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
INLINE_BYTES = 100_000  # Ray inlines task arguments up to 100 KiB (max_direct_call_object_size)


def globalize(ids: np.ndarray, offset: int) -> np.ndarray:
    """Local shard ids -> global ids; -1 (past the shard) stays -1."""
    return np.where(ids == MISSING_ID, MISSING_ID, ids + offset).astype(np.int64)


class ShardServer:
    """One shard with its engine and a ``Searcher`` over its folder, resident: searches answer global ids. Runs
    inside a Ray actor (or in-process: it does not need Ray)."""

    def __init__(
        self,
        engine: str | Path,
        folder: str | Path,
        engine_options: EngineOptions = EngineOptions(),
        options: SearchOptions = SearchOptions(),
    ) -> None:
        self.engine = ScanEngine.open(engine, engine_options)
        try:
            self.shard = read_shard(folder)
            self.searcher = Searcher.open(self.engine, folder, options=options)
        except BaseException:
            self.engine.close()
            raise

    def search(self, queries: Queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """This shard's top-k of prepared ``queries``: (scores, global ids)."""
        scores, ids = self.searcher.search_prepared(queries, k)
        return scores, globalize(ids, self.shard.offset(DIRECTIONS[queries.direction]))

    def labels(self, direction: str, ids: Sequence[int]) -> list[str | None]:
        """Names of images / texts of captions for global ``ids`` held by this shard."""
        offset = self.shard.offset(DIRECTIONS[direction])
        return self.searcher.labels(direction, np.asarray([ids], np.int64) - offset)[0]

    def image_queries(self, ids: Sequence[int]) -> Queries:
        """This shard's images ``ids`` (global) as image -> text queries."""
        return self.searcher.image_queries([i - self.shard.offset("images") for i in ids])

    def boxes(self, image_id: int) -> np.ndarray | None:
        return self.searcher.boxes(image_id - self.shard.offset("images"))

    def explain(self, query: str | Queries, item: int) -> Any:
        """The explanation of ``query`` and this shard's item ``item`` (global id)."""
        return self.searcher.explain(query, item - self.shard.offset(DIRECTIONS[_direction(query)]))

    def add_images(
        self, regions: np.ndarray, names: Sequence[str] | None = None, boxes: np.ndarray | None = None
    ) -> dict[str, Any]:
        self.searcher.add_images(regions, names, boxes)
        return self.info()

    def add_captions(self, texts: Sequence[str]) -> dict[str, Any]:
        self.searcher.add_captions(texts)
        return self.info()

    def info(self) -> dict[str, Any]:
        out = {
            "index": self.shard.index,
            "folder": str(self.shard.folder),
            "pid": os.getpid(),
            "node": _node_id(),
            "backend": self.engine.options.backend,
            "precision": self.engine.options.precision,
        }
        for kind in KINDS:
            galleries = self.searcher.galleries(kind)
            out[kind] = {"offset": self.shard.offset(kind), "size": len(galleries[0]) if galleries else 0}
            if galleries:
                out[kind]["dtype"] = galleries[0].dtype.name
        if self.searcher.galleries("images"):
            out["images"]["names"] = self.searcher.galleries("images")[0].names is not None
        return out

    def close(self) -> None:
        self.searcher.close()
        self.engine.close()


def _direction(query: str | Queries) -> str:
    return "text_to_image" if isinstance(query, str) else query.direction


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


class Shards:
    """The driver's side of a sharded gallery (what a ``Searcher`` fans its scoring out to): one ``ShardServer``
    actor per shard of ``shards`` (a folder made by runtime/shards.py split), asked all at once.

    ``timeout_s``: how long a request waits for all shards. ``shard_cpus``: CPUs Ray reserves per shard actor
    (None: Ray's default for actors, which reserves none once placed). ``engine_options.threads``: ONNX Runtime
    threads per shard."""

    def __init__(
        self,
        engine: str | Path,
        shards: str | Path,
        engine_options: EngineOptions = EngineOptions(),
        options: SearchOptions = SearchOptions(),
        *,
        address: str | None = None,
        num_cpus: int | None = None,
        timeout_s: float = 30.0,
        startup_timeout_s: float = 600.0,
        shard_cpus: float | None = None,
    ) -> None:
        self.timeout_s = float(timeout_s)
        self.layout = read_layout(shards)
        self._started_ray = connect(address, num_cpus)
        self._lock = threading.Lock()  # appends one at a time; sizes change only under it
        placement: dict[str, Any] = {"scheduling_strategy": "SPREAD"}
        if shard_cpus is not None:
            placement["num_cpus"] = shard_cpus
        actor = _actor_class().options(**placement)
        self.actors = [actor.remote(str(engine), str(s.folder), engine_options, options) for s in self.layout]
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

    def search(self, queries: Queries, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every shard's top-k (scores, global ids) of ``queries``."""
        import ray

        # A large batch goes to the object store once and every shard reads it; a small one travels
        # inside each task (cheaper than a store round trip, which a 1-shard request would pay for nothing).
        large = sum(a.nbytes for a in (queries.regions, *(x for m in queries.encoded for x in m)) if a is not None)
        large = large > INLINE_BYTES
        arg = ray.put(queries) if large else queries
        what = "search_text" if queries.direction == "text_to_image" else "search_images"
        return self._gather([a.search.remote(arg, k) for a in self.actors], what)

    def labels(self, direction: str, ids: np.ndarray) -> list[list[str | None]]:
        """Names (text -> image) or texts (image -> text) for a (n, k) array of global ids; None for -1."""
        ids = np.asarray(ids, np.int64)
        starts = [s.offset(DIRECTIONS[direction]) for s in self.layout]
        wanted: dict[int, list[int]] = {}
        for i in np.unique(ids[ids >= 0]):
            wanted.setdefault(bisect.bisect_right(starts, int(i)) - 1, []).append(int(i))
        shards = sorted(wanted)
        answers = self._gather([self.actors[s].labels.remote(direction, wanted[s]) for s in shards], "labels", shards)
        found = {i: label for s, labels in zip(shards, answers) for i, label in zip(wanted[s], labels)}
        return [[found.get(int(i)) if i >= 0 else None for i in row] for row in ids]

    def _holder(self, kind: str, item: int) -> int:
        """The shard holding global id ``item`` of ``kind``."""
        return bisect.bisect_right([s.offset(kind) for s in self.layout], item) - 1

    def image_queries(self, ids: Sequence[int]) -> Queries:
        """Global image ids as image -> text queries, each encoded by the shard holding it."""
        shards = [self._holder("images", i) for i in ids]
        parts = self._gather([self.actors[s].image_queries.remote([i]) for s, i in zip(shards, ids)], "images", shards)
        return Queries.concat(parts)

    def boxes(self, image_id: int) -> np.ndarray | None:
        shard = self._holder("images", image_id)
        return self._gather([self.actors[shard].boxes.remote(image_id)], "boxes", [shard])[0]

    def explain(self, query: str | Queries, item: int) -> Any:
        """The explanation of ``query`` and global item ``item``, by the shard holding it."""
        shard = self._holder(DIRECTIONS[_direction(query)], item)
        return self._gather([self.actors[shard].explain.remote(query, item)], "explain", [shard])[0]

    def add_images(
        self, regions: np.ndarray, names: Sequence[str] | None = None, boxes: np.ndarray | None = None
    ) -> int:
        """Append to the last shard (atomically, persisted); returns the image gallery's new size."""
        if names is not None and len(names) != len(regions):
            raise GalleryError(f"names: expected one name per image ({len(regions)}), received {len(names)}")
        with self._lock:
            check_names(self._image_names, names)
            info = self._append(self.actors[-1].add_images.remote(regions, names, boxes), "add_images", len(regions))
            self._sizes["images"][-1] = info["images"]["size"]
            self._image_names = info["images"].get("names")
            return sum(self._sizes["images"])

    def add_captions(self, texts: Sequence[str]) -> int:
        """Append to the last shard (atomically, persisted); returns the caption gallery's new size."""
        with self._lock:
            info = self._append(self.actors[-1].add_captions.remote(list(texts)), "add_captions", len(texts))
            self._sizes["captions"][-1] = info["captions"]["size"]
            return sum(self._sizes["captions"])

    def _append(self, ref: Any, what: str, n: int) -> dict[str, Any]:
        """The last shard's answer to an append. A shard that does not answer in time (or dies) may still
        commit it: the outcome is unknown (``OutcomeUnknown``), not a failure a client may blindly retry."""
        try:
            return self._gather([ref], what, [-1])[0]
        except ShardUnavailableError as e:
            raise OutcomeUnknown(
                f"{what}: the outcome of appending {n} items is unknown: {e}; the last shard may have "
                f"committed them. Check the gallery's size (GET /readyz) before writing them again"
            ) from e

    def sizes(self) -> dict[str, int | None]:
        return {kind: sum(self._sizes[kind]) or None for kind in KINDS}

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


def open_shards(
    engine: str | Path,
    shards: str | Path,
    engine_options: EngineOptions = EngineOptions(),
    options: SearchOptions = SearchOptions(),
    **kw: Any,
) -> Searcher:
    """A ``Searcher`` over the sharded gallery ``shards`` (``kw``: as ``Shards``'); it checks queries with the
    model's tokenizer here, once, so a bad request fails before any shard sees it."""
    return Searcher(
        ScanModel.open(engine), options=options, shards=Shards(engine, shards, engine_options, options, **kw)
    )
