"""bench/first_answer.py in this process on a tiny model and gallery: every phase timed in order, and the
answer the one Searcher gives; no timing thresholds."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("faiss", reason="the gallery's candidate index needs faiss (pip install 'scan-runtime[scale]')")

from bench import first_answer
from runtime.engine import ScanEngine
from runtime.gallery import GalleryError, ImageGallery, build_image_gallery
from runtime.options import EngineOptions, SearchOptions, WriteOptions
from runtime.searcher import Searcher

TEXT = "a red dog on the beach ."


def test_first_answer_times_each_phase_and_answers_as_the_searcher(tiny_demo, tmp_path, capsys):
    manifest, folder = tiny_demo / "engines" / "scan.json", tmp_path / "images"
    regions = np.random.default_rng(0).standard_normal((60, 5, 12)).astype(np.float32)
    with ScanEngine.open(manifest, EngineOptions(backend="onnxruntime")) as engine:
        build_image_gallery(engine, regions, folder, options=WriteOptions(index="auto", progress=False))
        assert (folder / "candidates.json").is_file()
        with Searcher(engine, images=ImageGallery.load(folder), options=SearchOptions(candidates=20)) as s:
            want = s.search([TEXT], 10)[1][0].tolist()
    args = ["--engine", str(manifest), "--gallery", str(folder), "--candidates", "20", "--queries", "2", TEXT]
    capsys.readouterr()
    assert first_answer.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    phases = [out[k] for k in ("import_s", "engine_s", "gallery_s", "first_query_s")]
    assert phases == sorted(phases) and phases[-1] > 0  # seconds since the module's import, in order
    assert out["total_s"] > 0
    assert out["images"] == 60 and out["top10"] == want
    assert out["rss_bytes"] > out["rss_anon_bytes"] > 0


def test_missing_gallery_is_named(tiny_demo, tmp_path):
    args = ["--engine", str(tiny_demo / "engines" / "scan.json"), "--gallery", str(tmp_path / "none")]
    with pytest.raises(GalleryError, match="none: no gallery here"):
        first_answer.main([*args, "--candidates", "20", TEXT])
