"""runtime/search.py with several --engine: the ranking bench/recall.py --save-sims implies, on every query."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.recall import main as recall
from runtime.search import main as search
from tests.runtime.conftest import random_captions, random_regions
from tests.runtime.test_search_cli import run_without_torch
from tests.runtime.test_searcher import assert_same_ranking

# search.py prints scores rounded to 6 decimals (error <= 5e-7); the runtime scores blocks of other shapes
# than recall.py's full matrix (float32 differences ~1e-7). Ids must agree wherever scores differ by more.
ATOL = 2e-6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ensemble_cli")
    np.save(folder / "test_ims.npy", random_regions(7, seed=21))
    (folder / "test_caps.txt").write_text("\n".join(random_captions(35, seed=22)) + "\n", encoding="utf-8")
    return folder


def engine_args(small_engines) -> list[str]:
    return ["--engine", str(small_engines["t2i"]), "--engine", str(small_engines["i2t"])]


def results(out: str) -> tuple[np.ndarray, np.ndarray]:
    rows = json.loads(out)
    return (
        np.array([[r["score"] for r in q["results"]] for q in rows], np.float32),
        np.array([[r["id"] for r in q["results"]] for q in rows], np.int64),
    )


@pytest.mark.parametrize("weights", [None, "0.2,0.8"])
def test_search_ranks_as_recall_save_sims_implies(small_engines, data, tmp_path, capsys, weights):
    engines = engine_args(small_engines)
    w = ["--weights", weights] if weights else []
    assert (
        recall(
            [*engines, *w, "--data", str(data), "--save-sims", str(tmp_path / "sims.npy"), "--no-progress", "--json"]
        )
        == 0
    )
    capsys.readouterr()
    sims = np.load(tmp_path / "sims.npy")  # (7 images, 35 captions)
    gal = str(tmp_path / "gal")
    assert (
        search(
            [
                *engines,
                "--gallery",
                gal,
                "--images",
                str(data / "test_ims.npy"),
                "--captions",
                str(data / "test_caps.txt"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "7 images, 2 models" in capsys.readouterr().err
    # text -> image: every caption of the split is a query; its whole ranking of the 7 images
    assert (
        search([*engines, *w, "--gallery", gal, "--queries-file", str(data / "test_caps.txt"), "-k", "7", "--json"])
        == 0
    )
    scores, ids = results(capsys.readouterr().out)
    assert ids.shape == (35, 7)
    assert_same_ranking(scores, ids, sims.T, 7, atol=ATOL)
    # image -> text: every image is a query; its whole ranking of the 35 captions
    assert (
        search([*engines, *w, "--gallery", gal, "--query-images", str(data / "test_ims.npy"), "-k", "35", "--json"])
        == 0
    )
    scores, ids = results(capsys.readouterr().out)
    assert ids.shape == (7, 35)
    assert_same_ranking(scores, ids, sims, 35, atol=ATOL)


def test_ensemble_cli_errors_in_one_line(small_engines, data, tmp_path, capsys):
    engines = engine_args(small_engines)
    gal = str(tmp_path / "gal")
    assert search([*engines, "--weights", "1,2,3", "--gallery", gal, "a dog ."]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "one weight per engine (2), received 3" in err
    # extending a single model's gallery (engines[:2]: the first model) into an ensemble's: only by a rebuild
    images = ["--images", str(data / "test_ims.npy"), "--no-progress"]
    assert search([*engines[:2], "--gallery", gal, *images]) == 0
    capsys.readouterr()
    assert search([*engines, "--gallery", gal, *images]) == 2  # building where a gallery is: say which way
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds an image gallery" in err and "--append" in err
    assert search([*engines, "--gallery", gal, *images, "--append"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "one model only" in err and "--rebuild" in err
    assert search([*engines, "--gallery", gal, *images, "--rebuild"]) == 0
    assert search([*engines[:2], "--gallery", gal, "a dog .", "-k", "2"]) == 0  # the single model's still serves
    capsys.readouterr()
    # searching a gallery built by one model only
    single = str(tmp_path / "single")
    assert search([*engines[2:], "--gallery", single, "--images", str(data / "test_ims.npy"), "--no-progress"]) == 0
    capsys.readouterr()
    assert search([*engines, "--gallery", single, "a dog ."]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "one model only" in err and f"member 1 ({small_engines['t2i']})" in err
    assert search([*engines, "--gallery", str(tmp_path / "none"), "--query-images", str(data / "test_ims.npy")]) == 2
    assert "no ensemble captions gallery" in capsys.readouterr().err


def test_ensemble_cli_works_without_torch(small_engines, data, tmp_path):
    engines = engine_args(small_engines)
    gal = str(tmp_path / "gal")
    r = run_without_torch(
        "runtime/search.py", *engines, "--gallery", gal, "--images", str(data / "test_ims.npy"), "--no-progress"
    )
    assert r.returncode == 0, r.stderr.decode()
    r = run_without_torch(
        "runtime/search.py",
        *engines,
        "--weights",
        "0.6,0.4",
        "--gallery",
        gal,
        "--json",
        "-k",
        "3",
        "a red dog on the beach .",
    )
    assert r.returncode == 0, r.stderr.decode()
    out = json.loads(r.stdout)
    assert len(out) == 1 and len(out[0]["results"]) == 3


def test_ensemble_cost_bench_quick_run(small_engines, tmp_path, capsys):
    from bench.ensemble_cost import main as bench

    out = tmp_path / "cost.json"
    assert (
        bench(
            [
                *engine_args(small_engines),
                "--images",
                "20",
                "--captions",
                "40",
                "--regions",
                "5",
                "--batch",
                "3",
                "--repeats",
                "2",
                "--json",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    contenders = {(r["direction"], r["contender"]) for r in result["rows"]}
    assert contenders == {
        (d, c) for d in ("text_to_image", "image_to_text") for c in ("member1", "member2", "ensemble")
    }
    assert all(r["n"] == 2 and r["median_ms"] > 0 for r in result["rows"])
    assert all(v["median"] > 0 for v in result["ratio_to_sum_of_members"].values())
    assert "ensemble / sum of members" in capsys.readouterr().out


def test_ensemble_verify(small_engines, data, tmp_path, capsys):
    engines = engine_args(small_engines)
    gal = tmp_path / "gal"
    assert (
        search(
            [
                *engines,
                "--gallery",
                str(gal),
                "--images",
                str(data / "test_ims.npy"),
                "--captions",
                str(data / "test_caps.txt"),
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert search([*engines, "--gallery", str(gal), "--verify"]) == 0
    err = capsys.readouterr().err
    assert err.count("verified") == 4 and "7 images" in err and "35 captions" in err
    index = json.loads((gal / "ensemble.json").read_text())
    member = gal / next(iter(index["images"]["members"].values()))["folder"]
    target = next(member.glob("images.*.npy"))
    raw = bytearray(target.read_bytes())
    raw[-5] ^= 0xFF  # one flipped byte in one member's cache
    target.write_bytes(bytes(raw))
    assert search([*engines, "--gallery", str(gal), "--verify"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and target.name in err


def test_the_same_model_twice_is_refused_naming_both(small_engines, data, tmp_path, capsys):
    twice = ["--engine", str(small_engines["t2i"]), "--engine", str(small_engines["t2i"])]
    assert search([*twice, "--gallery", str(tmp_path / "g"), "--images", str(data / "test_ims.npy")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "are the same engine" in err and "member 1" in err and "member 2" in err
