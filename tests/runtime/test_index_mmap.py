"""The candidate index is memory-mapped when a search opens it: the same candidates as the index read
into memory, for every index kind, and the write path still extends it on append."""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.engine import ScanEngine
from runtime.gallery import build_image_gallery
from runtime.options import EngineOptions, WriteOptions
from tests.runtime.conftest import random_captions, random_regions

faiss = pytest.importorskip("faiss", reason="two-stage search needs faiss (pip install 'scan-runtime[scale]')")

from runtime.gallery.index import CandidateIndex, load_index  # noqa: E402


@pytest.fixture(scope="module")
def engine(small_engines):
    with ScanEngine.open(small_engines["t2i"], EngineOptions(backend="onnxruntime")) as e:
        yield e


def _word_vectors(engine, texts):
    ids, lengths = engine.tokenizer.encode_batch(texts)
    words = engine.encode_ids(ids, lengths)
    return [words[i, : lengths[i]] for i in range(len(texts))]


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfsq", "ivfpq", "hnsw"])
def test_mapped_index_gives_the_candidates_of_the_loaded_one(engine, tmp_path, kind, monkeypatch):
    g = build_image_gallery(
        engine, random_regions(300, seed=9), tmp_path, options=WriteOptions(progress=False, index=kind)
    )
    flags = []
    real = faiss.read_index
    monkeypatch.setattr(faiss, "read_index", lambda path, flag=0: flags.append(flag) or real(path, flag))
    mapped = load_index(g, engine.manifest.image_encoder_id)
    meta = json.loads((tmp_path / "candidates.json").read_text())
    loaded = CandidateIndex(g, real(str(tmp_path / meta["file"])), meta)  # read into memory
    expected = faiss.IO_FLAG_MMAP if kind.startswith("ivf") else faiss.IO_FLAG_MMAP_IFC
    assert flags == [expected]
    if kind.startswith("ivf"):  # the lists stay in the file
        assert "OnDisk" in type(faiss.downcast_InvertedLists(faiss.extract_index_ivf(mapped.index).invlists)).__name__
    queries = _word_vectors(engine, random_captions(8, seed=10))
    for m, neighbors in ((20, None), (60, 500)):
        a = mapped.search(queries, engine.config, m, neighbors=neighbors)
        b = loaded.search(queries, engine.config, m, neighbors=neighbors)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_a_mapped_ivf_index_is_extended_on_append(engine, tmp_path):
    """A search maps the index read-only; the append reads it into memory to extend it."""
    g = build_image_gallery(
        engine, random_regions(300, seed=1), tmp_path, options=WriteOptions(progress=False, index="ivfsq")
    )
    mapped = load_index(g, engine.manifest.image_encoder_id)
    queries = _word_vectors(engine, random_captions(4, seed=2))
    before = mapped.search(queries, engine.config, 20)
    g2 = build_image_gallery(
        engine, random_regions(40, seed=3), tmp_path, options=WriteOptions(append=True, progress=False)
    )
    meta = json.loads((tmp_path / "candidates.json").read_text())
    assert meta["extended_from"] == 300 and meta["vectors"] == 340 * 5
    assert load_index(g2, engine.manifest.image_encoder_id).index.ntotal == 340 * 5
    # the search's mapped index of the previous generation still answers (its file was unlinked, not overwritten)
    for x, y in zip(before, mapped.search(queries, engine.config, 20)):
        np.testing.assert_array_equal(x, y)
