"""bench/recall.py reproduces the original's similarities and recall table on the golden cases."""

from __future__ import annotations

import json
import shutil

import numpy as np

from bench.metrics import evaluate, format_table
from bench.recall import main
from tests.conftest import golden_expected


def test_save_sims_and_table_match_the_original(golden, exported, tmp_path, capsys):
    out = tmp_path / "sims.npy"
    assert (
        main(
            [
                "--engine",
                str(exported[golden.name]),
                "--data",
                str(golden),
                "--split",
                "test",
                "--save-sims",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    expected = golden_expected(golden)
    sims = np.load(out)
    assert sims.dtype == np.float32 and sims.shape == expected.shape
    assert np.abs(sims - expected).max() <= 1e-5
    table = format_table(evaluate(expected)).splitlines()
    assert all(line in printed for line in table if line.strip())
    assert main(["--engine", str(exported[golden.name]), "--data", str(golden), "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == evaluate(expected).to_dict()


def test_ensemble_averages_similarities(exported, golden, tmp_path):
    engines = [str(p) for p in exported.values()]
    out = tmp_path / "ens.npy"
    repeated = [arg for e in engines for arg in ("--engine", e)]
    assert main([*repeated, "--data", str(golden), "--save-sims", str(out), "--no-progress"]) == 0
    singles = []
    for e in engines:
        main(["--engine", e, "--data", str(golden), "--save-sims", str(tmp_path / "one.npy"), "--no-progress"])
        singles.append(np.load(tmp_path / "one.npy"))
    np.testing.assert_allclose(np.load(out), np.mean(singles, axis=0), atol=1e-6)


def test_caption_count_must_be_five_per_image(golden, exported, tmp_path, capsys):
    shutil.copy(golden / "test_ims.npy", tmp_path / "test_ims.npy")
    lines = (golden / "test_caps.txt").read_text().splitlines()
    (tmp_path / "test_caps.txt").write_text("\n".join(lines[:-3]) + "\n")
    assert main(["--engine", str(exported[golden.name]), "--data", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "57 captions for 12 image rows" in err
    assert main(["--engine", str(exported[golden.name]), "--data", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "missing" in capsys.readouterr().err


def test_repeated_image_layout(golden, exported, tmp_path):
    np.save(tmp_path / "test_ims.npy", np.repeat(np.load(golden / "test_ims.npy"), 5, axis=0))
    shutil.copy(golden / "test_caps.txt", tmp_path / "test_caps.txt")
    assert (
        main(
            [
                "--engine",
                str(exported[golden.name]),
                "--data",
                str(tmp_path),
                "--save-sims",
                str(tmp_path / "s.npy"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert np.abs(np.load(tmp_path / "s.npy") - golden_expected(golden)).max() <= 1e-5


def test_fold5_says_what_it_did(golden, exported, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "test_ims.npy", np.load(golden / "test_ims.npy")[:10])
    lines = (golden / "test_caps.txt").read_text().splitlines()
    (data / "test_caps.txt").write_text("\n".join(lines[:50]) + "\n")
    args = ["--engine", str(exported[golden.name]), "--no-progress", "--fold5"]
    assert main([*args, "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "test: 10 images, 50 captions (mean of 5 folds of 2 images)" in out and "5-fold 1K" not in out
    assert main([*args, "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fold_images"] == 2
    assert main([*args, "--data", str(golden)]) == 2  # 12 images
    assert "--fold5: 12 images do not split into 5 equal folds" in capsys.readouterr().err


def test_save_sims_needs_an_existing_folder(golden, exported, tmp_path, capsys):
    target = tmp_path / "no" / "such" / "sims.npy"
    args = ["--engine", str(exported[golden.name]), "--data", str(golden), "--no-progress"]
    assert main([*args, "--save-sims", str(target)]) == 2
    assert f"the folder {target.parent} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
