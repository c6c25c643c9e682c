"""Top-k search of cached galleries in both directions, for one model, an ensemble or shards (faiss's contract).

* text -> image: ``Searcher(engine, images=ImageGallery).search(["a dog on a beach"], k)``
* image -> text: ``Searcher(engine, captions=CaptionGallery).search(regions (n, R, img_dim), k)``
* an ensemble (the paper's best results average a t2i and an i2t model): ``Searcher([t2i, i2t], images=[g1, g2],
  weights=[0.6, 0.4])`` scores the weighted mean of the members' similarities; one gallery per member, the
  same items in the same order (``GalleryFolder`` builds them together). A single model is an
  ensemble of one member.
* a gallery on disk: ``Searcher.open(engines, folder)``, which can also append (``add_images``, ``add_captions``);
* a sharded gallery: ``runtime.cluster.open_shards``, a Searcher whose scoring fans out to Ray shard actors,
  each holding a Searcher over its shard.

Scores are float32 ``(n, k)`` descending, ids int64, -1 past the gallery, ties to the lower id; labels (image
names, caption texts) come from ``labels(direction, ids)``. Both work whatever the model's ``cross_attn``
(that names the attention, not the search direction). Queries are grouped by length (little padding) and
the gallery is scored block by block into one running top-k, so memory is bounded by the block for any
gallery. One member scores a block with its head backend's own top-k (``Backend.block_topk``); several each
score it (``Backend.block_sims``) and the weighted mean is merged. Galleries are uploaded to the backends once,
on first use; the backends are thread-safe, so one Searcher serves several threads. An append commits a new
generation on disk and then swaps it in: a search keeps the generation it started with.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Self

import numpy as np

from runtime.backends.base import GalleryBlocks
from runtime.buckets import length_groups
from runtime.engine import ScanEngine, ScanModel
from runtime.explain import EnsembleExplanation, Explanation, combine, explain
from runtime.features import check_regions
from runtime.gallery import CaptionGallery, Galleries, GalleryError, GalleryFolder, ImageGallery
from runtime.gallery.members import check_agreement, check_distinct, member_label
from runtime.gallery.store import Repeated
from runtime.options import SearchOptions, WriteOptions
from runtime.stages import Stages
from runtime.tokenizer import TokenizerError
from runtime.topk import NonFiniteScore, RunningTopK, block_topk
from runtime.two_stage import TwoStage

logger = logging.getLogger(__name__)

# The search directions and the kind of gallery each searches.
DIRECTIONS = {"text_to_image": "images", "image_to_text": "captions"}
# How the error for a missing gallery says what is missing and how to build it.
_MISSING = {
    "images": "text -> image search needs an image gallery",
    "captions": "image -> text search needs a caption gallery",
}
_REMEDY = {
    "images": "build one with runtime/search.py --engine ENGINE --gallery DIR --images FEATS.npy",
    "captions": "build one with runtime/search.py --engine ENGINE --gallery DIR --captions CAPTIONS.txt",
}
# Results are (n, k) arrays whatever the gallery holds (faiss's contract), so k is bounded: 10^5 results of
# 12 bytes are 1.2 MB per query. The running top-k itself keeps only min(k, gallery) candidates.
MAX_K = 100_000


class SearchError(ValueError):
    """Bad search input (k, queries, weights) or a missing gallery."""


class ShardUnavailableError(RuntimeError):
    """A shard of a sharded gallery is dead, restarting or did not answer in time: the request fails whole
    (HTTP 503), never with a partial top-k (runtime/cluster.py)."""


class OutcomeUnknown(RuntimeError):
    """A write whose outcome cannot be known (a shard that did not answer in time may have committed it):
    the service answers 504 with ``"committed": "unknown"``, never a 503 that invites a blind retry."""


def check_weights(weights: Sequence[float] | str | None, n: int) -> np.ndarray:
    """One positive, finite weight per member (a sequence, or ``"0.7,0.3"``), normalised to sum to 1.

    None gives equal weights. Normalising makes the ensemble's score a weighted *mean* of the members'
    similarities, so ``[1, 1]`` and ``[0.5, 0.5]`` are the same ensemble (the average ``bench/recall.py``
    computes).
    """
    if weights is None:
        return np.full(n, 1.0 / n)
    if isinstance(weights, str):
        try:
            weights = [float(w) for w in weights.split(",")]
        except ValueError as e:
            raise SearchError(f"weights: expected comma-separated numbers such as 0.5,0.5, received {weights!r}") from e
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError) as e:
        raise SearchError(f"weights: expected numbers, received {weights!r}") from e
    if len(values) != n:
        raise SearchError(f"weights: expected one weight per engine ({n}), received {len(values)} ({values})")
    if not all(math.isfinite(w) and w > 0 for w in values):
        raise SearchError(f"weights: expected positive finite numbers, received {values}")
    total = math.fsum(values)
    return np.array([w / total for w in values])


def check_names(has_names: bool | None, names: Sequence[str] | None) -> None:
    """Images appended to a gallery with names need names, and none to one without (None: no gallery yet)."""
    if has_names is not None and has_names != (names is not None):
        raise GalleryError(
            f"names: the image gallery {'has' if has_names else 'has no'} names; "
            f"append {'one name per image' if has_names else 'without names'}"
        )


@dataclass(frozen=True)
class Queries:
    """Queries checked and ready for every member (``Searcher.prepare``): text tokenised once per member
    (``tokens``: per member, ids (n, L) padded with 0 and lengths (n,)), region features (``regions``,
    float32 (n, R, img_dim)), or images of the gallery already encoded (``encoded``: per member, float32
    images (n, R, d) and Gram matrices (n, R, R); ``Searcher.image_queries``). ``Queries.concat`` joins
    several requests' queries of one form into one batch."""

    direction: str
    tokens: tuple[tuple[np.ndarray, np.ndarray], ...] = ()
    regions: np.ndarray | None = None
    encoded: tuple[tuple[np.ndarray, np.ndarray], ...] = ()

    def __len__(self) -> int:
        if self.regions is not None:
            return len(self.regions)
        return len(self.encoded[0][0]) if self.encoded else len(self.tokens[0][1])

    @property
    def vectors(self) -> int:
        """The queries' vectors all together: their words (by the first member's tokenizer) or regions."""
        if self.regions is not None:
            return int(self.regions.shape[0] * self.regions.shape[1])
        if self.encoded:
            return int(self.encoded[0][0].shape[0] * self.encoded[0][0].shape[1])
        return int(np.sum(self.tokens[0][1]))

    @property
    def batch_key(self) -> tuple[str, int] | None:
        """What queries must share to be one batch: image queries of one form and number of regions."""
        if self.regions is not None:
            return ("regions", int(self.regions.shape[1]))
        return ("encoded", int(self.encoded[0][0].shape[1])) if self.encoded else None

    @staticmethod
    def concat(parts: Sequence[Queries]) -> Queries:
        first = parts[0]
        if first.regions is not None:
            return Queries(first.direction, regions=np.concatenate([p.regions for p in parts]))
        if first.encoded:
            members = zip(*(p.encoded for p in parts))
            encoded = tuple((np.concatenate([i for i, _ in m]), np.concatenate([g for _, g in m])) for m in members)
            return Queries(first.direction, encoded=encoded)
        tokens = []
        for member in zip(*(p.tokens for p in parts)):
            width = max(ids.shape[1] for ids, _ in member)
            ids = np.concatenate([np.pad(ids, ((0, 0), (0, width - ids.shape[1]))) for ids, _ in member])
            tokens.append((ids, np.concatenate([lengths for _, lengths in member])))
        return Queries(first.direction, tuple(tokens))


@dataclass
class Generation:
    """The galleries a search sees from its start to its end (one per member, or None), their generation on
    disk (per kind) and what was made of them on first use (uploads to the backends, candidate indexes)."""

    images: tuple[ImageGallery, ...] | None = None
    captions: tuple[CaptionGallery, ...] | None = None
    numbers: dict[str, int | None] = field(default_factory=dict)
    _made: dict[Any, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def of(self, kind: str) -> tuple | None:
        return self.images if kind == "images" else self.captions

    def once(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` the first time ``key`` is asked for (from any thread), its result afterwards."""
        with self._lock:
            if key not in self._made:
                self._made[key] = make()
            return self._made[key]


class Searcher:
    """``search(queries, k)`` over the galleries of one or several engines (the members).

    ``engines``: one opened ``ScanEngine`` or a sequence (not closed by the searcher). ``images`` /
    ``captions``: one gallery, or one per member in the members' order. ``weights``: see ``check_weights``.
    ``options``: block sizes (capped to every member's backend limits, so the members' blocks line up),
    residency and two-stage search; ``candidates``: the two-stage collaborator (default: ``TwoStage(options)``
    when ``options.candidates`` is set). ``shards``: the driver's side of a sharded gallery
    (runtime/cluster.py), which then does the scoring, labels and appends.
    """

    def __init__(
        self,
        engines: ScanModel | Sequence[ScanModel],
        images: ImageGallery | Sequence[ImageGallery] | None = None,
        captions: CaptionGallery | Sequence[CaptionGallery] | None = None,
        *,
        weights: Sequence[float] | str | None = None,
        options: SearchOptions = SearchOptions(),
        candidates: TwoStage | None = None,
        shards: Any = None,
    ) -> None:
        self.engines = [engines] if isinstance(engines, ScanModel) else list(engines)
        if not self.engines:
            raise SearchError("a searcher needs at least one engine, received none")
        self.weights = check_weights(weights, len(self.engines))
        check_distinct(self.engines)
        if len({e.config.img_dim for e in self.engines}) > 1:
            raise SearchError(
                "the ensemble's members take different region features: "
                + ", ".join(f"{member_label(e, i)} img_dim {e.config.img_dim}" for i, e in enumerate(self.engines))
            )
        # A backend may only serve bounded shapes (a TensorRT profile): blocks and batches fit in every member's.
        for e in self.engines:
            limits = e.head.limits if isinstance(e, ScanEngine) else {}
            max_images, max_captions = limits.get("images", math.inf), limits.get("captions", math.inf)
            options = replace(
                options,
                image_block=min(options.image_block, max_images),
                caption_block=min(options.caption_block, max_captions),
                query_batch=min(options.query_batch, max_images, max_captions),
            )
        self.options = options
        self.two_stage = candidates if candidates is not None or not options.candidates else TwoStage(options)
        self.shards = shards
        self.folder: GalleryFolder | None = None  # where appends go
        self._generation = self._new_generation(images, captions)
        self._write = threading.Lock()  # one append at a time in this process
        self._swap = threading.Lock()  # generations swap in one at a time, never an older over a newer

    @classmethod
    def open(
        cls, engines: ScanEngine | Sequence[ScanEngine], folder: str | Path, verify: bool | None = None, **kw: Any
    ) -> Searcher:
        """A searcher over the galleries in ``folder`` (none yet is fine: appends create them); ``kw`` as
        ``Searcher``'s. ``verify``: as ``ImageGallery.load``'s."""
        searcher = cls(engines, **kw)
        if Path(folder).exists() and not Path(folder).is_dir():
            raise GalleryError(f"--gallery {folder}: expected a folder, received a file")
        searcher.folder = GalleryFolder(folder, searcher.engines)
        searcher._generation = _generation(searcher.folder.load(verify))
        return searcher

    def _new_generation(self, images: Any, captions: Any) -> Generation:
        g = _generation(Galleries(self._per_member(images, "images"), self._per_member(captions, "captions")))
        for kind, galleries in _kinds(g):
            if galleries is not None and len(galleries) > 1:
                check_agreement(galleries, self.engines, kind)
        return g

    def _per_member(self, galleries: Any, kind: str) -> tuple | None:
        if galleries is None:
            return None
        galleries = tuple(galleries) if isinstance(galleries, (list, tuple)) else (galleries,)
        if len(galleries) != len(self.engines):
            raise SearchError(
                f"{kind}: expected one gallery per engine ({len(self.engines)}), received {len(galleries)}"
            )
        for i, (g, e) in enumerate(zip(galleries, self.engines)):
            key = "image_encoder_id" if kind == "images" else "text_encoder_id"
            have, want = g.manifest.get(key), getattr(e.manifest, key)
            if have is not None and have != want:
                raise GalleryError(
                    f"{kind} gallery {g.folder} for {member_label(e, i)} was built by another model "
                    f"({key} {str(have)[:12]}, the engine's is {want[:12]})"
                )
        return galleries

    def close(self) -> None:
        """Free the galleries uploaded to the backends, if any (and the shards' actors)."""
        if self.shards is not None:
            self.shards.close()
        g = self._generation
        with g._lock:
            made, g._made = g._made, {}
        for key, value in made.items():
            if key[0] == "upload":
                value.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ queries

    def prepare(self, direction: str, queries: Sequence[str] | np.ndarray, field: str = "queries") -> Queries:
        """Check ``queries`` and make them ready for every member: captions tokenised by each member's tokenizer
        (errors name ``field[i]``), region features checked and made float32."""
        if direction == "image_to_text":
            return Queries(direction, regions=check_regions(queries, self.engines[0].config.img_dim, field))
        if direction != "text_to_image":
            raise SearchError(f"direction must be one of {tuple(DIRECTIONS)}, received {direction!r}")
        if len(queries) == 0:
            raise SearchError(f"{field}: expected at least one caption, received none")
        try:
            return Queries(direction, tuple(e.tokenizer.encode_batch(list(queries)) for e in self.engines))
        except TokenizerError as e:  # the tokenizer says captions[i]; the caller sent field[i]
            raise TokenizerError(str(e).replace("captions[", f"{field}[", 1)) from e

    def search(self, queries: Sequence[str] | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Captions (a list of str) search the image gallery; region features (n, R, img_dim) the caption gallery."""
        direction = "image_to_text" if isinstance(queries, np.ndarray) else "text_to_image"
        self._check(direction, k)
        field = "query regions" if direction == "image_to_text" else "queries"
        return self.search_prepared(
            self.prepare(direction, [queries] if isinstance(queries, str) else queries, field), k
        )

    def search_prepared(self, queries: Queries, k: int, stages: Stages | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``search`` of queries made ready by ``prepare``: (scores (n, k), ids (n, k)). ``stages`` collects the
        seconds spent encoding the queries, scoring the gallery and merging the top-k (the service's metrics)."""
        stages = Stages() if stages is None else stages
        k = self._check(queries.direction, k)
        kind = DIRECTIONS[queries.direction]
        if self.shards is not None:
            with stages.timed("score"):
                blocks = list(self.shards.search(queries, k))
            return self._merged(kind, iter(blocks), len(queries), k, self.sizes()[kind], stages)
        g = self._generation  # one generation for the whole search
        if len(g.of(kind)[0]) == 0:
            logger.warning("the gallery %s is empty: every result is -1", g.of(kind)[0].folder)
        scores = np.empty((len(queries), k), np.float32)
        ids = np.empty((len(queries), k), np.int64)
        indexes = self._indexes(g, kind, queries)
        for rows, batch in self._encoded(queries, stages):
            if indexes is not None:
                with stages.timed("score"):  # candidates and their exact scores, and the top-k of each query
                    scores[rows], ids[rows] = self._two_stage(g, kind, indexes, batch, k)
            else:
                blocks = self._blocks(g, kind, batch, k)
                scores[rows], ids[rows] = self._merged(kind, blocks, len(rows), k, g, stages)
        return scores, ids

    # ------------------------------------------------------------------ gallery images as queries, explanations

    def image_queries(self, ids: Sequence[int]) -> Queries:
        """Images of the image gallery as image -> text queries (what ``search_prepared`` takes): each member's
        encoded images, float32, as a search of their region features would encode them."""
        ids = [self.item("images", i, f"ids[{n}]") for n, i in enumerate(ids)]
        if not ids:
            raise SearchError("ids: expected at least one image id, received none")
        if self.shards is not None:
            return self.shards.image_queries(ids)
        encoded = tuple(
            (np.asarray(g.images[ids], np.float32), np.asarray(g.image_gram[ids], np.float32))
            for g in self._generation.images
        )
        return Queries("image_to_text", encoded=encoded)

    def boxes(self, image_id: int) -> np.ndarray | None:
        """Image ``image_id``'s region boxes (R, 4) float32, x1 y1 x2 y2 in its picture's pixels; None when the
        gallery has none (``--boxes``)."""
        image_id = self.item("images", image_id, "image_id")
        if self.shards is not None:
            return self.shards.boxes(image_id)
        boxes = self._generation.images[0].boxes
        return None if boxes is None else np.array(boxes[image_id], np.float32)

    def item(self, kind: str, item: object, field: str = "id") -> int:
        """``item`` checked as an id of the ``kind`` gallery (an integer in [0, size))."""
        size = self.sizes()[kind]
        if size is None:
            raise SearchError(f"{_MISSING[kind]}; {_REMEDY[kind]}")
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
            raise SearchError(f"{field}: expected an integer {kind[:-1]} id, received {type(item).__name__} {item!r}")
        if not 0 <= item < size:
            raise SearchError(f"{field}: {kind[:-1]} id {item} is outside the gallery (ids 0..{size - 1})")
        return int(item)

    def explain(self, query: str | np.ndarray | Queries, item: int) -> Explanation | EnsembleExplanation:
        """Why ``query`` and gallery item ``item`` matched: the model's attention for that pair
        (runtime/explain.py), its ``score`` the search score of the pair (to 1e-5, float32 graphs).

        ``query``: a caption (``item``: an image id), or one image (``item``: a caption id) as region features
        (R, img_dim) or (1, R, img_dim), or one gallery image (``image_queries([id])``). One model gives an
        ``Explanation``; an ensemble an ``EnsembleExplanation``, each member's and the weighted score.
        Sharded: the shard holding ``item`` explains it.
        """
        text = isinstance(query, str)
        direction = "text_to_image" if text else "image_to_text"
        kind = DIRECTIONS[direction]
        item = self.item(kind, item, "id")
        if isinstance(query, np.ndarray) and query.ndim == 2:
            query = query[None]
        if text:
            prepared = self.prepare(direction, [query], "query")
        elif isinstance(query, Queries):
            prepared = query
        else:
            prepared = self.prepare(direction, query, "query regions")
        if len(prepared) != 1:
            raise SearchError(f"query: explain takes one image, received {len(prepared)}")
        if self.shards is not None:
            return self.shards.explain(query if text else prepared, item)
        galleries = self._generation.of(kind)
        members = []
        for m, (engine, gallery) in enumerate(zip(self.engines, galleries)):
            if text:
                ids, lengths = prepared.tokens[m]
                words = engine.encode_ids(ids, lengths)[0]
                ex = explain(engine.config, words, int(lengths[0]), gallery.images[item], gallery.image_gram[item])
                tokens = engine.tokenizer.tokens(query)
            else:
                if prepared.encoded:
                    images, gram = prepared.encoded[m]
                else:
                    images, gram = engine.encode_images(prepared.regions, name="query regions")
                row = int(np.flatnonzero(np.asarray(gallery.ids) == item)[0])  # its place in the length order
                lo, hi = int(gallery.offsets[row]), int(gallery.offsets[row + 1])
                ex = explain(engine.config, gallery.words[lo:hi], hi - lo, images[0], gram[0])
                tokens = engine.tokenizer.tokens(gallery.texts[item])
            members.append(replace(ex, words=tuple(tokens)))
        return members[0] if len(members) == 1 else combine(members, self.weights)

    def _check(self, direction: str, k: object) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise SearchError(f"k must be a positive integer, received {k!r}")
        if k > MAX_K:
            raise SearchError(f"k must be at most {MAX_K}, received {k}")
        kind = DIRECTIONS.get(direction)
        if kind is not None and self.sizes()[kind] is None:
            raise SearchError(f"{_MISSING[kind]}; {_REMEDY[kind]}")
        return int(k)

    def _encoded(self, queries: Queries, stages: Stages) -> Iterator[tuple[np.ndarray, list[dict[str, np.ndarray]]]]:
        """``(rows, per member the head's query inputs)`` per batch of at most ``query_batch`` queries; captions
        in batches of similar length, padded little (``length_groups``: by the first member's lengths; every
        member pads to its own longest)."""
        batch = self.options.query_batch
        if queries.regions is not None or queries.encoded:
            with stages.timed("encode"):
                encoded = queries.encoded or [
                    e.encode_images(queries.regions, name="query regions") for e in self.engines
                ]
            for a in range(0, len(queries), batch):
                rows = np.arange(a, min(a + batch, len(queries)))
                yield rows, [{"images": images[rows], "image_gram": gram[rows]} for images, gram in encoded]
            return
        for rows in length_groups(queries.tokens[0][1], batch):
            member_queries = []
            with stages.timed("encode"):
                for e, (ids, lengths) in zip(self.engines, queries.tokens):
                    width = int(lengths[rows].max())
                    member_queries.append(
                        {"captions": e.encode_ids(ids[rows, :width], lengths[rows]), "lengths": lengths[rows]}
                    )
            yield rows, member_queries

    # ------------------------------------------------------------------ scoring

    def _merged(
        self,
        kind: str,
        blocks: Iterator[tuple[np.ndarray, np.ndarray]],
        n: int,
        k: int,
        g: Generation | int | None,
        stages: Stages | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Candidates ``(scores (n, c), ids (n, c))`` merged into the top-k; ``g``: the generation searched
        (or the gallery's size). ``stages``: the time producing the blocks is "score", merging them "topk"."""
        size = len(g.of(kind)[0]) if isinstance(g, Generation) else g
        top = RunningTopK(n, k, size)
        clock = time.perf_counter
        scoring = merging = 0.0
        try:
            t0 = clock()
            for scores, ids in blocks:  # the head runs while the next block is asked for
                t1 = clock()
                top.merge(scores[:, : top.width], ids[:, : top.width])
                t2 = clock()
                scoring, merging, t0 = scoring + t1 - t0, merging + t2 - t1, t2
            t1 = clock()
            out = top.result()
        except NonFiniteScore as e:  # never a silent drop: name the item
            raise self._corrupted(g, kind, e) from e
        if stages is not None:
            stages.add("score", scoring + t1 - t0)
            stages.add("topk", merging + clock() - t1)
        return out

    def _corrupted(self, g: Generation, kind: str, e: NonFiniteScore) -> SearchError:
        where = " in the ensemble: a member's" if len(self.engines) > 1 else ": its"
        return SearchError(
            f"{g.of(kind)[0].label(e.item_id)} scored {e.value}{where} cached arrays are corrupted; "
            f"check the gallery with runtime/search.py --verify and rebuild it"
        )

    def _upload(self, g: Generation, kind: str, member: int) -> GalleryBlocks:
        """Member ``member``'s ``kind`` gallery as its head backend holds it, uploaded on first use."""
        engine, gallery = self.engines[member], g.of(kind)[member]
        if kind == "images":

            def blocks() -> Iterator[tuple[int, dict[str, np.ndarray]]]:
                for offset, images, gram in gallery.blocks(self.options.image_block):
                    yield offset, {"images": images, **({"image_gram": gram} if engine.needs_image_gram else {})}

        else:

            def blocks() -> Iterator[tuple[int, dict[str, np.ndarray]]]:
                for position, words, lengths in gallery.blocks(self.options.caption_block):
                    yield position, {"captions": words, "lengths": lengths}

        return g.once(("upload", kind, member), lambda: engine.head.upload(blocks, self.options.resident))

    def _blocks(
        self, g: Generation, kind: str, queries: list[dict[str, np.ndarray]], k: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Per gallery block, each query's top-k candidates ``(scores, gallery ids)``. One member: its backend's
        own top-k; several: the weighted mean of their block scores."""
        ids = np.asarray(g.of(kind)[0].ids)
        axis = 0 if kind == "images" else 1  # the gallery's axis of the head's (N images, Q captions) similarities
        queries = [_head_query(e, q) for e, q in zip(self.engines, queries)]
        if len(self.engines) == 1:
            for scores, rows in self.engines[0].head.block_topk(self._upload(g, kind, 0), queries[0], k, axis):
                yield scores, ids[rows]
            return
        for offset, scores in self._block_scores(g, kind, queries, axis):
            yield block_topk(scores, min(k, len(ids)), ids[offset : offset + scores.shape[1]])

    def _block_scores(
        self, g: Generation, kind: str, queries: list[dict[str, np.ndarray]], axis: int
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(offset, weighted mean scores (q, rows))`` over the gallery, in order.

        The members' blocks usually line up (same block sizes); where a backend blocks its resident copy
        otherwise (CuPy merges blocks on the GPU), each step takes the rows every member has scored and
        keeps the rest of a longer block for the next, so memory stays bounded by the largest block.
        """
        streams = [
            e.head.block_sims(self._upload(g, kind, i), q, axis) for i, (e, q) in enumerate(zip(self.engines, queries))
        ]
        weights = self.weights.astype(np.float32)
        pending: list[tuple[int, np.ndarray] | None] = [None] * len(streams)  # (offset, scores) not yet used
        position = 0
        while True:
            for i, stream in enumerate(streams):
                if pending[i] is None:
                    pending[i] = next(stream, None)
            if all(b is None for b in pending):
                return
            if any(b is None or b[0] != position for b in pending):
                raise GalleryError(
                    f"the ensemble's {kind} galleries do not cover the same rows: at row {position}, the members' "
                    f"next blocks start at {[None if b is None else b[0] for b in pending]}"
                )
            stop = min(offset + scores.shape[1] for offset, scores in pending)
            total = None
            for i, (w, (offset, scores)) in enumerate(zip(weights, pending)):
                part = scores[:, position - offset : stop - offset]
                total = w * part if total is None else total + w * part
                pending[i] = (stop, scores[:, stop - offset :]) if offset + scores.shape[1] > stop else None
            yield position, total
            position = stop

    # ------------------------------------------------------------------ two-stage (runtime/two_stage.py)

    def _indexes(self, g: Generation, kind: str, queries: Queries) -> list | None:
        """The proposing members' candidate sources (indexes or dense scores) when this search is two-stage;
        None: exact (every item a candidate, exact search estimated cheaper, or a member without an index)."""
        two_stage, galleries = self.two_stage, g.of(kind)
        if two_stage is None or not two_stage.applies(len(galleries[0])):
            return None
        batch = self.options.query_batch
        proposing = len(two_stage.asked(len(self.engines)))
        work = two_stage.work(len(queries), queries.vectors, galleries[0], batch, len(self.engines), proposing)
        return two_stage.sources(self.engines, galleries, kind, work, g.once)

    def _two_stage(
        self, g: Generation, kind: str, indexes: list, queries: list[dict[str, np.ndarray]], k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each query's proposals, scored exactly by every member and averaged, then its top-k."""
        galleries, two_stage = g.of(kind), self.two_stage

        if kind == "images":
            vectors = [[w[:n] for w, n in zip(q["captions"], q["lengths"])] for q in queries]
        else:
            vectors = [list(q["images"]) for q in queries]
        block = self.options.image_block if kind == "images" else self.options.caption_block
        kept = [two_stage.kept(galleries, kind, i, g.once) for i in range(len(self.engines))]
        out = []
        for row, positions in enumerate(two_stage.proposals(indexes.__getitem__, self.engines, vectors)):
            total = ids = None
            for w, e, gallery, q, rows in zip(self.weights.astype(np.float32), self.engines, galleries, queries, kept):
                s, ids = two_stage.rescore(
                    e, gallery, kind, positions, {name: a[row : row + 1] for name, a in q.items()}, block, rows
                )
                total = w * s if total is None else total + w * s
            order = np.argsort(ids, kind="stable")
            top = block_topk(total[order][None, :], min(k, len(galleries[0])), ids[order])
            out.append(self._merged(kind, iter([top]), 1, k, g))
        return np.concatenate([t[0] for t in out]), np.concatenate([t[1] for t in out])

    # ------------------------------------------------------------------ labels, sizes, appends

    def sizes(self) -> dict[str, int | None]:
        """Gallery sizes: {'images': N or None, 'captions': M or None} (None: no such gallery)."""
        if self.shards is not None:
            return self.shards.sizes()
        return {kind: len(gs[0]) if gs is not None else None for kind, gs in _kinds(self._generation)}

    def galleries(self, kind: str) -> tuple | None:
        """The current ``kind`` galleries, one per member (None: no such gallery)."""
        return self._generation.of(kind)

    def generation(self, kind: str) -> int | None:
        return self._generation.numbers.get(kind)

    def labels(self, direction: str, ids: np.ndarray) -> list[list[str | None]]:
        """The hits' image names (text -> image) or caption texts (image -> text) for ``ids`` (n, k); None for -1
        and for images without names."""
        kind = DIRECTIONS.get(direction)
        if kind is None:
            raise SearchError(f"direction must be one of {tuple(DIRECTIONS)}, received {direction!r}")
        if self.shards is not None:
            return self.shards.labels(direction, ids)
        galleries = self._generation.of(kind)
        labels = None if galleries is None else (galleries[0].names if kind == "images" else galleries[0].texts)
        return [[labels[i] if labels is not None and i >= 0 else None for i in row] for row in np.asarray(ids).tolist()]

    def add_images(
        self,
        regions: np.ndarray,
        names: Sequence[str] | None = None,
        boxes: np.ndarray | None = None,
        key: str | None = None,
    ) -> int:
        """Append images (with their region ``boxes`` when the gallery keeps boxes) to every member's gallery,
        committed together, and search them from now on; returns the gallery's new size, read under the writer
        lock (this write's ids are the last ``len(regions)``). ``key``: an idempotency key; a key a committed
        generation records raises ``Repeated`` (with the first answer) and writes nothing. Sharded: to the last
        shard."""
        regions = check_regions(regions, self.engines[0].config.img_dim, "regions")
        if self.shards is not None:
            return self.shards.add_images(regions, names, boxes)
        with self._write:
            self.refresh()
            old = self._generation.images
            check_names(None if old is None else old[0].names is not None, names)
            return self._append("images", regions, names, boxes, key)

    def add_captions(self, texts: Sequence[str], key: str | None = None) -> int:
        """As ``add_images``, for captions (every member must take every caption before any is written)."""
        texts = list(texts)
        if not texts:
            raise GalleryError("captions: expected at least one caption, received none")
        for e in self.engines:
            e.tokenizer.encode_batch(texts)
        if self.shards is not None:
            return self.shards.add_captions(texts)
        with self._write:
            self.refresh()
            return self._append("captions", texts, None, key=key)

    def _append(
        self,
        kind: str,
        items: Any,
        names: Sequence[str] | None,
        boxes: np.ndarray | None = None,
        key: str | None = None,
    ) -> int:
        if self.folder is None:
            raise GalleryError("appends need a searcher opened on a gallery folder (Searcher.open)")
        old = self._generation.of(kind)
        options = WriteOptions(
            dtype=old[0].dtype.name if old is not None else "float32",
            append=True,
            progress=False,
            index="auto" if self.options.candidates else None,  # the index follows the append, not the next search
            key=key,
        )
        try:
            if kind == "images":
                written = _generation(self.folder.write_images(items, names, options, boxes=boxes))
            else:
                written = _generation(self.folder.write_captions(items, options))
        except Repeated:
            self.refresh()
            raise
        return len(self._swap_in(written, (kind,)).of(kind)[0])

    def refresh(self) -> bool:
        """Swap in the generations other writers (another server, the CLI) committed since this searcher loaded
        its own: a read of each manifest (``gallery.json``, ``ensemble.json``), and a load when one changed.
        True when something was swapped in. A sharded searcher's shards hold their own."""
        if self.folder is None or self.shards is not None:
            return False
        numbers = self._generation.numbers
        changed = [
            kind
            for kind in DIRECTIONS.values()
            if (n := self.folder.generation(kind)) is not None and n != numbers.get(kind)
        ]
        if not changed:
            return False
        self._swap_in(_generation(self.folder.load(kinds=changed)), changed)
        return True

    def _swap_in(self, loaded: Generation, kinds: Sequence[str]) -> Generation:
        """The current generation with ``loaded``'s ``kinds`` where they are newer; searches that started
        before keep the generation they took."""
        with self._swap:
            current = self._generation
            new = Generation(current.images, current.captions)
            new.numbers = dict(current.numbers)
            for kind in kinds:
                number, have = loaded.numbers.get(kind), current.numbers.get(kind)
                if number is not None and (have is None or number > have):
                    setattr(new, kind, loaded.of(kind))
                    new.numbers[kind] = number
            with current._lock:  # the unchanged kind keeps its uploads and indexes
                same = {kind for kind in DIRECTIONS.values() if new.numbers.get(kind) == current.numbers.get(kind)}
                new._made = {key: v for key, v in current._made.items() if key[1] in same}
            if new.numbers != current.numbers:
                logger.info("%s: serving generation %s", self.folder.path if self.folder else "gallery", new.numbers)
                self._generation = new
            return self._generation


def _kinds(g: Generation | Galleries) -> tuple[tuple[str, Any], tuple[str, Any]]:
    return (("images", g.images), ("captions", g.captions))


def _generation(galleries: Galleries) -> Generation:
    """What a search sees of a gallery folder's caches; their generation is the members file's (members layout)
    or each cache's own (one model)."""
    g = Generation(galleries.images, galleries.captions)
    g.numbers = {
        kind: galleries.generation if galleries.generation is not None else gs[0].manifest.get("generation")
        for kind, gs in _kinds(galleries)
        if gs is not None
    }
    return g


def _head_query(engine: ScanModel, query: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The head's inputs of an encoded query (an image query's Gram matrices only where the head takes them)."""
    if "image_gram" in query and not engine.needs_image_gram:
        return {"images": query["images"]}
    return query
