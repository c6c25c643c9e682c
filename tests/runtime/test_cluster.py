"""Sharded search on a local Ray instance: the same ids and scores as one Searcher over the unsharded
gallery (both directions, k larger than a shard), appends to the last shard, and a shard killed
under load (errors while it is missing, never a wrong answer; identical answers after its restart)."""

from __future__ import annotations

import os
import shutil
import threading
import time

import numpy as np
import pytest

from runtime.engine import ScanEngine
from runtime.features import FeatureError
from runtime.gallery import CaptionGallery, ImageGallery, build_caption_gallery, build_image_gallery
from runtime.gallery.shards import split
from runtime.options import EngineOptions, SearchOptions, WriteOptions
from runtime.searcher import Searcher, SearchError
from tests.runtime.conftest import make_gallery, random_captions, random_regions

pytestmark = pytest.mark.ray

N_IMAGES, N_CAPTIONS = 23, 29
K_VALUES = (3, 13, 40)  # below a shard, above a shard (7..12 items), past the whole gallery


def single_node(engine_path, gallery, queries, regions):
    """{(direction, k): (scores, ids)} of one Searcher over the unsharded gallery."""
    with ScanEngine.open(engine_path, EngineOptions(backend="onnxruntime")) as engine:
        images = ImageGallery.load(gallery / "images")
        captions = CaptionGallery.load(gallery / "captions")
        with Searcher(engine, images=images, captions=captions) as s:
            return {
                (d, k): s.search(queries if d == "text" else regions, k) for d in ("text", "images") for k in K_VALUES
            }


def assert_same(got, expected, what=""):
    np.testing.assert_array_equal(got[1], expected[1], err_msg=f"ids {what}")
    # 1e-5: shards score blocks of other sizes, so GEMMs may round differently in the last bits
    np.testing.assert_allclose(got[0], expected[0], atol=1e-5, rtol=0, err_msg=f"scores {what}")


def sharded(engine_path, folder, **kw):
    from runtime.cluster import open_shards

    # threads=1: two cores shared by all shards; small blocks so a shard scans several blocks
    options = SearchOptions(image_block=4, caption_block=5)
    return open_shards(engine_path, folder, EngineOptions(backend="onnxruntime", threads=1), options, **kw)


@pytest.fixture(scope="module")
def two_shards(ray_cluster, small_engines, tmp_path_factory):
    """(engine, unsharded gallery, a Searcher over 2 shards of it): started once, not modified."""
    engine_path, tmp = small_engines["t2i"], tmp_path_factory.mktemp("two_shards")
    gallery = make_gallery(engine_path, tmp / "gallery", N_IMAGES, N_CAPTIONS)
    split(gallery, tmp / "sharded", 2)
    with sharded(engine_path, tmp / "sharded", timeout_s=3.0) as searcher:
        yield engine_path, gallery, searcher


def test_two_shards_equal_single_node(two_shards):
    check_equal_to_single_node(*two_shards, shards=2)


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "shards"), [("i2t", 2), ("t2i", 3), ("i2t", 3)])
def test_more_shards_equal_single_node(ray_cluster, small_engines, tmp_path, mode, shards):
    engine_path = small_engines[mode]
    gallery = make_gallery(engine_path, tmp_path / "gallery", N_IMAGES, N_CAPTIONS)
    split(gallery, tmp_path / "sharded", shards)
    with sharded(engine_path, tmp_path / "sharded") as searcher:
        check_equal_to_single_node(engine_path, gallery, searcher, shards)


def check_equal_to_single_node(engine_path, gallery, searcher, shards):
    queries, regions = random_captions(6, seed=21), random_regions(5, seed=22)
    expected = single_node(engine_path, gallery, queries, regions)
    for (direction, k), want in expected.items():
        got = searcher.search(queries if direction == "text" else regions, k)
        assert got[0].dtype == np.float32 and got[1].dtype == np.int64 and got[1].shape == (len(want[1]), k)
        assert_same(got, want, f"{direction} k={k}")
    assert (got[1][:, N_CAPTIONS:] == -1).all()  # k = 40 > 29 captions

    info = searcher.shards.info()
    assert [i["index"] for i in info] == list(range(shards))
    assert sum(i["images"]["size"] for i in info) == N_IMAGES and all(i["node"] for i in info)
    assert searcher.sizes() == {"images": N_IMAGES, "captions": N_CAPTIONS}
    # the hits' labels, asked of the shards that hold them: image names, caption texts, None past
    _, ids = searcher.search(queries, 40)
    names = searcher.labels("text_to_image", ids)
    assert names == [[f"img{i}" if i >= 0 else None for i in row] for row in ids.tolist()]
    _, ids = searcher.search(regions, 40)
    captions = CaptionGallery.load(gallery / "captions").texts
    texts = searcher.labels("image_to_text", ids)
    assert texts == [[captions[i] if i >= 0 else None for i in row] for row in ids.tolist()]

    # bad input is the caller's error, raised before any shard is asked
    with pytest.raises(SearchError, match="k must be a positive integer"):
        searcher.search(queries, 0)
    with pytest.raises(FeatureError, match="query regions"):
        searcher.search(regions[:, :, :5], 3)
    with pytest.raises(SearchError, match="at least one caption"):
        searcher.search([], 3)


def test_appends_go_to_the_last_shard(ray_cluster, small_engines, tmp_path):
    engine_path = small_engines["t2i"]
    gallery = make_gallery(engine_path, tmp_path / "gallery", N_IMAGES, N_CAPTIONS)
    split(gallery, tmp_path / "sharded", 2)
    new_regions, new_captions = random_regions(4, seed=31), random_captions(3, seed=32)
    new_names = [f"new{i}" for i in range(4)]
    with ScanEngine.open(engine_path, EngineOptions(backend="onnxruntime")) as engine:  # the same appends, unsharded
        build_image_gallery(
            engine, new_regions, gallery / "images", names=new_names, options=WriteOptions(append=True, progress=False)
        )
        build_caption_gallery(
            engine, new_captions, gallery / "captions", options=WriteOptions(append=True, progress=False)
        )
    queries, regions = random_captions(6, seed=21), random_regions(5, seed=22)
    expected = single_node(engine_path, gallery, queries, regions)
    with sharded(engine_path, tmp_path / "sharded") as searcher:
        assert searcher.add_images(new_regions, new_names) == N_IMAGES + 4
        assert searcher.add_captions(new_captions) == N_CAPTIONS + 3
        for (direction, k), want in expected.items():
            assert_same(searcher.search(queries if direction == "text" else regions, k), want, f"{direction} k={k}")
        assert searcher.shards.info()[0]["images"]["size"] == N_IMAGES // 2  # the first shard is untouched
        assert searcher.labels("text_to_image", np.array([[N_IMAGES + 3, -1]])) == [["new3", None]]
        # persisted: the last shard, killed and restarted by Ray, reloads the appends from disk
        old_pid = searcher.shards.info()[1]["pid"]
        ray_cluster.kill(searcher.shards.actors[1], no_restart=False)
        _wait(lambda: _new_pid(searcher, old_pid, shard=1), 60, "shard 1 to restart")
        assert searcher.shards.info()[1]["images"]["size"] == N_IMAGES - N_IMAGES // 2 + 4
        for (direction, k), want in expected.items():
            assert_same(searcher.search(queries if direction == "text" else regions, k), want, f"{direction} k={k}")


def test_killed_shard_fails_requests_then_recovers(ray_cluster, two_shards):
    """Kill a shard actor under load: requests fail with ShardUnavailableError while it restarts,
    every answer that does come back is the right one, and answers are identical after recovery."""
    from runtime.cluster import ShardUnavailableError

    engine_path, gallery, searcher = two_shards
    queries, regions = random_captions(4, seed=41), random_regions(3, seed=42)
    expected = single_node(engine_path, gallery, queries, regions)
    want_text, want_images = expected[("text", 13)], expected[("images", 13)]
    outcomes: list[tuple[float, str, object]] = []
    stop = threading.Event()

    def load():
        while not stop.is_set():
            for q, want in ((queries, want_text), (regions, want_images)):
                try:
                    got = searcher.search(q, 13)
                except ShardUnavailableError as e:
                    outcomes.append((time.monotonic(), "unavailable", e))
                except Exception as e:  # anything else is a bug: recorded and asserted below
                    outcomes.append((time.monotonic(), "error", e))
                else:
                    same = np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0], atol=1e-5, rtol=0)
                    outcomes.append((time.monotonic(), "ok" if same else "wrong", got))

    old_pid = searcher.shards.info()[0]["pid"]
    clients = [threading.Thread(target=load) for _ in range(2)]
    for c in clients:
        c.start()
    try:
        _wait(lambda: sum(o[1] == "ok" for o in outcomes) >= 4, 30, "answers before the kill")
        killed_at = time.monotonic()
        ray_cluster.kill(searcher.shards.actors[0], no_restart=False)
        _wait(lambda: _new_pid(searcher, old_pid, shard=0), 60, "shard 0 to restart")
        _wait(
            lambda: sum(o[1] == "ok" and o[0] > killed_at + 0.5 for o in outcomes) >= 4 and outcomes[-1][1] == "ok",
            30,
            "answers after the restart",
        )
    finally:
        stop.set()
        for c in clients:
            c.join(30)
    kinds = [o[1] for o in outcomes]
    assert "wrong" not in kinds, [o for o in outcomes if o[1] == "wrong"][:1]
    assert "error" not in kinds, [o[2] for o in outcomes if o[1] == "error"][:1]
    for _, kind, e in outcomes:
        if kind == "unavailable":
            assert "shard 0" in str(e), e  # names the missing shard
    # after recovery, both directions answer exactly as before the kill
    for (direction, k), want in expected.items():
        assert_same(searcher.search(queries if direction == "text" else regions, k), want, f"{direction} k={k}")


def _new_pid(searcher, old_pid: int, shard: int) -> bool:
    try:
        return searcher.shards.info(timeout_s=2.0)[shard]["pid"] != old_pid
    except Exception:  # still restarting
        return False


def _wait(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.05)


def test_worker_imports_this_checkout(ray_cluster):
    """Shard actors import the runtime of this checkout (not another installed copy)."""
    import runtime

    @ray_cluster.remote(num_cpus=0)
    def where():
        import runtime as r

        return r.__file__

    assert ray_cluster.get(where.remote(), timeout=60) == runtime.__file__


def test_unsharded_folder_is_refused(ray_cluster, small_engines, tmp_path):
    from runtime.cluster import open_shards
    from runtime.gallery.shards import ShardError

    gallery = make_gallery(small_engines["t2i"], tmp_path / "gallery", 4, 4)
    with pytest.raises(ShardError, match="unsharded gallery"):
        open_shards(small_engines["t2i"], gallery)
    shutil.rmtree(gallery)


def test_shards_run_at_normal_priority(ray_cluster, two_shards):
    """Ray's default worker niceness (15) starves the shards on a busy machine; connect() sets 0, an increment:
    the shards run at the driver's priority (``nice -n 5 make test`` runs them at 5, not 20)."""
    _, _, searcher = two_shards
    shard = ray_cluster.get(searcher.shards.actors[0].__ray_call__.remote(lambda self: os.nice(0)), timeout=30)
    assert shard == os.nice(0)


def test_local_ray_from_another_thread_is_refused(monkeypatch):
    """Ray's processes die with the thread that started them (the driver then exits silently): refuse."""
    ray = pytest.importorskip("ray", reason="needs the 'cluster' extra (pip install -e '.[cluster]')")

    from runtime.cluster import connect

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    errors = []

    def start():
        try:
            connect(num_cpus=1)
        except RuntimeError as e:
            errors.append(str(e))

    t = threading.Thread(target=start)
    t.start()
    t.join(30)
    assert errors and "from the main thread" in errors[0]


def test_explain_goes_to_the_shard_holding_the_id(two_shards):
    """Explanations and gallery images as queries (image_queries) route to the shard that holds the id and
    answer what one process answers."""
    engine_path, gallery, searcher = two_shards
    regions = random_regions(2, seed=3)
    engine = ScanEngine.open(engine_path, EngineOptions(backend="onnxruntime"))
    with engine, Searcher.open(engine, gallery) as single:
        for image in (0, N_IMAGES - 1):  # one in each shard
            got, want = (
                searcher.explain("a dog on the grass .", image),
                single.explain("a dog on the grass .", image),
            )
            assert got.words == want.words and abs(got.score - want.score) <= 1e-5
            np.testing.assert_allclose(got.attention, want.attention, atol=1e-6)
            assert searcher.boxes(image) is None
        for caption in (0, N_CAPTIONS - 1):
            assert abs(searcher.explain(regions[0], caption).score - single.explain(regions[0], caption).score) <= 1e-5
        by_id = searcher.search_prepared(searcher.image_queries([N_IMAGES - 1, 0]), 5)
        assert_same(by_id, single.search_prepared(single.image_queries([N_IMAGES - 1, 0]), 5), "image ids")
    with pytest.raises(SearchError, match="image id 23 is outside the gallery"):
        searcher.explain("a dog .", N_IMAGES)
