"""runtime/search.py: in-process for behaviour and errors, in a subprocess with torch made unimportable."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from runtime.search import main
from tests.conftest import REPO
from tests.runtime.conftest import random_captions, random_regions

NO_TORCH = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, Block())
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def run_without_torch(script: str, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(REPO / script), *args],
        input=stdin,
        capture_output=True,
        cwd=REPO,
        timeout=300,
    )


@pytest.fixture
def data(tmp_path):
    np.save(tmp_path / "ims.npy", random_regions(6, seed=7))
    (tmp_path / "caps.txt").write_text("\n".join(random_captions(30, seed=8)) + "\n", encoding="utf-8")
    (tmp_path / "names.txt").write_text("\n".join(f"photo_{i}.jpg" for i in range(6)), encoding="utf-8")
    return tmp_path


def test_cli_works_without_torch(engine_path, data):
    gal = str(data / "gal")
    r = run_without_torch(
        "runtime/search.py",
        "--engine",
        str(engine_path),
        "--gallery",
        gal,
        "--images",
        str(data / "ims.npy"),
        "--names",
        str(data / "names.txt"),
        "--captions",
        str(data / "caps.txt"),
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr.decode()
    r = run_without_torch(
        "runtime/search.py",
        "--engine",
        str(engine_path),
        "--gallery",
        gal,
        "--json",
        "-k",
        "2",
        "a red dog on the beach .",
        "--query-images",
        str(data / "ims.npy"),
    )
    assert r.returncode == 0, r.stderr.decode()
    out = json.loads(r.stdout)
    assert out[0]["query"] == "a red dog on the beach ." and len(out[0]["results"]) == 2
    assert out[0]["results"][0]["name"].startswith("photo_")
    assert len(out) == 7 and "text" in out[1]["results"][0]
    # queries from stdin
    r = run_without_torch(
        "runtime/search.py",
        "--engine",
        str(engine_path),
        "--gallery",
        gal,
        "-k",
        "1",
        stdin=b"a cat .\nthe man running .\n",
    )
    assert r.returncode == 0, r.stderr.decode()
    assert "a cat ." in r.stdout.decode() and "the man running ." in r.stdout.decode()


def test_recall_cli_works_without_torch(engine_path, data):
    shutil.copy(data / "ims.npy", data / "test_ims.npy")
    shutil.copy(data / "caps.txt", data / "test_caps.txt")
    r = run_without_torch("bench/recall.py", "--engine", str(engine_path), "--data", str(data), "--no-progress")
    assert r.returncode == 0, r.stderr.decode()
    assert "rsum" in r.stdout.decode()


def test_table_output_and_unknown_words(engine_path, data, capsys, caplog):
    gal = str(data / "gal")
    assert (
        main(["--engine", str(engine_path), "--gallery", gal, "--images", str(data / "ims.npy"), "--no-progress"]) == 0
    )
    capsys.readouterr()
    assert main(["--engine", str(engine_path), "--gallery", gal, "-k", "3", "zebra giraffe"]) == 0
    out = capsys.readouterr().out
    assert "zebra giraffe" in out and out.count("\n     ") == 3
    assert "only unknown words" in caplog.text


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_inputs(engine_path, data, capsys, tmp_path, monkeypatch):
    gal = str(data / "gal")
    eng = str(engine_path)
    assert "--images FEATS.npy" in _error(["--engine", eng, "--gallery", gal, "a dog"], capsys)
    assert main(["--engine", eng, "--gallery", gal, "--images", str(data / "ims.npy"), "--no-progress"]) == 0
    capsys.readouterr()
    assert "empty query" in _error(["--engine", eng, "--gallery", gal, "   "], capsys)
    assert "too long" in _error(["--engine", eng, "--gallery", gal, " ".join(["dog"] * 30)], capsys)
    assert "k must be a positive integer" in _error(["--engine", eng, "--gallery", gal, "-k", "0", "a dog"], capsys)
    (tmp_path / "q.txt").write_bytes(b"a dog \xff\xfe\n")
    assert "not UTF-8" in _error(["--engine", eng, "--gallery", gal, "--queries-file", str(tmp_path / "q.txt")], capsys)
    np.save(tmp_path / "bad.npy", np.zeros((2, 5, 3), np.float32))
    assert "expected 12 features per region" in _error(
        ["--engine", eng, "--gallery", gal, "--images", str(tmp_path / "bad.npy"), "--append"], capsys
    )
    assert "no such file" in _error(["--engine", str(tmp_path / "missing.onnx"), "a dog"], capsys)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    assert "nothing to do" in _error(["--engine", eng, "--gallery", gal], capsys)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a dog \xff\n")))
    assert "stdin: queries must be UTF-8" in _error(["--engine", eng, "--gallery", gal], capsys)


def test_mismatched_engine_file_is_refused(engine_path, tmp_path, capsys):
    folder = tmp_path / "engines"
    shutil.copytree(engine_path.parent, folder)
    with open(folder / "scan.onnx", "ab") as f:
        f.write(b"\0")  # another graph than the manifest recorded
    err = _error(["--engine", str(folder / "scan.onnx"), "--gallery", str(tmp_path / "g"), "a dog"], capsys)
    assert "sha256 differs" in err and "scan.onnx" in err


def test_gallery_of_another_model_via_cli(small_engines, data, capsys):
    gal = str(data / "gal")
    assert (
        main(
            [
                "--engine",
                str(small_engines["t2i"]),
                "--gallery",
                gal,
                "--images",
                str(data / "ims.npy"),
                "--no-progress",
            ]
        )
        == 0
    )
    err = _error(["--engine", str(small_engines["i2t"]), "--gallery", gal, "a dog"], capsys)
    assert "built by another model" in err
