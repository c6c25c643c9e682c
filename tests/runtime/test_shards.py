"""Sharded galleries without Ray: split/merge round trips, shards that load on their own, and the
fan-out/merge of in-process shard servers against one Searcher over the unsharded gallery."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from runtime.cluster import ShardServer
from runtime.engine import ScanEngine, ScanModel
from runtime.gallery import CaptionGallery, ImageGallery, build_image_gallery
from runtime.gallery.shards import (
    KINDS,
    ShardError,
    check_contiguous,
    ensure_split,
    load_shard,
    merge,
    read_layout,
    split,
)
from runtime.options import EngineOptions, SearchOptions, WriteOptions
from runtime.searcher import Searcher
from runtime.shards import main
from runtime.topk import RunningTopK
from tests.runtime.conftest import make_gallery, random_captions, random_regions

N_IMAGES, N_CAPTIONS = 23, 29


@pytest.fixture(scope="module")
def gallery(engine_path, tmp_path_factory):
    return make_gallery(engine_path, tmp_path_factory.mktemp("gallery"))


def assert_same_gallery(a_folder, b_folder):
    a, b = ImageGallery.load(a_folder / "images"), ImageGallery.load(b_folder / "images")
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.image_gram, b.image_gram)
    np.testing.assert_array_equal(a.ids, b.ids)
    assert a.names == b.names and a.manifest["image_encoder_id"] == b.manifest["image_encoder_id"]
    c, d = CaptionGallery.load(a_folder / "captions"), CaptionGallery.load(b_folder / "captions")
    for name in ("words", "offsets", "lengths", "ids"):
        np.testing.assert_array_equal(getattr(c, name), getattr(d, name), err_msg=name)
    assert c.texts == d.texts and c.manifest["text_encoder_id"] == d.manifest["text_encoder_id"]


@pytest.mark.parametrize("shards", [1, 2, 3, 7])
def test_split_then_merge_is_the_identity(gallery, tmp_path, shards):
    layout = split(gallery, tmp_path / "sharded", shards)
    assert [s.index for s in layout] == list(range(shards))
    sizes = []
    for s in layout:
        _, images, captions = load_shard(s.folder)  # each shard loads on its own
        sizes.append({"images": len(images), "captions": len(captions)})
        np.testing.assert_array_equal(images.ids, np.arange(len(images)))  # local ids, offset in shard.json
        assert sorted(captions.ids.tolist()) == list(range(len(captions)))
    assert [s["images"] for s in sizes] == np.diff([i * N_IMAGES // shards for i in range(shards + 1)]).tolist()
    assert sum(s["captions"] for s in sizes) == N_CAPTIONS
    check_contiguous(layout, sizes)
    merge(tmp_path / "sharded", tmp_path / "merged")
    assert_same_gallery(gallery, tmp_path / "merged")
    assert not list(tmp_path.glob(".*partial*"))  # staging folders renamed into place


def test_shard_holds_its_range(gallery, tmp_path):
    whole_images, whole_captions = ImageGallery.load(gallery / "images"), CaptionGallery.load(gallery / "captions")
    for s in split(gallery, tmp_path / "sharded", 3):
        _, images, captions = load_shard(s.folder)
        a = s.images_offset
        np.testing.assert_array_equal(images.images, whole_images.images[a : a + len(images)])
        assert images.names == whole_images.names[a : a + len(images)]
        c = s.captions_offset
        assert captions.texts == whole_captions.texts[c : c + len(captions)]
        for pos, cid in enumerate(captions.ids):  # every caption's words are the unsharded gallery's
            whole_pos = int(np.flatnonzero(whole_captions.ids == cid + c)[0])
            np.testing.assert_array_equal(
                captions.words[captions.offsets[pos] : captions.offsets[pos + 1]],
                whole_captions.words[whole_captions.offsets[whole_pos] : whole_captions.offsets[whole_pos + 1]],
            )


def test_split_and_merge_refuse_bad_requests(gallery, tmp_path):
    with pytest.raises(ShardError, match="cannot split 23 images into 24 shards"):
        split(gallery, tmp_path / "x", 24)
    with pytest.raises(ShardError, match="positive integer"):
        split(gallery, tmp_path / "x", 0)
    with pytest.raises(ShardError, match="no gallery to split"):
        split(tmp_path, tmp_path / "x", 2)
    split(gallery, tmp_path / "sharded", 2)
    with pytest.raises(ShardError, match="already exists"):
        split(gallery, tmp_path / "sharded", 2)
    with pytest.raises(ShardError, match="unsharded gallery"):
        merge(gallery, tmp_path / "m")
    # a shard other than the last grew: ids would no longer be contiguous
    info = json.loads((tmp_path / "sharded" / "shard-1" / "shard.json").read_text())
    info["images_offset"] += 1
    (tmp_path / "sharded" / "shard-1" / "shard.json").write_text(json.dumps(info))
    with pytest.raises(ShardError, match="start at global id 12, but the shards before it hold 11"):
        merge(tmp_path / "sharded", tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_cli(gallery, tmp_path, capsys):
    assert main(["split", "--gallery", str(gallery), "--out", str(tmp_path / "s"), "--shards", "2"]) == 0
    assert "ids 0..10" in capsys.readouterr().err
    assert main(["merge", "--shards-dir", str(tmp_path / "s"), "--out", str(tmp_path / "m")]) == 0
    assert_same_gallery(gallery, tmp_path / "m")
    assert main(["split", "--gallery", str(gallery), "--out", str(tmp_path / "t"), "--shards", "99"]) == 2
    assert "error: --shards: cannot split" in capsys.readouterr().err


def test_float16_gallery_splits(engine_path, tmp_path):
    folder = make_gallery(engine_path, tmp_path / "g16", dtype="float16")
    split(folder, tmp_path / "s", 2)
    merge(tmp_path / "s", tmp_path / "m")
    assert ImageGallery.load(tmp_path / "m" / "images").dtype == np.float16
    assert_same_gallery(folder, tmp_path / "m")


def test_merge_of_shards_contract():
    # shard 0 holds ids 0..2, shard 1 ids 3..4; equal scores go to the lower id; -1 past the gallery
    s0 = (np.array([[0.9, 0.5, 0.5]], np.float32), np.array([[2, 0, 1]]))
    s1 = (np.array([[0.5, -np.inf, -np.inf]], np.float32), np.array([[3, -1, -1]]))
    top = RunningTopK(1, 5)
    for shard in (s1, s0):
        top.merge(*shard)
    scores, ids = top.result()
    assert ids.tolist() == [[2, 0, 1, 3, -1]]
    np.testing.assert_array_equal(scores, np.array([[0.9, 0.5, 0.5, 0.5, -np.inf]], np.float32))
    assert scores.dtype == np.float32 and ids.dtype == np.int64


@pytest.mark.parametrize("shards", [2, 3])
def test_in_process_shards_equal_one_searcher(engine_path, gallery, tmp_path, shards):
    """The fan-out and merge without Ray: k below, above a shard's size, and past the whole gallery."""
    layout = split(gallery, tmp_path / "sharded", shards)
    options = SearchOptions(image_block=4, caption_block=5)
    servers = [ShardServer(engine_path, s.folder, EngineOptions(backend="onnxruntime"), options) for s in layout]
    sharded = Searcher(ScanModel.open(engine_path), shards=InProcessShards(servers))
    queries, regions = random_captions(6, seed=21), random_regions(5, seed=22)
    with ScanEngine.open(engine_path, EngineOptions(backend="onnxruntime")) as engine:
        single = Searcher(
            engine, images=ImageGallery.load(gallery / "images"), captions=CaptionGallery.load(gallery / "captions")
        )
        for k in (3, 13, 40):
            for q in (queries, regions):
                expected, got = single.search(q, k), sharded.search(q, k)
                np.testing.assert_array_equal(got[1], expected[1], err_msg=f"k={k}")
                np.testing.assert_allclose(got[0], expected[0], atol=1e-5, rtol=0)
    assert servers[-1].labels("text_to_image", [N_IMAGES - 1]) == [f"img{N_IMAGES - 1}"]
    sharded.close()


class InProcessShards:
    """runtime.cluster.Shards without Ray: the shard servers in this process, asked one after the other."""

    def __init__(self, servers: list[ShardServer]) -> None:
        self.servers = servers

    def search(self, queries, k):
        return [server.search(queries, k) for server in self.servers]

    def sizes(self):
        return {kind: sum(server.info()[kind]["size"] for server in self.servers) or None for kind in KINDS}

    def close(self):
        for server in self.servers:
            server.close()


def test_read_layout_errors(tmp_path):
    with pytest.raises(ShardError, match="no sharded gallery here"):
        read_layout(tmp_path)
    (tmp_path / "shards.json").write_text('{"format": "scan-shards/1", "shards": ["a"]}')
    with pytest.raises(ShardError, match="not a shard"):
        read_layout(tmp_path)


def test_ensure_split_reuses_or_refuses(gallery, engine_path, tmp_path):

    g = tmp_path / "g"
    shutil.copytree(gallery, g)
    out = ensure_split(g, 2)
    assert out == tmp_path / "g.shards-2" and len(read_layout(out)) == 2
    assert ensure_split(g, 2) == out  # reused as it is
    assert ensure_split(out, 2) == out  # a sharded gallery is served as it is
    with pytest.raises(ShardError, match="holds 2 shards, --shards says 3"):
        ensure_split(out, 3)
    with ScanEngine.open(engine_path, EngineOptions(backend="onnxruntime")) as engine:  # the unsharded gallery moves on
        build_image_gallery(
            engine,
            random_regions(1, seed=9),
            g / "images",
            names=["late"],
            options=WriteOptions(append=True, progress=False),
        )
    with pytest.raises(ShardError, match="split from another state"):
        ensure_split(g, 2)
