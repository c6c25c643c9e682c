"""Caption galleries (image -> text search): the ragged, length-sorted cache of encoded captions, its builder
from texts and its writer from encoded arrays."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

import runtime.gallery.store as store
from runtime.buckets import encode_by_length
from runtime.gallery.index import update_index
from runtime.gallery.store import GalleryError
from runtime.options import CAPTION_DTYPES, WriteOptions

logger = logging.getLogger(__name__)


@dataclass
class CaptionGallery(store.MappedGallery):
    ARRAYS: ClassVar[tuple[str, ...]] = ("words", "offsets", "lengths", "ids")

    folder: Path
    words: np.ndarray  # (W, d): words of all captions, captions sorted by length
    offsets: np.ndarray  # (M+1,)
    lengths: np.ndarray  # (M,)
    ids: np.ndarray  # (M,): caption id of each stored caption
    texts: list[str]  # by caption id
    manifest: dict[str, Any]

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

    @classmethod
    def load(cls, folder: str | Path, text_encoder_id: str | None = None, verify: bool | None = None) -> CaptionGallery:
        """Open the cache in ``folder`` memory-mapped; ``verify`` as in :meth:`ImageGallery.load`."""
        folder = Path(folder)

        def load() -> CaptionGallery:
            data = store.read_manifest(folder, "captions")
            if text_encoder_id is not None:
                store.check_binding(data, "text_encoder_id", text_encoder_id, folder)
            arrays = store.open_arrays(folder, data, ("words", "offsets", "lengths", "ids"), verify)
            if verify:
                store.check_finite(folder, data, {"words": arrays["words"]})
            texts = store.read_side_file(folder, data.get("texts_file"), "captions")
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

        return store.load_consistent(lambda: store.manifest_generation(folder), load, folder)

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
        if words.ndim != 2 or words.dtype.name not in CAPTION_DTYPES:
            raise GalleryError(
                f"words: expected a (W, d) array of a dtype in {CAPTION_DTYPES}, "
                f"received {words.dtype.name}{list(words.shape)}"
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
            "format": store.FORMAT,
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
    options: WriteOptions = WriteOptions(),
    batch: int = 256,
) -> CaptionGallery:
    """Encode ``captions`` into a ragged, length-sorted caption gallery (or append to one), atomically.

    ``options``: as for ``build_image_gallery``.

    The new captions are encoded before the writer lock is taken, so concurrent writers wait only for the copy.
    """
    folder = Path(folder)
    dtype = options.dtype
    if dtype not in CAPTION_DTYPES:
        raise GalleryError(
            f"{folder}: dtype {dtype!r} is for image caches; a caption gallery stores one of {CAPTION_DTYPES}"
        )
    if len(captions) == 0:
        raise GalleryError("captions: expected at least one caption, received none")
    ids, lengths = engine.tokenizer.encode_batch(list(captions))  # validates every caption first
    d = engine.config.embed_size
    # Encode length-sorted batches (little padding), then keep each caption's unpadded words.
    new_words: list[np.ndarray] = [np.zeros((0, d), np.float32)] * len(captions)
    with store.progress_bar(len(captions), "encoding captions", options.progress) as bar:
        for idx, emb in encode_by_length(engine, ids, lengths, batch):  # emb (B, width, d)
            for row, j in enumerate(idx):
                new_words[j] = emb[row, : lengths[j]]
            bar.update(len(idx))
    with store.writer_lock(folder, options.lock_timeout):
        old = store.previous(CaptionGallery, folder, engine.manifest.text_encoder_id, options)
        store.check_key(old.manifest if old else None, options.key)
        n_old = len(old) if old else 0
        all_lengths = np.concatenate([old.lengths if old else np.zeros(0, np.int64), lengths]).astype(np.int64)
        all_ids = np.concatenate(
            [old.ids if old else np.zeros(0, np.int64), np.arange(n_old, n_old + len(captions), dtype=np.int64)]
        )
        sort = np.argsort(all_lengths, kind="stable")
        total = int(all_lengths.sum())
        generation = store.current_generation(folder) + 1
        tmp = None
        try:
            tmp = store.temporary(folder, "words", generation)
            store.reserve(folder, np.dtype(dtype).itemsize * total * d + 24 * len(all_ids))
            words = store.open_rows(tmp, dtype, (total, d))
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
            entries = {"words": store.finish_array(folder, tmp, "words", generation, (total, d), dtype)}
        finally:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        sorted_lengths = all_lengths[sort]
        offsets = np.concatenate([[0], np.cumsum(sorted_lengths)]).astype(np.int64)
        entries.update(
            store.save_arrays(folder, generation, {"offsets": offsets, "lengths": sorted_lengths, "ids": all_ids[sort]})
        )
        texts = (list(old.texts) if old else []) + [str(c) for c in captions]
        texts_file = f"texts.{generation}.json"
        manifest = {
            "format": store.FORMAT,
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
            **store.with_key(old.manifest if old else None, options.key, n_old, len(captions)),
        }
        store.commit(folder, manifest, {texts_file: texts})
        old = None  # this writer's own map of the previous generation must not keep its files
        store.sweep(folder)
        logger.info("caption gallery %s: %d captions (%d new), %s", folder, len(texts), len(captions), dtype)
        gallery = CaptionGallery.load(folder)
        update_index(gallery, options.index, n_old, options.progress)
        return gallery


# Bound to the encoder of the gallery the arrays came from (shard split and merge): no engine runs.
_CAPTION_BINDING = ("text_encoder_id", "config", "model", "dtype", "embed_size")


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
    with store.writer_lock(folder):
        generation = store.require_new(folder)
        entries = {
            "words": store.save_rows(
                folder, generation, "words", (total, int(like["embed_size"])), like["dtype"], words
            )
        }
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        entries.update(store.save_arrays(folder, generation, {"offsets": offsets, "lengths": lengths, "ids": ids}))
        texts_file = f"texts.{generation}.json"
        manifest = {
            "format": store.FORMAT,
            "kind": "captions",
            "generation": generation,
            "count": m,
            **{key: like[key] for key in _CAPTION_BINDING},
            "arrays": entries,
            "texts_file": texts_file,
        }
        store.commit(folder, manifest, {texts_file: [str(t) for t in texts]})
    return CaptionGallery.load(folder)
