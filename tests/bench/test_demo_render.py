"""bench/demo/render.py: the demo world's pictures and region boxes agree with its features."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from bench.demo.data import COLOURS, N_REGIONS, DemoDataError, data_dir, make_dataset
from bench.demo.render import COLOUR_RGB, png_bytes, render_split, split_layouts


def read_png(blob: bytes) -> np.ndarray:
    """Decode the 8-bit RGB, filter-0 PNGs png_bytes writes (enough to check them without an imaging library)."""
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(blob):
        (n,) = struct.unpack(">I", blob[pos : pos + 4])
        tag, data = blob[pos + 4 : pos + 8], blob[pos + 8 : pos + 8 + n]
        assert struct.unpack(">I", blob[pos + 8 + n : pos + 12 + n])[0] == zlib.crc32(tag + data)
        chunks[tag] = chunks.get(tag, b"") + data
        pos += 12 + n
    w, h, depth, colour, *_ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, colour) == (8, 2) and b"IEND" in chunks
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + 3 * w)
    assert not rows[:, 0].any()
    return rows[:, 1:].reshape(h, w, 3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    make_dataset(out, seed=1, img_dim=24, n_train=2, n_dev=1, n_test=5)
    return out


def test_png_round_trips():
    rgb = np.random.default_rng(0).integers(0, 256, (7, 5, 3)).astype(np.uint8)
    np.testing.assert_array_equal(read_png(png_bytes(rgb)), rgb)
    pil = pytest.importorskip("PIL.Image")
    import io

    np.testing.assert_array_equal(np.asarray(pil.open(io.BytesIO(png_bytes(rgb))).convert("RGB")), rgb)
    with pytest.raises(ValueError, match="uint8"):
        png_bytes(rgb.astype(np.float32))


def test_pictures_and_boxes_match_the_features(dataset, tmp_path):
    names, boxes = render_split(dataset, "test", tmp_path, size=96)
    assert names == [f"test_image_{i:04d}" for i in range(5)]
    assert boxes.shape == (5, N_REGIONS, 4) and boxes.dtype == np.float32
    np.testing.assert_array_equal(np.load(tmp_path / "boxes.npy"), boxes)
    ims = np.load(data_dir(dataset) / "test_ims.npy")
    zero = ~ims.any(axis=2)  # padding regions: all-zero features, empty boxes
    np.testing.assert_array_equal(~boxes.any(axis=2), zero)
    live = boxes[~zero]
    assert (live[:, :2] >= 0).all() and (live[:, 2:] <= 96).all() and (live[:, 2:] > live[:, :2]).all()
    for i, layout in enumerate(split_layouts(dataset, "test")):
        picture = read_png((tmp_path / f"{names[i]}.png").read_bytes())
        assert picture.shape == (96, 96, 3)
        for j, source in enumerate(layout.sources):
            if source < 0:
                continue
            x1, y1, x2, y2 = (int(v) for v in boxes[i, j])
            colour = np.array(COLOUR_RGB[COLOURS[layout.objects[source][1]]], np.uint8)
            assert (picture[y1:y2, x1:x2] == colour).all(axis=2).any(), f"image {i} region {j}: no {colour}"
        # every object is in the picture once, in one box shared by its regions
        assert {s for s in layout.sources if s >= 0} == set(range(len(layout.objects)))
    _, boxes2 = render_split(dataset, "test", tmp_path / "again", size=96)
    np.testing.assert_array_equal(boxes2, boxes)
    assert (tmp_path / "again" / "test_image_0003.png").read_bytes() == (tmp_path / "test_image_0003.png").read_bytes()


def test_features_that_are_not_the_stamps_are_refused(dataset, tmp_path):
    with pytest.raises(DemoDataError, match="unknown split"):
        split_layouts(dataset, "val")
    with pytest.raises(DemoDataError, match="size"):
        render_split(dataset, "test", tmp_path, size=8)
    path = data_dir(dataset) / "dev_ims.npy"
    ims = np.load(path)
    np.save(path, ims[:, ::-1])
    with pytest.raises(DemoDataError, match="not what its stamp generates"):
        split_layouts(dataset, "dev")
    with pytest.raises(DemoDataError, match="no dataset stamp"):
        split_layouts(tmp_path, "test")
