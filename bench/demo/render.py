"""Pictures for the demo world: each synthetic image drawn as a small PNG, with its region boxes.

The demo's images are region features, not pictures (``bench/demo/data.py``). Replaying the generator
with the dataset's stamp gives what each region was made of (an object of some type, colour and size,
the scene, clutter, or padding), and this module draws that: the scene as the background, each object
as a coloured shape with its name, clutter as faint patches, and writes every region's box
(x1, y1, x2, y2 in pixels, as bottom-up-attention features come), so an explanation's attended regions
can be outlined on the picture.

* object region: the object's shape (large objects about twice the side of small ones);
* scene region: a patch of the background; clutter region: a faint patch anywhere;
* padding region (all-zero features): the empty box (0, 0, 0, 0): it shows nothing anywhere.

Boxes and pictures are deterministic in (dataset, size). numpy only: shapes are pixel masks, names a
3x5 bitmap font, and the PNG writer is zlib (no imaging library needed).

    names, boxes = render_split("demo", "test", "demo/pictures")   # test_image_0000.png ..., boxes.npy
"""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np

from bench.demo.data import (
    COLOURS,
    N_REGIONS,
    NOISE_REGION,
    OBJECTS,
    SCENE_REGION,
    SCENES,
    SIZES,
    DemoDataError,
    SceneLayout,
    _make_split,
    data_dir,
    read_stamp,
    streams,
)
from runtime.atomic import atomic_path

logger = logging.getLogger(__name__)

DEFAULT_SIZE = 160
BOXES_NAME = "boxes.npy"

COLOUR_RGB = {
    "red": (215, 40, 40),
    "blue": (40, 80, 215),
    "green": (40, 160, 60),
    "yellow": (240, 205, 40),
    "black": (25, 25, 25),
    "white": (248, 248, 248),
    "brown": (125, 78, 40),
    "orange": (245, 135, 25),
}
SCENE_RGB = {
    "grass": (112, 170, 90),
    "road": (120, 120, 126),
    "water": (90, 140, 205),
    "beach": (228, 208, 160),
    "snow": (226, 232, 242),
    "street": (160, 150, 142),
}
# Object side as a fraction of the picture's side, by SIZES index (small, large).
_SIDE = (0.22, 0.40)

# 3x5 capitals, one string of 15 pixels per letter (row by row).
_GLYPHS = {
    c: g.replace(" ", "")
    for c, g in {
        "A": ".#. #.# ### #.# #.#",
        "B": "##. #.# ##. #.# ##.",
        "C": ".## #.. #.. #.. .##",
        "D": "##. #.# #.# #.# ##.",
        "E": "### #.. ##. #.. ###",
        "F": "### #.. ##. #.. #..",
        "G": ".## #.. #.# #.# .##",
        "H": "#.# #.# ### #.# #.#",
        "I": "### .#. .#. .#. ###",
        "J": "..# ..# ..# #.# .#.",
        "K": "#.# #.# ##. #.# #.#",
        "L": "#.. #.. #.. #.. ###",
        "M": "#.# ### ### #.# #.#",
        "N": "##. #.# #.# #.# #.#",
        "O": ".#. #.# #.# #.# .#.",
        "P": "##. #.# ##. #.. #..",
        "Q": ".#. #.# #.# ##. .##",
        "R": "##. #.# ##. #.# #.#",
        "S": ".## #.. .#. ..# ##.",
        "T": "### .#. .#. .#. .#.",
        "U": "#.# #.# #.# #.# ###",
        "V": "#.# #.# #.# #.# .#.",
        "W": "#.# #.# ### ### #.#",
        "X": "#.# #.# .#. #.# #.#",
        "Y": "#.# #.# .#. .#. .#.",
        "Z": "### ..# .#. #.. ###",
    }.items()
}


# ----------------------------------------------------------------------------- PNG


def png_bytes(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of ``rgb`` (H, W, 3) uint8."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or 0 in rgb.shape:
        raise ValueError(f"png: expected a non-empty (H, W, 3) uint8 array, received {rgb.dtype} {rgb.shape}")
    h, w, _ = rgb.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1)  # filter 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, truecolour, deflate, no filter, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
        + chunk(b"IEND", b"")
    )


# ----------------------------------------------------------------------------- layouts and boxes


def split_layouts(out_dir: str | Path, split: str) -> list[SceneLayout]:
    """Every image of a written dataset's ``split``, as the generator made it (replayed from the stamp).

    The replayed features are compared with the split's file, so a picture never describes other features.
    """
    stamp = read_stamp(out_dir)
    if stamp is None:
        raise DemoDataError(f"no dataset stamp under {data_dir(out_dir)}: write the dataset first (make_dataset)")
    params = stamp["params"]
    if split not in params["n_images"]:
        raise DemoDataError(f"unknown split {split!r}; expected one of {', '.join(params['n_images'])}")
    world, rngs = streams(params["seed"], params["img_dim"])
    layouts: list[SceneLayout] = []
    ims, _ = _make_split(rngs[split], world, params["n_images"][split], layouts)
    saved = np.load(data_dir(out_dir) / f"{split}_ims.npy", mmap_mode="r")
    if saved.shape != ims.shape or not np.array_equal(saved, ims):
        raise DemoDataError(f"{split}_ims.npy under {data_dir(out_dir)} is not what its stamp generates")
    return layouts


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over the smaller box's area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    return w * h / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def _box(rng: np.random.Generator, size: int, side: float, aspect: float) -> np.ndarray:
    w = max(4, round(side * size * aspect))
    h = max(4, round(side * size / aspect))
    w, h = min(w, size), min(h, size)
    x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
    return np.array([x, y, x + w, y + h], np.float32)


def layout_boxes(layout: SceneLayout, size: int = DEFAULT_SIZE, seed: int = 0) -> np.ndarray:
    """(R, 4) boxes x1 y1 x2 y2 in pixels of a ``size`` x ``size`` picture: objects placed apart where
    they fit, scene and clutter patches anywhere, padding regions (0, 0, 0, 0)."""
    rng = np.random.default_rng(seed)
    objects: list[np.ndarray] = []
    for _, _, s in layout.objects:
        best = None
        for _ in range(40):  # the first placement that overlaps no placed object by more than 10%
            box = _box(rng, size, _SIDE[s] * rng.uniform(0.9, 1.1), rng.uniform(0.8, 1.25))
            worst = max((_overlap(box, o) for o in objects), default=0.0)
            if best is None or worst < best[0]:
                best = (worst, box)
            if worst <= 0.1:
                break
        objects.append(best[1])
    boxes = np.zeros((len(layout.sources), 4), np.float32)
    for j, source in enumerate(layout.sources):
        if source >= 0:
            boxes[j] = objects[source]
        elif source == SCENE_REGION:
            boxes[j] = _box(rng, size, rng.uniform(0.3, 0.6), rng.uniform(0.7, 1.4))
        elif source == NOISE_REGION:
            boxes[j] = _box(rng, size, rng.uniform(0.1, 0.3), rng.uniform(0.6, 1.6))
        # ZERO_REGION: stays (0, 0, 0, 0)
    return boxes


# ----------------------------------------------------------------------------- drawing


def _text(img: np.ndarray, x: int, y: int, text: str, scale: int, rgb: tuple[int, int, int]) -> None:
    for i, c in enumerate(text.upper()):
        glyph = _GLYPHS.get(c)
        if glyph is None:
            continue
        bits = np.array([p == "#" for p in glyph]).reshape(5, 3)
        big = np.kron(bits, np.ones((scale, scale), bool))
        gx = x + i * 4 * scale
        region = img[y : y + 5 * scale, gx : gx + 3 * scale]
        region[big[: region.shape[0], : region.shape[1]]] = rgb


def _shape_mask(kind: int, w: int, h: int) -> np.ndarray:
    """An object's silhouette in its w x h box: ellipse, rounded block, triangle or diamond by object type."""
    yy, xx = np.mgrid[0:h, 0:w]
    u, v = (xx + 0.5) / w * 2 - 1, (yy + 0.5) / h * 2 - 1  # [-1, 1] across the box
    if kind == 0:
        return u * u + v * v <= 1
    if kind == 1:
        return (np.maximum(np.abs(u) - 0.7, 0) ** 2 + np.maximum(np.abs(v) - 0.7, 0) ** 2) <= 0.09
    if kind == 2:
        return np.abs(u) <= (v + 1) / 2
    return np.abs(u) + np.abs(v) <= 1


def draw_scene(layout: SceneLayout, boxes: np.ndarray, size: int = DEFAULT_SIZE, seed: int = 0) -> np.ndarray:
    """The picture (size, size, 3) uint8 of one layout with its ``layout_boxes`` (``seed``: the grain)."""
    rng = np.random.default_rng(seed)
    base = np.array(SCENE_RGB[SCENES[layout.scene]], np.float32)
    img = base + rng.normal(0, 6, (size, size, 1)).astype(np.float32)  # a little grain
    for j, source in enumerate(layout.sources):
        if source == NOISE_REGION:  # clutter: a faint tinted patch
            x1, y1, x2, y2 = (int(v) for v in boxes[j])
            img[y1:y2, x1:x2] = 0.85 * img[y1:y2, x1:x2] + 0.15 * rng.uniform(0, 255, 3).astype(np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)
    drawn = set()
    for j, source in enumerate(layout.sources):
        if source < 0 or source in drawn:
            continue
        drawn.add(source)
        obj, colour, _ = layout.objects[source]
        x1, y1, x2, y2 = (int(v) for v in boxes[j])
        mask = _shape_mask(obj % 4, x2 - x1, y2 - y1)
        rgb = np.array(COLOUR_RGB[COLOURS[colour]], np.uint8)
        m = np.pad(mask, 1)
        edge = mask & ~(m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:])  # pixels with an outside neighbour
        patch = img[y1:y2, x1:x2]
        patch[mask] = rgb
        patch[edge] = (40, 40, 40) if COLOURS[colour] != "black" else (200, 200, 200)
        name = OBJECTS[obj]
        scale = 2 if len(name) * 8 - 2 <= x2 - x1 - 4 else 1
        tw, th = len(name) * 4 * scale - scale, 5 * scale
        tx, ty = x1 + max(0, (x2 - x1 - tw) // 2), y1 + max(0, (y2 - y1 - th) // 2)
        img[max(ty - 1, 0) : ty + th + 1, max(tx - 1, 0) : tx + tw + 1] = (255, 255, 255)  # a plate under the name
        _text(img, tx, ty, name, scale, (0, 0, 0))
    return img


def describe(layout: SceneLayout) -> str:
    """A plain description of what the picture shows (for alt text)."""
    things = [f"a {SIZES[s]} {COLOURS[c]} {OBJECTS[o]}" for o, c, s in layout.objects]
    return ", ".join(things) + f" on {SCENES[layout.scene]}"


# ----------------------------------------------------------------------------- a split


def render_split(
    out_dir: str | Path,
    split: str,
    folder: str | Path,
    size: int = DEFAULT_SIZE,
    prefix: str | None = None,
) -> tuple[list[str], np.ndarray]:
    """Draw every image of a written dataset's ``split`` into ``folder``: ``<prefix><i:04d>.png`` (the prefix
    defaults to ``<split>_image_``, the demo's gallery names) and ``boxes.npy`` (N, R, 4) float32, x1 y1 x2 y2
    in pixels. Returns the names (file names without ``.png``) and the boxes. Files are written atomically.
    """
    if isinstance(size, bool) or not isinstance(size, int) or not 32 <= size <= 4096:
        raise DemoDataError(f"size must be an integer in [32, 4096] pixels, got {size!r}")
    prefix = f"{split}_image_" if prefix is None else prefix
    layouts = split_layouts(out_dir, split)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names, boxes = [], np.zeros((len(layouts), N_REGIONS, 4), np.float32)
    for i, layout in enumerate(layouts):
        boxes[i] = layout_boxes(layout, size, seed=i)
        name = f"{prefix}{i:04d}"
        with atomic_path(folder / f"{name}.png") as tmp:
            tmp.write_bytes(png_bytes(draw_scene(layout, boxes[i], size, seed=i)))
        names.append(name)
    with atomic_path(folder / BOXES_NAME) as tmp, open(tmp, "wb") as f:
        np.save(f, boxes, allow_pickle=False)
    logger.info("drew %d %s pictures (%d px) and their boxes in %s", len(names), split, size, folder)
    return names, boxes
