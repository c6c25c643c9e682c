"""Tests for the synthetic demo dataset (bench.demo.data) and the demo training (bench.demo.train).

Everything here runs on a tiny dataset (40 train / 10 dev / 10 test images, img_dim 32) and a tiny
model, in a few seconds; the full-size demo training is marked slow.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.demo.data import (
    CAPTIONS_PER_IMAGE,
    N_REGIONS,
    OBJECTS,
    SPLITS,
    DemoDataError,
    data_dir,
    make_dataset,
    vocab_file,
)
from bench.demo.train import (
    DemoTrainError,
    _batches,
    checkpoint_path,
    contrastive_loss,
    demo_config,
    evaluate_checkpoint,
    train_demo,
)
from export.checkpoint import find_vocab, load_checkpoint, read_checkpoint
from runtime.atomic import sha256_file
from runtime.config import SCANConfig
from runtime.gallery import ImageGallery
from runtime.tokenizer import tokenize
from runtime.vocab import SPECIAL_TOKENS, Vocabulary

TINY = {"img_dim": 32, "n_train": 40, "n_dev": 10, "n_test": 10}
TINY_MODEL = {"embed_size": 16, "word_dim": 8, "batch_size": 16}


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo_data")
    make_dataset(out, seed=0, **TINY)
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    out = tmp_path_factory.mktemp("demo_run")
    lines: list[str] = []
    ckpt = train_demo(out, seed=0, epochs=1, log=lines.append, data=TINY, **TINY_MODEL)
    return out, ckpt, lines


# ----------------------------------------------------------------------------- dataset


def test_layout_shapes_and_captions(tiny_data):
    folder = data_dir(tiny_data)
    assert folder == tiny_data / "data" / "demo_precomp"
    for split in SPLITS:
        ims = np.load(folder / f"{split}_ims.npy")
        n = TINY[f"n_{split}"]
        assert ims.shape == (n, N_REGIONS, TINY["img_dim"])
        assert ims.dtype == np.float32
        assert np.isfinite(ims).all()
        caps = (folder / f"{split}_caps.txt").read_text(encoding="utf-8").splitlines()
        assert len(caps) == CAPTIONS_PER_IMAGE * n
        assert all(c.strip() for c in caps)
    train = np.load(folder / "train_ims.npy")
    zero_regions = (np.abs(train).sum(axis=2) == 0).sum()
    assert zero_regions > 0, "some all-zero regions are expected, as in real feature files"
    caps = (folder / "train_caps.txt").read_text(encoding="utf-8")
    assert caps != caps.lower(), "some captions should carry capitals (the tokeniser lower-cases)"


def test_vocab_original_layout(tiny_data):
    raw = json.loads(vocab_file(tiny_data).read_text(encoding="utf-8"))
    assert vocab_file(tiny_data) == tiny_data / "vocab" / "demo_precomp_vocab.json"
    assert set(raw) == {"word2idx", "idx2word", "idx"}
    assert [raw["idx2word"][str(i)] for i in range(4)] == list(SPECIAL_TOKENS)
    assert raw["idx"] == len(raw["idx2word"]) == len(raw["word2idx"])
    assert all(raw["word2idx"][w] == int(i) for i, w in raw["idx2word"].items())
    vocab = Vocabulary.from_json(vocab_file(tiny_data))  # the project's own validation
    train_caps = (data_dir(tiny_data) / "train_caps.txt").read_text(encoding="utf-8").splitlines()
    train_words = {w for c in train_caps for w in tokenize(c)}
    assert train_words <= set(vocab.word2idx)
    assert len(vocab) == 4 + len(train_words)


def test_captions_describe_regions(tiny_data):
    """Each caption names objects; some image's captions differ, i.e. subsets/orders vary."""
    caps = (data_dir(tiny_data) / "train_caps.txt").read_text(encoding="utf-8").lower().splitlines()
    objects = set(OBJECTS)
    assert all(objects & set(tokenize(c)) for c in caps)
    assert len(set(caps)) > len(caps) // 2


def test_deterministic_for_a_seed(tmp_path, tiny_data):
    make_dataset(tmp_path / "a", seed=0, **TINY)
    assert _files(tmp_path / "a") == _files(tiny_data)
    make_dataset(tmp_path / "b", seed=1, **TINY)
    train_ims = "data/demo_precomp/train_ims.npy"
    assert _files(tmp_path / "b")[train_ims] != _files(tiny_data)[train_ims]


def test_existing_dataset_is_reused_and_repaired(tmp_path):
    folder = make_dataset(tmp_path, seed=0, **TINY)
    ims = folder / "train_ims.npy"
    before = ims.stat().st_mtime_ns
    make_dataset(tmp_path, seed=0, **TINY)
    assert ims.stat().st_mtime_ns == before
    good = sha256_file(ims)
    ims.write_bytes(b"corrupt")  # a damaged file no longer matches the stamp: regenerated
    make_dataset(tmp_path, seed=0, **TINY)
    assert sha256_file(ims) == good


@pytest.mark.parametrize("kwargs", [{"n_train": 0}, {"img_dim": True}, {"seed": -1}, {"n_test": 2.5}])
def test_invalid_parameters(tmp_path, kwargs):
    with pytest.raises(DemoDataError):
        make_dataset(tmp_path, **{**TINY, **kwargs})


# ----------------------------------------------------------------------------- training pieces


def test_contrastive_loss_matches_hand_computation():
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.5, 0.6], [0.0, 0.4, 0.7]])
    # Caption retrieval (rows): image 0 hardest other caption 0.8 -> 0.2+0.8-0.9 = 0.1; image 1: 0.2+0.6-0.5
    # = 0.3; image 2: 0.2+0.4-0.7 < 0 -> 0. Image retrieval (columns): caption 0: 0.2+0.2-0.9 < 0;
    # caption 1: 0.2+0.8-0.5 = 0.5; caption 2: 0.2+0.6-0.7 = 0.1.
    hard = contrastive_loss(scores, 0.2, max_violation=True)
    assert hard.item() == pytest.approx(0.1 + 0.3 + 0.5 + 0.1)
    soft = contrastive_loss(scores, 0.2, max_violation=False)
    hinge_rows = (0.2 + scores - scores.diag()[:, None]).clamp(min=0).fill_diagonal_(0).sum()
    hinge_cols = (0.2 + scores - scores.diag()[None, :]).clamp(min=0).fill_diagonal_(0).sum()
    assert soft.item() == pytest.approx((hinge_rows + hinge_cols).item())


def test_batches_cover_every_caption_once_with_distinct_images():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 20, size=5 * 37)
    batches = _batches(np.random.default_rng(1), lengths, 8)
    allcaps = np.concatenate(batches)
    assert sorted(allcaps.tolist()) == list(range(5 * 37))
    for b in batches:
        assert len(set((b // 5).tolist())) == len(b)


# ----------------------------------------------------------------------------- training end to end


def test_tiny_training_writes_original_checkpoint(tiny_run, monkeypatch):
    out, ckpt, lines = tiny_run
    assert ckpt == checkpoint_path(out) == out / "runs" / "demo" / "model_best.pth.tar"
    assert any("epoch  1/1" in line for line in lines)
    assert not list(ckpt.parent.glob("*.tmp")), "the atomic write must leave no temporary file"

    raw = read_checkpoint(ckpt)
    assert set(raw) == {"epoch", "model", "best_rsum", "opt", "Eiters"}
    assert isinstance(raw["opt"], argparse.Namespace)
    assert raw["epoch"] == 1 and raw["Eiters"] > 0

    loaded = load_checkpoint(ckpt)
    vocab = Vocabulary.from_json(vocab_file(out))
    expected = demo_config(len(vocab), img_dim=TINY["img_dim"], embed_size=16, word_dim=8)
    assert loaded.config == expected
    assert SCANConfig.from_opt(loaded.opt) == expected
    assert {k: loaded.opt[k] for k in expected.to_dict()} == expected.to_dict()
    for key, value in {
        "data_name": "demo_precomp",
        "vocab_path": "./vocab/",
        "data_path": "./data/",
        "margin": 0.2,
        "max_violation": True,
        "grad_clip": 2.0,
        "batch_size": 16,
        "num_epochs": 1,
    }.items():
        assert loaded.opt[key] == value, key

    # A copy of the vocabulary beside the checkpoint: found from any working folder.
    monkeypatch.chdir(ckpt.parent.parent)
    found = find_vocab(ckpt, loaded.opt)
    assert found.read_bytes() == vocab_file(out).read_bytes()
    # The original layout: run from out_dir, the vocabulary is <vocab_path>/<data_name>_vocab.json.
    monkeypatch.chdir(out)
    assert Path("vocab/demo_precomp_vocab.json").read_bytes() == found.read_bytes()

    metrics = evaluate_checkpoint(ckpt, out, "test")
    assert 0 <= metrics.rsum <= 600


def test_training_is_cached_by_stamp(tiny_run):
    out, ckpt, _ = tiny_run
    stamp = json.loads((ckpt.parent / "demo_stamp.json").read_text(encoding="utf-8"))
    assert stamp["key"]["data"]["params"]["seed"] == 0
    assert stamp["checkpoint_sha256"] == sha256_file(ckpt)
    before = ckpt.stat().st_mtime_ns
    lines: list[str] = []
    assert train_demo(out, seed=0, epochs=1, log=lines.append, data=TINY, **TINY_MODEL) == ckpt
    assert ckpt.stat().st_mtime_ns == before
    assert len(lines) == 1 and lines[0].startswith("cached") and "--retrain" in lines[0]


def _state(ckpt: Path) -> list[dict[str, torch.Tensor]]:
    return read_checkpoint(ckpt)["model"]


def test_training_is_deterministic_for_a_seed(tiny_run, tmp_path):
    _, ckpt, _ = tiny_run
    again = train_demo(tmp_path, seed=0, epochs=1, log=lambda _: None, data=TINY, **TINY_MODEL)
    for a, b in zip(_state(ckpt), _state(again)):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def _copy_run(tiny_run, tmp_path: Path) -> Path:
    work = tmp_path / "copy"
    shutil.copytree(tiny_run[0], work)
    return work


def test_changed_hyper_parameter_retrains(tiny_run, tmp_path):
    work = _copy_run(tiny_run, tmp_path)
    lines: list[str] = []
    train_demo(work, seed=0, epochs=1, log=lines.append, data=TINY, **TINY_MODEL, learning_rate=5e-4)
    assert not lines[0].startswith("cached")
    assert read_checkpoint(checkpoint_path(work))["opt"].learning_rate == 5e-4


def test_retrain_retrains_shows_progress_and_restores_thread_count(tiny_run, tmp_path, capsys):
    work = _copy_run(tiny_run, tmp_path)
    lines: list[str] = []
    before = torch.get_num_threads()
    train_demo(work, seed=0, epochs=1, log=lines.append, data=TINY, **TINY_MODEL, retrain=True)
    assert not lines[0].startswith("cached")
    assert torch.get_num_threads() == before
    bar = capsys.readouterr().err  # tqdm within the epoch: captions done, rate, mean loss
    assert "epoch 1/1" in bar and "cap/s" in bar and "loss=" in bar


def test_checkpoint_replaced_behind_the_stamp_retrains(tiny_run, tmp_path):
    work = _copy_run(tiny_run, tmp_path)
    copy_ckpt = checkpoint_path(work)
    copy_ckpt.write_bytes(copy_ckpt.read_bytes() + b"\0")  # no longer the checkpoint the stamp vouches for
    lines: list[str] = []
    train_demo(work, seed=0, epochs=1, log=lines.append, data=TINY, **TINY_MODEL)
    assert not lines[0].startswith("cached")
    load_checkpoint(copy_ckpt)


@pytest.mark.parametrize("kwargs", [{"epochs": 0}, {"batch_size": 0}, {"seed": -1}, {"learning_rate": 0.0}])
def test_training_rejects_invalid_parameters(tmp_path, kwargs):
    with pytest.raises(DemoTrainError):
        train_demo(tmp_path, log=lambda _: None, data=TINY, **{**TINY_MODEL, **kwargs})


@pytest.mark.slow
def test_full_demo_is_far_above_chance(tmp_path):
    """The default demo (2000 train images, 3 epochs; a few minutes on 2 cores)."""
    ckpt = train_demo(tmp_path, log=lambda _: None)
    metrics = evaluate_checkpoint(ckpt, tmp_path, "test")
    assert metrics.t2i.r1 > 30.0  # chance is 0.2% on 500 images
    assert metrics.i2t.r1 > 30.0
    assert os.path.isfile(vocab_file(tmp_path))


# ----------------------------------------------------------------------------- python -m bench.demo


def test_demo_runs_end_to_end_on_a_tiny_model(tiny_run, tmp_path, monkeypatch, capsys):
    """``make demo``'s steps (pictures, export, galleries with boxes, queries both ways, an explanation, recall
    three ways, how to serve the page) on the tiny model."""
    import bench.demo.__main__ as demo

    out, _, _ = tiny_run
    work = tmp_path / "demo"
    shutil.copytree(out, work)
    monkeypatch.setattr("bench.demo.data.make_dataset", lambda folder: make_dataset(folder, seed=0, **TINY))
    monkeypatch.setattr("bench.demo.train.train_demo", lambda folder, retrain=False: checkpoint_path(folder))
    assert demo.main(["--out", str(work)]) == 0
    printed = capsys.readouterr().out
    for step in (
        "exporting to ONNX",
        "text -> image queries",
        "image -> text",
        "recall on the test split",
        "float16 graphs",
        "drawing the test pictures",
        "each word's top regions",
        "done:",
    ):
        assert step in printed, step
    assert printed.count("rsum:") == 3 and "test_image_0" in printed
    assert (work / "engines" / "scan.json").is_file() and (work / "gallery" / "images" / "gallery.json").is_file()
    n = len(np.load(work / "data" / "demo_precomp" / "test_ims.npy", mmap_mode="r"))
    assert len(list((work / "pictures").glob("test_image_*.png"))) == n
    with ImageGallery.load(work / "gallery" / "images") as gallery:
        assert gallery.boxes.shape == (n, 36, 4) and gallery.names[0] == "test_image_0000"
    assert f"runtime/serve.py --engine {work / 'engines' / 'scan.json'} --gallery {work / 'gallery'}" in printed
    assert f"--image-dir {work / 'pictures'}" in printed


def test_demo_without_its_dependencies_says_how_to_install(monkeypatch, capsys):
    """One line naming what is missing and the commands that install it, not a ModuleNotFoundError."""
    import bench.demo.__main__ as demo

    monkeypatch.setattr(demo, "NEEDS", ("numpy", "no_such_module_for_the_demo"))
    assert demo.main(["--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: the demo needs no_such_module_for_the_demo,")
    assert "make demo" in err and "download.pytorch.org/whl/cpu" in err and "[cpu,export]" in err
