"""Seeded synthetic benchmark data: the sizes, caption texts, vocabularies, galleries of random unit-norm
embeddings, and the demo world's scenes.

Large galleries are not encoded (far too slow on a CPU): their arrays are random unit-norm embeddings,
and the galleries are made by the gallery module (``ImageGallery.from_arrays`` /
``CaptionGallery.from_arrays``) in the layout it stores. Where a benchmark needs data a trained model
can match (two-stage overlap), ``SceneFeatures`` draws images and captions from the demo's world
(bench/demo/data.py), cached.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import optional_torch
from runtime import atomic
from runtime.gallery import CaptionGallery, ImageGallery

SCENE_CACHE = Path("~/.cache/scan-runtime/scale").expanduser()
CHUNK = 8192
FEATURES_VERSION = 2  # 2: SceneStream (vectorised)
# The paper's Flickr30K settings (Lee et al. 2018, section 4.2): t-i LSE and i-t AVG.
MODES: dict[str, dict[str, Any]] = {
    "t2i": dict(cross_attn="t2i", agg_func="LogSumExp", lambda_softmax=9.0, lambda_lse=6.0),
    "i2t": dict(cross_attn="i2t", agg_func="Mean", lambda_softmax=4.0, lambda_lse=6.0),
}


@dataclass(frozen=True)
class Sizes:
    """Sizes, repeats and budgets of one benchmark run (full or quick): the synthetic models' and data's
    dimensions, and the latency run's repeats and budgets."""

    embed_size: int
    img_dim: int
    regions: int
    word_dim: int
    vocab_size: int
    # head throughput: N images x Q captions of head_len ids; the slow loop runs on a slice
    head_images: int
    head_captions: int
    head_len: int
    slow_images: int
    slow_captions: int
    head_warmup: int
    head_min_repeats: int
    head_max_repeats: int
    head_budget_s: float
    # query latency
    image_galleries: tuple[int, ...]
    caption_galleries: tuple[int, ...]
    batches: tuple[int, ...]
    k: int
    cell_warmup: int
    cell_min_repeats: int
    cell_max_repeats: int
    cell_budget_s: float
    cell_cap_s: float
    # gallery build
    build_images: int
    # the whole run; latency cells that would overrun it are skipped
    run_budget_s: float

    def head_timing(self) -> dict[str, float]:
        """``time_calls`` keyword arguments for the head contenders."""
        return dict(
            warmup=self.head_warmup,
            min_repeats=self.head_min_repeats,
            max_repeats=self.head_max_repeats,
            budget_s=self.head_budget_s,
        )


FULL = Sizes(
    embed_size=1024,
    img_dim=2048,
    regions=36,
    word_dim=300,
    vocab_size=10000,
    head_images=256,
    head_captions=32,
    head_len=14,
    slow_images=64,
    slow_captions=8,
    head_warmup=2,
    head_min_repeats=5,
    head_max_repeats=60,
    head_budget_s=3.0,
    image_galleries=(1000, 10000, 50000),
    caption_galleries=(5000, 50000),
    batches=(1, 8, 32, 128),
    k=10,
    cell_warmup=1,
    cell_min_repeats=3,
    cell_max_repeats=200,
    cell_budget_s=5.0,
    cell_cap_s=10.0,
    build_images=512,
    run_budget_s=570.0,
)
# The same run scaled down to seconds (CI, --quick): only what differs from FULL.
QUICK = replace(
    FULL,
    embed_size=64,
    img_dim=128,
    word_dim=32,
    vocab_size=200,
    head_images=32,
    head_captions=8,
    slow_images=8,
    slow_captions=4,
    head_warmup=1,
    head_min_repeats=3,
    head_max_repeats=5,
    head_budget_s=0.05,
    image_galleries=(100, 200),
    caption_galleries=(100, 200),
    batches=(1, 8),
    k=5,
    cell_max_repeats=10,
    cell_budget_s=0.05,
    cell_cap_s=5.0,
    build_images=32,
    run_budget_s=120.0,
)


def rng_for(seed: int, *stream: int) -> np.random.Generator:
    """Independent, reproducible streams per phase, so adding a phase does not change another's data."""
    return np.random.default_rng([seed, *stream])


def caption_words(rng: np.random.Generator, n: int) -> np.ndarray:
    """Words per caption, Flickr30K-like: ~12 words, clipped to 3..40 (ids add <start>/<end>)."""
    return np.clip(np.rint(rng.normal(12.0, 4.0, n)), 3, 40).astype(np.int64)


def vocab_json(size: int) -> dict[str, Any]:
    """A vocabulary of ``size`` words in the original layout: the four specials, then ``w0``, ``w1``, ..."""
    words = ["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(size - 4)]
    return {
        "word2idx": {w: i for i, w in enumerate(words)},
        "idx2word": {str(i): w for i, w in enumerate(words)},
        "idx": len(words),
    }


def caption_texts(rng: np.random.Generator, n: int, words: int | Sequence[str]) -> list[str]:
    """Captions of random in-vocabulary ``words`` with Flickr30K-like lengths; an int is the size of a
    ``vocab_json`` vocabulary (``w17 w4051 ...``)."""
    lengths = caption_words(rng, n)
    if isinstance(words, int):
        return [" ".join(f"w{i}" for i in rng.integers(0, words - 4, int(m))) for m in lengths]
    return [" ".join(words[i] for i in rng.integers(0, len(words), int(m))) for m in lengths]


def unit_rows(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.standard_normal(shape, dtype=np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x


class VectorPool:
    """Random unit-norm vectors drawn from a fixed pool of Gaussian directions.

    Drawing 1.8G fresh normals for a 50K-image gallery takes about a minute here; gathering rows of a
    64K-vector pool is a memory copy. Every gallery row is still its own memory (a copy, not a view),
    so the search reads the same bytes as it would from a real cache; only the values repeat.
    """

    SIZE = 65536

    def __init__(self, seed: int, dim: int) -> None:
        self.vectors = unit_rows(rng_for(seed, 9), (self.SIZE, dim))

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...], out: np.ndarray | None = None) -> np.ndarray:
        idx = rng.integers(0, self.SIZE, shape)
        return np.take(self.vectors, idx, axis=0, out=out, mode="clip")


def gram_into(x: np.ndarray, out: np.ndarray) -> None:
    """Per-image Gram matrices (B, R, d) -> (B, R, R) into ``out``.

    numpy's stacked matmul with a transposed operand falls off BLAS (about 100x slower than a loop);
    PyTorch's bmm is the fast path when it is installed, einsum the fallback.
    """
    torch = optional_torch()
    if torch is not None:
        t = torch.from_numpy(x)
        torch.bmm(t, t.transpose(1, 2), out=torch.from_numpy(out))
    else:
        np.einsum("nrd,nsd->nrs", x, x, out=out, optimize=True)


class ImageStore:
    """Random unit-norm region embeddings and their Grams, grown on demand; galleries are prefix views.

    Rows are drawn in fixed chunks with per-chunk seeds, so row i is the same whatever the final size.
    """

    CHUNK = 1024

    def __init__(self, seed: int, regions: int, dim: int) -> None:
        self.seed, self.regions, self.dim = seed, regions, dim
        self.pool: VectorPool | None = None
        self.images = np.zeros((0, regions, dim), np.float32)
        self.gram = np.zeros((0, regions, regions), np.float32)

    def bytes_for(self, n: int) -> int:
        return n * self.regions * (self.dim + self.regions) * 4

    def ensure(self, n: int) -> None:
        have = len(self.images)
        if n <= have:
            return
        if self.pool is None:
            self.pool = VectorPool(self.seed, self.dim)
        images = np.empty((n, self.regions, self.dim), np.float32)
        gram = np.empty((n, self.regions, self.regions), np.float32)
        images[:have], gram[:have] = self.images, self.gram
        self.images, self.gram = images, gram  # the old arrays are freed here, before the new rows are drawn
        for c in range(have // self.CHUNK, math.ceil(n / self.CHUNK)):
            a, b = max(c * self.CHUNK, have), min((c + 1) * self.CHUNK, n)
            rng = rng_for(self.seed, 10, c)
            idx = rng.integers(0, VectorPool.SIZE, (self.CHUNK, self.regions))[a - c * self.CHUNK : b - c * self.CHUNK]
            np.take(self.pool.vectors, idx, axis=0, out=images[a:b])
            gram_into(images[a:b], gram[a:b])

    def gallery(self, n: int) -> ImageGallery:
        """The first ``n`` images as an in-memory gallery (views, no copy)."""
        self.ensure(n)
        return ImageGallery.from_arrays(self.images[:n], self.gram[:n], folder="<synthetic>")


def synthetic_caption_gallery(
    rng: np.random.Generator, n: int, dim: int, pool: VectorPool | None = None
) -> CaptionGallery:
    """``n`` captions of Flickr30K-like lengths with random unit-norm word embeddings, in the stored layout."""
    lengths = caption_words(rng, n) + 2  # ids per caption, <start>/<end> included, as the encoder sees them
    order = np.argsort(lengths, kind="stable")  # the stored order: by length
    sorted_lengths = lengths[order]
    total = int(sorted_lengths.sum())
    words = pool.draw(rng, (total,)) if pool is not None else unit_rows(rng, (total, dim))
    texts = [f"synthetic caption {i}" for i in range(n)]
    return CaptionGallery.from_arrays(words, sorted_lengths, texts, ids=order, folder="<synthetic>")


class SceneStream:
    """The demo world's images (bench/demo/data.py), drawn vectorised in seeded chunks: raw region features
    chunk by chunk, never the whole gallery's, and captions of any image.

    Chunk ``c`` (``chunk`` images) is drawn from its own seed, so image ``i`` is the same whatever the total.
    Each image is drawn as ``_make_split`` draws one (same world, same distributions; not the same random
    draws): 2-4 distinct objects of random colour and size, a scene, 2-5 scene regions, 0-4 zero regions, the
    rest background, in random order. The noise of a region is ``(P[a] + P[b]) / sqrt(2)`` for two random
    rows of a fixed pool ``P`` of standard normal vectors: exactly standard normal per region (so every
    region is distinct), at the cost of two row gathers instead of ``img_dim`` fresh normals (fresh ones ran
    at about 100M normals/s here, a third of what 10K images/s needs).

    ``layout(c)`` gives what chunk ``c``'s images show (object, colour, size per object slot; scene), and
    ``captions`` describes images with the demo's own caption writer, so demo captions match some images.
    """

    POOL = 1 << 16

    def __init__(self, img_dim: int, seed: int = 0, chunk: int = CHUNK) -> None:
        from bench.demo.data import (
            _NOISE,
            _W_COLOUR,
            _W_OBJECT,
            _W_SIZE,
            COLOURS,
            N_REGIONS,
            OBJECTS,
            SCENES,
            SIZES,
            World,
        )

        self.img_dim, self.seed, self.chunk, self.regions = img_dim, seed, chunk, N_REGIONS
        world_ss = np.random.SeedSequence(seed).spawn(4)[0]  # the demo dataset's world (make_dataset)
        world = World(np.random.default_rng(world_ss), img_dim)
        n_obj, n_col, n_siz = len(OBJECTS), len(COLOURS), len(SIZES)
        o, c, s = np.meshgrid(np.arange(n_obj), np.arange(n_col), np.arange(n_siz), indexing="ij")
        combos = (
            _W_OBJECT * world.objects[o.ravel()]
            + _W_COLOUR * world.colours[c.ravel()]
            + _W_SIZE * world.sizes[s.ravel()]
        )
        # Region codes: object combos (object, colour, size), then scenes, then background, then zero.
        self.scene_code = len(combos)
        self.noise_code = self.scene_code + len(SCENES)
        self.zero_code = self.noise_code + 1
        zeros = np.zeros((2, img_dim))
        self.base = np.concatenate([combos, world.scenes, zeros]).astype(np.float32)
        noise = _NOISE / math.sqrt(img_dim)  # _noise's scale: a noise vector of norm about _NOISE
        self.scale = np.concatenate(
            [np.full(len(combos), noise), np.full(len(SCENES), 1.5 * noise), [1.0, 0.0]]
        ).astype(np.float32)
        self.pool = rng_for(seed, 11).standard_normal((self.POOL, img_dim), dtype=np.float32) / np.float32(math.sqrt(2))
        self.n_kinds = (n_obj, n_col, n_siz, len(SCENES))
        self._tmp: np.ndarray | None = None  # the features' scratch buffer, reused chunk to chunk

    def layout(self, c: int) -> dict[str, np.ndarray]:
        """What the images of chunk ``c`` show: ``objects`` (B, 4, 3) object/colour/size (rows past
        ``n_objects`` unused), ``n_objects`` (B,), ``scene`` (B,), ``codes`` (B, 36) region codes in region
        order, ``noise`` (B, 36, 2) pool rows. All drawn from the chunk's seed, in a fixed order."""
        b, r = self.chunk, self.regions
        n_obj, n_col, n_siz, n_scn = self.n_kinds
        rng = rng_for(self.seed, 12, c)
        n_objects = rng.integers(2, 5, b)
        types = np.argsort(rng.random((b, n_obj)), axis=1)[:, :4]  # distinct object types
        colours = rng.integers(0, n_col, (b, 4))
        sizes = rng.integers(0, n_siz, (b, 4))
        scene = rng.integers(0, n_scn, b)
        n_scene = rng.integers(2, 6, b)
        n_zero = rng.integers(0, 5, b)
        order = np.argsort(rng.random((b, r)), axis=1)  # region j shows slot order[j]
        noise = rng.integers(0, self.POOL, (b, r, 2))
        slot = np.arange(r)[None, :]
        obj_code = (types * n_col + colours) * n_siz + sizes  # (B, 4)
        codes = np.where(
            slot < n_objects[:, None],
            np.take_along_axis(obj_code, np.minimum(slot, 3).repeat(b, 0), axis=1),
            np.where(
                slot < (n_objects + n_scene)[:, None],
                self.scene_code + scene[:, None],
                np.where(slot < r - n_zero[:, None], self.noise_code, self.zero_code),
            ),
        )
        return {
            "objects": np.stack([types, colours, sizes], axis=-1),
            "n_objects": n_objects,
            "scene": scene,
            "codes": np.take_along_axis(codes, order, axis=1),
            "noise": noise,
        }

    def features(self, c: int, out: np.ndarray | None = None) -> np.ndarray:
        """Chunk ``c``'s raw region features (chunk, 36, img_dim) float32 (into ``out`` when given: reusing
        one buffer saves the page faults of a fresh 300 MB array per chunk, which cost as much as the rest)."""
        lay = self.layout(c)
        shape = (self.chunk, self.regions, self.img_dim)
        if out is None:
            out = np.empty(shape, np.float32)
        if self._tmp is None or self._tmp.shape != shape:
            self._tmp = np.empty(shape, np.float32)
        tmp = self._tmp
        np.take(self.pool, lay["noise"][..., 0], axis=0, out=out, mode="clip")
        np.take(self.pool, lay["noise"][..., 1], axis=0, out=tmp, mode="clip")
        out += tmp
        out *= self.scale[lay["codes"]][..., None]
        np.take(self.base, lay["codes"], axis=0, out=tmp, mode="clip")
        out += tmp
        norm = np.sqrt(np.einsum("brd,brd->br", out, out))
        out /= np.maximum(norm, np.float32(1e-12))[..., None]  # zero regions stay zero
        return out

    def chunks(self, n: int) -> Iterator[np.ndarray]:
        """The raw features of images ``0..n-1``, chunk by chunk (the last one cut at ``n``); each array is
        overwritten by the next (copy what you keep)."""
        buf = np.empty((self.chunk, self.regions, self.img_dim), np.float32)
        for c in range(-(-n // self.chunk)):
            yield self.features(c, buf)[: min(self.chunk, n - c * self.chunk)]

    def captions(self, n: int, per_image: int = 5) -> list[str]:
        """``per_image`` captions of each of images ``0..n-1`` (image ``i`` owns ``i*per_image ...``), written
        by the demo's caption writer from what each image shows (seeded per chunk)."""
        from bench.demo.data import _caption

        out: list[str] = []
        for c in range(-(-n // self.chunk)):
            lay = self.layout(c)
            rng = rng_for(self.seed, 13, c)
            for i in range(min(self.chunk, n - c * self.chunk)):
                objects = [tuple(int(v) for v in lay["objects"][i, j]) for j in range(int(lay["n_objects"][i]))]
                out.extend(_caption(rng, objects, int(lay["scene"][i])) for _ in range(per_image))
        return out


class SceneFeatures:
    """``SceneStream``'s first images cached as float16 (N, 36, img_dim), with the captions of the first chunk,
    for benchmarks that want an array (a gallery of N images encodes ``features[:N]``).

    The stream's chunk ``c`` is drawn from its own seed, so the first N images are the same whatever the total.
    """

    def __init__(self, img_dim: int, cache: Path = SCENE_CACHE, seed: int = 0, chunk: int = CHUNK) -> None:
        self.folder = cache / f"features-seed{seed}-dim{img_dim}-chunk{chunk}-v{FEATURES_VERSION}"
        self.stream = SceneStream(img_dim, seed, chunk)
        self.img_dim, self.seed, self.chunk = img_dim, seed, chunk

    def _stamp(self) -> dict[str, Any]:
        try:
            return json.loads((self.folder / "stamp.json").read_text())
        except (OSError, ValueError):
            return {}

    def ensure(self, n: int, progress: bool = True) -> tuple[np.ndarray, list[str]]:
        """(features (>= n, 36, img_dim) float16 memory map, the 5 captions of each image of the first chunk)."""
        from tqdm import tqdm

        stamp = self._stamp()
        have = int(stamp.get("count", 0))
        step = self.chunk
        n = -(-n // step) * step
        if have < n:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".features.{n}.npy.tmp"
            try:
                out = np.lib.format.open_memmap(
                    tmp, mode="w+", dtype=np.float16, shape=(n, self.stream.regions, self.img_dim)
                )
                with tqdm(total=n, initial=have, desc="generating scenes", unit="img", disable=not progress) as bar:
                    if have:
                        old = np.load(self.folder / stamp["file"], mmap_mode="r")
                        for a in range(0, have, step):
                            out[a : a + step] = old[a : a + step]
                    buf = np.empty((step, self.stream.regions, self.img_dim), np.float32)
                    for c in range(have // step, n // step):
                        out[c * step : (c + 1) * step] = self.stream.features(c, buf)
                        bar.update(step)
                out.flush()
                del out
            except BaseException:
                tmp.unlink(missing_ok=True)  # an interrupted run leaves the previous features as they were
                raise
            final = self.folder / f"features.{n}.npy"
            os.replace(tmp, final)
            captions = stamp.get("captions") or self.stream.captions(step)
            atomic.write_json(self.folder / "stamp.json", {"count": n, "file": final.name, "captions": captions})
            for p in self.folder.glob("features.*.npy"):
                if p.name != final.name:
                    p.unlink()
            stamp = self._stamp()
        return np.load(self.folder / stamp["file"], mmap_mode="r"), list(stamp["captions"])
