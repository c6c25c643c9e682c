"""A synthetic image-text dataset in the original SCAN precomp layout, for the end-to-end demo.

Real precomputed features (Flickr30K / COCO bottom-up regions) are gigabytes and cannot be shipped,
and pretrained SCAN checkpoints were never published, so the demo trains its own small model on data
made here. The data is built so that cross attention *matters*: a caption describes some of the
objects of its image, and each object lives in one region, so matching needs word-region alignment.

A fixed, seeded "world" gives every object type (dog, cat, car, ...), colour, size and scene
(grass, road, ...) a random prototype direction in ``img_dim`` space. An image has ``R = 36`` regions:

* 2-4 object regions, each ``normalize(object + colour + size + noise)``, distinct object types;
* a few scene regions, ``normalize(scene + noise)`` (the scene is sometimes named in a caption);
* a few all-zero regions (padding, as in some real feature files);
* the rest pure-noise background regions; all regions in random order.

Each image gets 5 captions from varied templates ("a red dog and a small boat",
"There is a blue car next to a large tree .", ...), each naming a random subset of the image's
objects in random order, with some or all of their attributes; some words are capitalised (the
tokeniser lower-cases, as the original).

Layout written under ``out_dir`` (what the original ``train.py`` reads with ``--data_path ./data/
--data_name demo_precomp --vocab_path ./vocab/``)::

    data/demo_precomp/{train,dev,test}_ims.npy   (N, 36, img_dim) float32
    data/demo_precomp/{train,dev,test}_caps.txt  5 lines per image; image i owns lines 5i..5i+4
    data/demo_precomp/demo_stamp.json            generation parameters and file hashes
    vocab/demo_precomp_vocab.json                {"word2idx", "idx2word", "idx"}; ids 0..3 specials

Generation is deterministic for a given seed and sizes; an existing dataset whose stamp matches the
request is reused, not rewritten.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.atomic import atomic_path, sha256_file, write_json
from runtime.tokenizer import tokenize
from runtime.vocab import SPECIAL_TOKENS

logger = logging.getLogger(__name__)

DATA_NAME = "demo_precomp"
SPLITS = ("train", "dev", "test")
N_REGIONS = 36
CAPTIONS_PER_IMAGE = 5
# Bumped whenever the generator changes, so stale datasets (and checkpoints trained on them) are
# not mistaken for current ones by the stamp comparison.
GENERATOR_VERSION = 1
STAMP_NAME = "demo_stamp.json"

OBJECTS = (
    "dog",
    "cat",
    "car",
    "bicycle",
    "tree",
    "man",
    "woman",
    "horse",
    "boat",
    "ball",
    "bird",
    "bus",
    "chair",
    "umbrella",
    "kite",
    "truck",
)
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "brown", "orange")
SIZES = ("small", "large")
SCENES = ("grass", "road", "water", "beach", "snow", "street")

# Relative weight of each component in an object region. The object type dominates; colour and size
# are weaker, so telling a red dog from a blue dog takes attention to the right region, not just
# "is there a dog somewhere".
_W_OBJECT, _W_COLOUR, _W_SIZE, _NOISE = 1.0, 0.8, 0.5, 0.6


class DemoDataError(ValueError):
    """Invalid parameters for the synthetic dataset."""


def data_dir(out_dir: str | Path) -> Path:
    """``out_dir/data/demo_precomp``: the folder holding the split files."""
    return Path(out_dir) / "data" / DATA_NAME


def vocab_file(out_dir: str | Path) -> Path:
    """``out_dir/vocab/demo_precomp_vocab.json``."""
    return Path(out_dir) / "vocab" / f"{DATA_NAME}_vocab.json"


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DemoDataError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class World:
    """The fixed prototype directions every split shares (train and test must describe one world)."""

    def __init__(self, rng: np.random.Generator, img_dim: int) -> None:
        def protos(n: int) -> np.ndarray:
            p = rng.standard_normal((n, img_dim)).astype(np.float64)
            return p / np.linalg.norm(p, axis=1, keepdims=True)

        self.img_dim = img_dim
        self.objects = protos(len(OBJECTS))
        self.colours = protos(len(COLOURS))
        self.sizes = protos(len(SIZES))
        self.scenes = protos(len(SCENES))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _noise(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    # Scaled so the noise vector's norm is about _NOISE whatever img_dim is.
    return rng.standard_normal((n, dim)) * (_NOISE / np.sqrt(dim))


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _describe(rng: np.random.Generator, obj: int, colour: int, size: int) -> str:
    """ "[size] [colour] object" with each attribute mentioned or not, plus its article."""
    words = []
    if rng.random() < 0.3:
        words.append(SIZES[size])
    if rng.random() < 0.75:
        words.append(COLOURS[colour])
    words.append(OBJECTS[obj])
    return _article(" ".join(words))


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return " , ".join(items[:-1]) + " and " + items[-1]


# Whole-caption templates; {L} is the list of described objects, {S} the scene.
# Short ones repeated: they are the most frequent, which keeps captions (and training) short.
_TEMPLATES = (
    "{L}",
    "{L}",
    "{L} .",
    "{L} .",
    "there is {L} .",
    "a photo of {L}",
    "{L} in the picture",
    "an image with {L} .",
    "this picture shows {L}",
)
_SCENE_SUFFIXES = (" on the {S}", " near the {S}", " by the {S}")


def _caption(rng: np.random.Generator, objects: list[tuple[int, int, int]], scene: int) -> str:
    n = len(objects)
    # Mostly two or three objects: with one, many gallery images share the description and the
    # retrieval target is ambiguous, as with vague real captions; more than three makes captions
    # long, and training cost grows with caption length.
    weights = np.array([1.0, 3.0, 2.0][:n])
    m = int(rng.choice(np.arange(1, len(weights) + 1), p=weights / weights.sum()))
    order = rng.permutation(n)[:m]
    phrases = [_describe(rng, *objects[i]) for i in order]
    if m >= 2 and rng.random() < 0.3:
        body = f"{phrases[0]} {rng.choice(['next to', 'near', 'beside'])} {_join(phrases[1:])}"
    else:
        body = _join(phrases)
    if rng.random() < 0.25:
        body += str(rng.choice(_SCENE_SUFFIXES)).format(S=SCENES[scene])
    template = str(rng.choice(_TEMPLATES))
    text = template.format(L=body)
    words = text.split(" ")
    # Mixed case exercises the lower-casing of the tokeniser, as real captions do.
    if rng.random() < 0.5:
        words[0] = words[0].capitalize()
    if rng.random() < 0.1:
        j = int(rng.integers(len(words)))
        words[j] = words[j].upper() if rng.random() < 0.3 else words[j].capitalize()
    return " ".join(words)


# What a region of a scene shows, besides an object (whose index in ``SceneLayout.objects`` is >= 0).
SCENE_REGION, NOISE_REGION, ZERO_REGION = -1, -2, -3


@dataclass(frozen=True)
class SceneLayout:
    """What an image's features were made of, for drawing it (``bench/demo/render.py``).

    ``objects``: (object, colour, size) indices into OBJECTS, COLOURS, SIZES; ``scene``: index into
    SCENES; ``sources[j]``: what region j shows, an index into ``objects`` or one of the *_REGION codes.
    """

    objects: tuple[tuple[int, int, int], ...]
    scene: int
    sources: tuple[int, ...]


def _make_split(
    rng: np.random.Generator, world: World, n_images: int, layouts: list[SceneLayout] | None = None
) -> tuple[np.ndarray, list[str]]:
    """A split's regions and captions; each image's SceneLayout appended to ``layouts`` when given (the
    same random draws either way, so the features do not depend on it)."""
    dim = world.img_dim
    ims = np.zeros((n_images, N_REGIONS, dim), dtype=np.float32)
    captions: list[str] = []
    for i in range(n_images):
        n_obj = int(rng.integers(2, 5))
        obj_types = rng.choice(len(OBJECTS), size=n_obj, replace=False)
        colours = rng.integers(len(COLOURS), size=n_obj)
        sizes = rng.integers(len(SIZES), size=n_obj)
        scene = int(rng.integers(len(SCENES)))
        n_scene = int(rng.integers(2, 6))
        n_zero = int(rng.integers(0, 5))
        n_noise = N_REGIONS - n_obj - n_scene - n_zero

        obj = (
            _W_OBJECT * world.objects[obj_types]
            + _W_COLOUR * world.colours[colours]
            + _W_SIZE * world.sizes[sizes]
            + _noise(rng, n_obj, dim)
        )
        scn = world.scenes[scene] + _noise(rng, n_scene, dim) * 1.5
        bg = rng.standard_normal((n_noise, dim))
        regions = np.concatenate([_unit(obj), _unit(scn), _unit(bg), np.zeros((n_zero, dim))])
        order = rng.permutation(N_REGIONS)
        ims[i] = regions[order]

        objects = [(int(o), int(c), int(s)) for o, c, s in zip(obj_types, colours, sizes)]
        if layouts is not None:
            kinds = [*range(n_obj), *[SCENE_REGION] * n_scene, *[NOISE_REGION] * n_noise, *[ZERO_REGION] * n_zero]
            layouts.append(SceneLayout(tuple(objects), scene, tuple(kinds[j] for j in order)))
        captions.extend(_caption(rng, objects, scene) for _ in range(CAPTIONS_PER_IMAGE))
    return ims, captions


def build_vocab(captions: list[str]) -> dict[str, Any]:
    """The original ``vocab.py`` layout from ``captions``: specials at 0..3, then every word, sorted.

    The original keeps words seen at least ``threshold`` times in the training captions; the demo keeps
    every training word (threshold 1). Sorted so the ids do not depend on caption order.
    """
    counts: Counter[str] = Counter()
    for c in captions:
        counts.update(tokenize(c))
    words = list(SPECIAL_TOKENS) + sorted(w for w in counts if w not in SPECIAL_TOKENS)
    return {
        "word2idx": {w: i for i, w in enumerate(words)},
        "idx2word": {str(i): w for i, w in enumerate(words)},
        "idx": len(words),
    }


def _params(seed: int, img_dim: int, sizes: dict[str, int]) -> dict[str, Any]:
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "img_dim": img_dim,
        "n_regions": N_REGIONS,
        "n_images": sizes,
    }


def _files(out_dir: Path) -> list[Path]:
    folder = data_dir(out_dir)
    return (
        [folder / f"{s}_ims.npy" for s in SPLITS] + [folder / f"{s}_caps.txt" for s in SPLITS] + [vocab_file(out_dir)]
    )


def read_stamp(out_dir: str | Path) -> dict[str, Any] | None:
    """The dataset's stamp (parameters and file hashes), or None when absent or unreadable."""
    path = data_dir(out_dir) / STAMP_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _stamp_matches(out_dir: Path, params: dict[str, Any]) -> bool:
    stamp = read_stamp(out_dir)
    if stamp is None or stamp.get("params") != params:
        return False
    hashes = stamp.get("sha256", {})
    for f in _files(out_dir):
        rel = str(f.relative_to(out_dir))
        if not f.is_file() or hashes.get(rel) != sha256_file(f):
            return False
    return True


def streams(seed: int, img_dim: int) -> tuple[World, dict[str, np.random.Generator]]:
    """The world and one generator per split. Independent streams, so that changing the size of one split
    leaves the world and the other splits' content unchanged."""
    world_ss, *split_ss = np.random.SeedSequence(seed).spawn(1 + len(SPLITS))
    return World(np.random.default_rng(world_ss), img_dim), {
        split: np.random.default_rng(ss) for split, ss in zip(SPLITS, split_ss)
    }


def make_dataset(
    out_dir: str | Path,
    seed: int = 0,
    img_dim: int = 256,
    n_train: int = 2000,
    n_dev: int = 200,
    n_test: int = 500,
    force: bool = False,
) -> Path:
    """Write the synthetic dataset under ``out_dir`` (layout in the module doc); return the data folder.

    Deterministic in (seed, img_dim, sizes). If a dataset with the same parameters and intact files is
    already there it is kept as is (unless ``force``). Every file is written atomically.
    """
    out_dir = Path(out_dir)
    seed = _check_int("seed", seed, 0)
    img_dim = _check_int("img_dim", img_dim, 1)
    sizes = {
        "train": _check_int("n_train", n_train, 1),
        "dev": _check_int("n_dev", n_dev, 1),
        "test": _check_int("n_test", n_test, 1),
    }
    params = _params(seed, img_dim, sizes)
    folder = data_dir(out_dir)
    if not force and _stamp_matches(out_dir, params):
        logger.info("dataset in %s is up to date (seed %d)", folder, seed)
        return folder

    world, split_rngs = streams(seed, img_dim)
    folder.mkdir(parents=True, exist_ok=True)
    # Drop the stamp first: a run interrupted half-way must not leave a stamp vouching for new files.
    (folder / STAMP_NAME).unlink(missing_ok=True)
    train_caps: list[str] = []
    for split in SPLITS:
        ims, caps = _make_split(split_rngs[split], world, sizes[split])
        with atomic_path(folder / f"{split}_ims.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, ims, allow_pickle=False)  # a file object: np.save would append .npy to a path
        with atomic_path(folder / f"{split}_caps.txt") as tmp:
            tmp.write_text("".join(c + "\n" for c in caps), encoding="utf-8")
        if split == "train":
            train_caps = caps
        logger.info("wrote %s split: %d images, %d captions", split, len(ims), len(caps))

    vocab = build_vocab(train_caps)
    vpath = vocab_file(out_dir)
    with atomic_path(vpath) as tmp:
        tmp.write_text(json.dumps(vocab), encoding="utf-8")
    hashes = {str(f.relative_to(out_dir)): sha256_file(f) for f in _files(out_dir)}
    write_json(folder / STAMP_NAME, {"params": params, "sha256": hashes})
    logger.info("dataset written to %s, vocabulary of %d words in %s", folder, vocab["idx"], vpath)
    return folder
