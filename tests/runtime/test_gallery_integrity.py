"""Gallery integrity (issue 9): concurrent writers, readers across commits, checksums, bounded k, signals."""

from __future__ import annotations

import functools
import json
import operator
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.engine import ScanEngine
from runtime.gallery import (
    CaptionGallery,
    GalleryError,
    ImageGallery,
    build_caption_gallery,
    build_image_gallery,
    writer_lock,
)
from runtime.gallery import store as gallery_store
from runtime.options import EngineOptions, SearchOptions, WriteOptions
from runtime.search import main as search_main
from runtime.searcher import MAX_K, Searcher, SearchError
from runtime.topk import RunningTopK
from tests.conftest import REPO
from tests.runtime.conftest import random_captions, random_regions

ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}

# A writer in its own process: opens the engine once, then for each trial waits for the trial's go file
# (so that all writers read the same generation at once) and appends.
WRITER = """
import os, pathlib, sys, time
from runtime.engine import ScanEngine
from runtime.gallery import build_caption_gallery, build_image_gallery
from runtime.options import WriteOptions
options = WriteOptions(append=True, progress=False)
from runtime.options import EngineOptions, SearchOptions
engine_path, kind, data, *trials = sys.argv[1:]
with ScanEngine.open(engine_path, EngineOptions(backend="onnxruntime")) as engine:
    for trial in trials:
        folder, go = trial.split(",")
        while not pathlib.Path(go).exists():
            time.sleep(0.002)
        if kind == "images":
            names = pathlib.Path(data + ".names")
            names = names.read_text().split() if names.exists() else None
            build_image_gallery(engine, data, folder, names=names, batch=4, options=options)
        else:
            captions = pathlib.Path(data).read_text().splitlines()
            build_caption_gallery(engine, captions, folder, batch=4, options=options)
        pathlib.Path(f"{go}.{os.getpid()}").touch()  # done
"""


def _writer(engine_path, kind, data, trials) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(engine_path), kind, str(data), *(f"{folder},{go}" for folder, go in trials)],
        env=ENV,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.fixture(scope="module")
def engines(small_engines):
    opened = {m: ScanEngine.open(p, EngineOptions(backend="onnxruntime")) for m, p in small_engines.items()}
    yield opened
    for e in opened.values():
        e.close()


def test_two_processes_appending_at_once_lose_nothing(engines, small_engines, tmp_path):
    engine = engines["t2i"]
    regions = {p: random_regions(12, seed=i) for i, p in enumerate("abc")}
    captions = {p: random_captions(9, seed=10 + i) for i, p in enumerate("abc")}
    for p in "bc":
        np.save(tmp_path / f"{p}.npy", regions[p])
        (tmp_path / f"{p}.npy.names").write_text(" ".join(f"{p}{i}" for i in range(12)))
        (tmp_path / f"{p}.txt").write_text("\n".join(captions[p]))
    emb = {p: engine.encode_images(regions[p])[0] for p in "abc"}
    trials = range(3)
    imgs, caps, go = ([tmp_path / f"{what}{t}" for t in trials] for what in ("imgs", "caps", "go"))
    for t in trials:
        build_image_gallery(
            engine, regions["a"], imgs[t], names=[f"a{i}" for i in range(12)], options=WriteOptions(progress=False)
        )
        build_caption_gallery(engine, captions["a"], caps[t], options=WriteOptions(progress=False))
    # four processes (two image writers, two caption writers) append to the same galleries at once, 3 times
    procs = [_writer(small_engines["t2i"], "images", tmp_path / f"{p}.npy", zip(imgs, go)) for p in "bc"]
    procs += [_writer(small_engines["t2i"], "captions", tmp_path / f"{p}.txt", zip(caps, go)) for p in "bc"]
    for t in trials:
        go[t].touch()
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob(f"go{t}.*"))) < 4 and time.monotonic() < deadline:
            assert all(p.poll() in (None, 0) for p in procs), [p.communicate()[1].decode() for p in procs]
            time.sleep(0.01)
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    for t in trials:
        g = ImageGallery.load(imgs[t], engine.manifest.image_encoder_id, verify=True)
        assert len(g) == 36 and g.ids.tolist() == list(range(36))
        assert sorted(g.names) == sorted(f"{p}{i}" for p in "abc" for i in range(12))
        for pos, name in enumerate(g.names):  # every item holds its own embedding
            np.testing.assert_allclose(g.images[pos], emb[name[0]][int(name[1:])], atol=1e-6)
        _, ids = Searcher(engine, images=g).search(["a dog on the beach ."], 36)
        assert sorted(ids[0].tolist()) == list(range(36))
        c = CaptionGallery.load(caps[t], engine.manifest.text_encoder_id, verify=True)
        assert len(c) == 27 and sorted(c.texts) == sorted(functools.reduce(operator.iadd, captions.values(), []))
        _scores, ids = Searcher(engine, captions=c).search(random_regions(1, seed=5), 27)
        assert sorted(ids[0].tolist()) == list(range(27))
        assert not list(imgs[t].glob(".*.tmp")) and not list(caps[t].glob(".*.tmp"))
        assert sorted(p.name for p in imgs[t].glob("*.npy")) == ["ids.3.npy", "image_gram.3.npy", "images.3.npy"]


def test_reader_keeps_its_generation_while_others_commit(engines, small_engines, tmp_path):
    engine = engines["t2i"]
    folder = tmp_path / "g"
    build_image_gallery(engine, random_regions(5, seed=1), folder, options=WriteOptions(progress=False))
    held = ImageGallery.load(folder, engine.manifest.image_encoder_id)
    want = Searcher(engine, images=held).search(["a red cat ."], 5)
    np.save(tmp_path / "more.npy", random_regions(4, seed=2))
    (tmp_path / "go").touch()
    # another process appends and commits generation 2
    p = _writer(small_engines["t2i"], "images", tmp_path / "more.npy", [(folder, tmp_path / "go")])
    assert p.wait(timeout=120) == 0, p.communicate()[1].decode()
    # this process appends and commits generation 3 while `held` (generation 1) is still open
    build_image_gallery(engine, random_regions(3, seed=3), folder, options=WriteOptions(append=True, progress=False))
    assert len(ImageGallery.load(folder)) == 12
    assert len(held) == 5
    for got, expected in zip(Searcher(engine, images=held).search(["a red cat ."], 5), want):
        np.testing.assert_array_equal(got, expected)
    # generation 2 is nobody's here: removed; generation 1 was removed by the other process (our map survives)
    assert not (folder / "images.2.npy").exists()
    mid = ImageGallery.load(folder)  # generation 3, held while generation 4 commits
    build_image_gallery(engine, random_regions(1, seed=4), folder, options=WriteOptions(append=True, progress=False))
    assert (folder / "images.3.npy").exists() and len(mid) == 12
    mid.close()  # the last map of generation 3 goes: so do its files
    assert not (folder / "images.3.npy").exists() and len(ImageGallery.load(folder)) == 13


def test_load_racing_another_process_commit_opens_the_new_generation(engines, small_engines, tmp_path, monkeypatch):
    """gallery.json read, then another process commits and removes those files before they are opened."""
    engine = engines["t2i"]
    folder = tmp_path / "g"
    build_image_gallery(engine, random_regions(5, seed=1), folder, options=WriteOptions(progress=False))
    np.save(tmp_path / "more.npy", random_regions(4, seed=2))
    (tmp_path / "go").touch()
    real_load = np.load
    commits = []

    def load_after_a_commit(*args, **kwargs):
        if not commits:
            p = _writer(small_engines["t2i"], "images", tmp_path / "more.npy", [(folder, tmp_path / "go")])
            commits.append((p.wait(timeout=120), p.communicate()[1].decode()))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", load_after_a_commit)
    g = ImageGallery.load(folder, engine.manifest.image_encoder_id)
    assert commits[0][0] == 0, commits[0][1]
    assert len(g) == 9 and g.manifest["generation"] == 2


def test_second_writer_waits_then_gives_up_with_a_clear_error(engines, tmp_path):
    engine = engines["t2i"]
    build_image_gallery(engine, random_regions(2), tmp_path, options=WriteOptions(progress=False))
    with writer_lock(tmp_path):
        t0 = time.monotonic()
        with pytest.raises(GalleryError, match=rf"another writer \(pid {os.getpid()}\) has held the gallery lock"):
            build_image_gallery(
                engine, random_regions(2), tmp_path, options=WriteOptions(append=True, progress=False, lock_timeout=0.3)
            )
        assert time.monotonic() - t0 >= 0.3
    assert (
        len(build_image_gallery(engine, random_regions(2), tmp_path, options=WriteOptions(append=True, progress=False)))
        == 4
    )


def test_next_writer_removes_a_killed_writers_temporaries(engines, tmp_path):
    engine = engines["i2t"]
    build_caption_gallery(engine, ["a dog ."], tmp_path, options=WriteOptions(progress=False))
    stale = [tmp_path / ".words.2.npy.k3j4.npy.tmp", tmp_path / ".gallery.json.x1.tmp", tmp_path / "images.7.npy"]
    for p in stale:
        p.write_bytes(b"\0" * 100)
    build_caption_gallery(engine, ["a cat ."], tmp_path, options=WriteOptions(append=True, progress=False))
    assert not any(p.exists() for p in stale)
    assert len(CaptionGallery.load(tmp_path)) == 2


# ---------------------------------------------------------------------------------------------- k


def test_huge_k_allocates_for_the_gallery_only(engines, tmp_path):
    top = RunningTopK(2, 10**9, size=20)
    assert top.scores.shape == (2, 20)
    top = RunningTopK(1, 6, size=3)
    top.add_block(np.array([[0.5, 0.9, 0.1]], np.float32), np.arange(3))
    scores, ids = top.result()
    assert ids.tolist() == [[1, 0, 2, -1, -1, -1]] and np.isneginf(scores[0, 3:]).all()
    g = build_image_gallery(engines["t2i"], random_regions(20), tmp_path, options=WriteOptions(progress=False))
    searcher = Searcher(engines["t2i"], images=g, options=SearchOptions(image_block=7))
    with pytest.raises(SearchError, match=f"k must be at most {MAX_K}, received 1000000000"):
        searcher.search(["a dog ."], 10**9)
    scores, ids = searcher.search(["a dog .", "a cat ."], MAX_K)
    want_s, want_i = searcher.search(["a dog .", "a cat ."], 20)
    assert ids.shape == (2, MAX_K)
    np.testing.assert_array_equal(ids[:, :20], want_i)
    np.testing.assert_array_equal(scores[:, :20], want_s)
    assert (ids[:, 20:] == -1).all() and np.isneginf(scores[:, 20:]).all()


def test_cli_bounds_k(engine_path, tmp_path, capsys):
    rc = search_main(["--engine", str(engine_path), "--gallery", str(tmp_path), "a dog .", "-k", str(10**9)])
    assert rc == 2 and f"-k must be a positive integer at most {MAX_K}, received 1000000000" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- checksums


def _poke(folder, name, edit):
    entry = json.loads((folder / "gallery.json").read_text())["arrays"][name]
    arr = np.load(folder / entry["file"], mmap_mode="r+")
    edit(arr)
    arr.flush()
    del arr
    return folder / entry["file"]


def test_flipped_bytes_and_nan_in_cached_images_are_caught(engines, tmp_path):
    engine = engines["t2i"]
    names = [f"img{i}" for i in range(20)]
    for case in ("flip", "nan", "ids"):
        build_image_gallery(
            engine, random_regions(20, seed=1), tmp_path / case, names=names, options=WriteOptions(progress=False)
        )

    def flip(a):
        a.view(np.uint8).reshape(-1)[a[0].nbytes * 7 + 3] ^= 0x7F  # an exponent byte of image 7

    path = _poke(tmp_path / "flip", "images", flip)
    with pytest.raises(GalleryError, match=rf"{path}: corrupted gallery file: xxh3_64 is [0-9a-f]+, gallery.json "):
        ImageGallery.load(tmp_path / "flip")
    path = _poke(tmp_path / "nan", "images", lambda a: a.__setitem__((7, 0, 0), np.nan))
    with pytest.raises(GalleryError, match=f"{path}: corrupted gallery file: xxh3_64"):
        ImageGallery.load(tmp_path / "nan")
    # unverified (as a cache above VERIFY_ON_OPEN_BYTES is by default), the search names the item
    g = ImageGallery.load(tmp_path / "nan", verify=False)
    with pytest.raises(SearchError, match=r"image 7 \('img7'\) of the gallery .* scored nan"):
        Searcher(engine, images=g, options=SearchOptions(image_block=4)).search(["a dog ."], 3)
    path = _poke(tmp_path / "ids", "ids", lambda a: a.__setitem__(3, 10**6))
    with pytest.raises(GalleryError, match="xxh3_64"):
        ImageGallery.load(tmp_path / "ids")
    with pytest.raises(GalleryError, match=rf"{path}: corrupted gallery file: ids\[3\] = 1000000 is outside 0..19"):
        ImageGallery.load(tmp_path / "ids", verify=False)


def test_nan_in_cached_captions_is_caught(engines, tmp_path):
    engine = engines["i2t"]
    caps = random_captions(10, seed=2)
    g = build_caption_gallery(engine, caps, tmp_path, options=WriteOptions(progress=False))
    pos = 4
    row = int(g.offsets[pos]) + 1
    cid = int(g.ids[pos])
    del g
    _poke(tmp_path, "words", lambda a: a.__setitem__((row, 2), np.inf))
    with pytest.raises(GalleryError, match=r"words\.1\.npy: corrupted gallery file: xxh3_64"):
        CaptionGallery.load(tmp_path)
    g = CaptionGallery.load(tmp_path, verify=False)
    with pytest.raises(SearchError, match=rf"caption {cid} \({caps[cid]!r}\) of the gallery"):
        Searcher(engine, captions=g).search(random_regions(2), 3)


def test_verification_default_is_by_size_and_verify_always_checks(small_engines, tmp_path, monkeypatch, capsys):
    gal = tmp_path / "gal"
    np.save(tmp_path / "ims.npy", random_regions(6))
    args = ["--engine", str(small_engines["t2i"]), "--gallery", str(gal), "--no-progress"]
    assert search_main([*args, "--images", str(tmp_path / "ims.npy"), "--captions", str(_captions(tmp_path))]) == 0
    assert search_main([*args, "--verify"]) == 0
    err = capsys.readouterr().err
    assert "verified" in err and "6 images" in err and "4 captions" in err
    path = _poke(gal / "images", "image_gram", lambda a: a.__setitem__((2, 1, 1), 7.0))
    monkeypatch.setattr(gallery_store, "VERIFY_ON_OPEN_BYTES", 0)  # as if the cache were large
    assert len(ImageGallery.load(gal / "images")) == 6  # not verified by default
    assert search_main([*args, "a dog ."]) == 0
    capsys.readouterr()
    assert search_main([*args, "--verify"]) == 2
    assert f"{path}: corrupted gallery file: xxh3_64" in capsys.readouterr().err
    assert search_main([*args, "--verify", "a dog ."]) == 2
    assert f"{path}: corrupted gallery file" in capsys.readouterr().err


def test_gallery_without_checksums_opens_but_does_not_verify(engines, tmp_path):
    build_image_gallery(engines["t2i"], random_regions(3), tmp_path, options=WriteOptions(progress=False))
    manifest = json.loads((tmp_path / "gallery.json").read_text())
    for entry in manifest["arrays"].values():
        del entry["xxh3_64"]
    (tmp_path / "gallery.json").write_text(json.dumps(manifest))
    assert len(ImageGallery.load(tmp_path)) == 3
    with pytest.raises(GalleryError, match=r"cannot verify: gallery\.json records no xxh3_64 checksum"):
        ImageGallery.load(tmp_path, verify=True)


def _captions(folder):
    path = folder / "caps.txt"
    path.write_text("a dog .\na cat on the grass .\nthe man .\na red woman running .\n")
    return path


# ---------------------------------------------------------------------------------------------- item 6


def test_rebuild_with_no_images_is_refused(small_engines, tmp_path, capsys):
    gal = tmp_path / "gal"
    np.save(tmp_path / "ims.npy", random_regions(3))
    np.save(tmp_path / "empty.npy", np.zeros((0, 5, 12), np.float32))
    args = ["--engine", str(small_engines["t2i"]), "--gallery", str(gal), "--no-progress"]
    assert search_main([*args, "--images", str(tmp_path / "ims.npy")]) == 0
    assert search_main([*args, "--images", str(tmp_path / "empty.npy"), "--rebuild"]) == 2
    assert "empty.npy: expected at least one image, received none" in capsys.readouterr().err
    assert len(ImageGallery.load(gal / "images")) == 3


def test_empty_gallery_warns(engines, caplog):
    engine = engines["t2i"]
    empty = ImageGallery(
        Path("<empty>"),
        np.zeros((0, 5, 8), np.float32),
        np.zeros((0, 5, 5), np.float32),
        np.zeros(0, np.int64),
        None,
        {},
    )
    scores, ids = Searcher(engine, images=empty).search(["a dog ."], 2)
    assert ids.tolist() == [[-1, -1]] and np.isneginf(scores).all()
    assert "the gallery <empty> is empty" in caplog.text


def test_gallery_that_is_a_file(engines, small_engines, tmp_path, capsys):
    engine = engines["t2i"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    np.save(tmp_path / "ims.npy", random_regions(3))
    for extra in (["a dog ."], ["--images", str(tmp_path / "ims.npy")]):
        assert search_main(["--engine", str(small_engines["t2i"]), "--gallery", str(afile), *extra]) == 2
        assert f"--gallery {afile}: expected a folder" in capsys.readouterr().err
    with pytest.raises(GalleryError, match="expected a gallery folder, found a file"):
        build_image_gallery(engine, random_regions(3), afile, options=WriteOptions(progress=False))
    with pytest.raises(GalleryError, match="expected a gallery folder, found a file"):
        ImageGallery.load(afile)


SLOW_APPEND = """
import sys, time
from runtime.engine import ScanEngine
from runtime.search import main
real = ScanEngine.encode_images
def slow(self, *a, **k):
    time.sleep(1.0)  # the append lasts seconds: the signal lands inside it even when the test waits on a busy machine
    return real(self, *a, **k)
ScanEngine.encode_images = slow
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_signal_during_append_exits_quietly_and_cleans_up(engines, small_engines, tmp_path, sig, code, word):
    engine = engines["t2i"]
    gal = tmp_path / "gal"
    build_image_gallery(engine, random_regions(3), gal / "images", options=WriteOptions(progress=False))
    np.save(tmp_path / "ims.npy", random_regions(400))
    p = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SLOW_APPEND,
            "--engine",
            str(small_engines["t2i"]),
            "--gallery",
            str(gal),
            "--images",
            str(tmp_path / "ims.npy"),
            "--append",
            "--no-progress",
        ],
        env=ENV,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not list((gal / "images").glob(".*.tmp")) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.01)
    assert list((gal / "images").glob(".*.tmp")), "the append never started"
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code and err.decode().strip().splitlines()[-1] == word
    assert "Traceback" not in err.decode()
    assert not list((gal / "images").glob(".*.tmp"))
    assert len(ImageGallery.load(gal / "images", verify=True)) == 3
