"""runtime/search.py --explain (with --boxes and --image-dir): each hit's explanation, printed and as JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.engine import ScanEngine
from runtime.options import EngineOptions
from runtime.search import main
from runtime.searcher import Searcher
from tests.runtime.conftest import random_captions, random_regions
from tests.runtime.test_explain_search import random_boxes

N = 6


@pytest.fixture(scope="module")
def built(small_engines, tmp_path_factory):
    """A gallery per model, images with names, boxes and pictures (for two of them), and captions."""
    root = tmp_path_factory.mktemp("explain_cli")
    np.save(root / "ims.npy", random_regions(N, seed=7))
    np.save(root / "boxes.npy", random_boxes(N, seed=3))
    (root / "caps.txt").write_text("\n".join(random_captions(12, seed=8)) + "\n", encoding="utf-8")
    (root / "names.txt").write_text("\n".join(f"photo_{i}" for i in range(N)), encoding="utf-8")
    (root / "pictures").mkdir()
    for i in (0, 1):
        (root / "pictures" / f"photo_{i}.png").write_bytes(b"\x89PNG")
    for mode, engine in small_engines.items():
        sources = ["--images", str(root / "ims.npy"), "--names", str(root / "names.txt")]
        sources += ["--boxes", str(root / "boxes.npy"), "--captions", str(root / "caps.txt")]
        assert main(["--engine", str(engine), "--gallery", str(root / mode), "--no-progress", *sources]) == 0
    return root


def _json(capsys, args: list[str]) -> list[dict]:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("mode", ["t2i", "i2t"])
def test_each_hit_is_explained_as_the_searcher_explains_it(built, small_engines, mode, capsys):
    engine, gallery = str(small_engines[mode]), built / mode
    base = ["--engine", engine, "--gallery", str(gallery), "--image-dir", str(built / "pictures"), "-k", "3"]
    boxes = np.load(built / "boxes.npy")
    text = _json(capsys, [*base, "--explain", "a dog on the zzz ."])[0]
    images = _json(capsys, [*base, "--explain", "--query-images", str(built / "ims.npy")])[:2]
    with ScanEngine.open(engine, EngineOptions(backend="onnxruntime")) as e, Searcher.open(e, gallery) as s:
        for item in text["results"]:
            ex = item["explanation"]
            assert ex["id"] == ex["image_id"] == item["id"] and ex["cross_attn"] == mode
            assert ex["score"] == pytest.approx(item["score"], abs=1e-5)
            assert ex["score"] == pytest.approx(s.explain("a dog on the zzz .", item["id"]).score, abs=1e-6)
            assert ex["boxes"] == boxes[item["id"]].tolist() and ex["regions"] == 5
            assert ex["words"] == ["<start>", "a", "dog", "on", "the", "<unk>", ".", "<end>"]
            assert item["picture"] == (str(built / "pictures" / f"photo_{item['id']}.png") if item["id"] < 2 else None)
            assert ex["picture"] == item["picture"]
        for record in images:
            for item in record["results"]:
                ex = item["explanation"]
                assert ex["image_id"] is None and ex["boxes"] is None and ex["id"] == item["id"]
                assert ex["score"] == pytest.approx(item["score"], abs=1e-5)
                assert ex["words"] == e.tokenizer.tokens(item["text"])
                rows = (len(ex["words"]), 5) if mode == "t2i" else (5, len(ex["words"]))
                assert np.asarray(ex["attention"]).shape == rows

    assert main([*base, "--explain", "--explain-top", "2", "a dog ."]) == 0
    out = capsys.readouterr().out
    if mode == "t2i":  # one line per word: its two most attended regions, with their boxes
        assert "t2i, score" in out and "each word's top regions" in out
        line = next(ln for ln in out.splitlines() if ln.strip().startswith("dog "))
        assert line.count("r") >= 2 and "[" in line
    else:  # one line per region: its two most attended words
        assert "each region's top words" in out
        assert sum(ln.strip().startswith("r0[") for ln in out.splitlines()) == 3
    assert str(built / "pictures" / "photo_") in out or "photo_" in out


def test_ensemble_explanations_have_one_block_per_member(built, small_engines, tmp_path, capsys):
    engines = ["--engine", str(small_engines["t2i"]), "--engine", str(small_engines["i2t"])]
    gallery = ["--gallery", str(tmp_path / "ens"), "--no-progress", "--weights", "0.6,0.4"]
    sources = ["--images", str(built / "ims.npy"), "--boxes", str(built / "boxes.npy")]
    assert main([*engines, *gallery, *sources]) == 0
    capsys.readouterr()
    (record,) = _json(capsys, [*engines, *gallery, "--explain", "-k", "2", "a red dog ."])
    for item in record["results"]:
        ex = item["explanation"]
        assert [m["cross_attn"] for m in ex["members"]] == ["t2i", "i2t"] and ex["weights"] == [0.6, 0.4]
        assert ex["score"] == pytest.approx(item["score"], abs=1e-5) and len(ex["boxes"]) == 5
    assert main([*engines, *gallery, "--explain", "-k", "1", "a red dog ."]) == 0
    out = capsys.readouterr().out
    assert "member 0 (weight 0.6), t2i" in out and "member 1 (weight 0.4), i2t" in out


def test_wrong_boxes_are_refused(built, small_engines, tmp_path, capsys):
    base = ["--engine", str(small_engines["t2i"]), "--gallery", str(tmp_path / "g"), "--no-progress"]
    np.save(tmp_path / "b.npy", random_boxes(N - 1))
    assert main([*base, "--images", str(built / "ims.npy"), "--boxes", str(tmp_path / "b.npy")]) == 2
    assert "expected region boxes (6, 5, 4)" in capsys.readouterr().err
    assert main([*base, "--boxes", str(tmp_path / "b.npy"), "a dog"]) == 2
    assert "--boxes goes with --images" in capsys.readouterr().err
    assert main([*base, "--image-dir", str(tmp_path / "nowhere"), "a dog"]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err
