"""bench/cost_model.py on a tiny model and small galleries: every constant measured and fitted, none
written to runtime/search_costs.json without --write; no timing thresholds."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("faiss", reason="the candidate indexes need faiss (pip install 'scan-runtime[scale]')")

from bench import cost_model
from runtime.search_plan import COSTS_FILE, Costs


def test_tiny_run_measures_every_constant(tiny_demo, tmp_path):
    before = COSTS_FILE.read_bytes()
    out = tmp_path / "r.json"
    # 250 images: the most candidates reranked, a flat index; 2000 images = 72K vectors: auto's IVF-SQ8
    args = ["--demo", str(tiny_demo), "--cache", str(tmp_path / "cache"), "--json", str(out)]
    assert cost_model.main([*args, "--small", "250", "--large", "2000", "--repeats", "1"]) == 0
    assert COSTS_FILE.read_bytes() == before
    r = json.loads(out.read_text())
    assert r["schema"] == cost_model.SCHEMA
    assert len(r["load_average_at_start"]) == 3 and len(r["load_average_at_end"]) == 3
    costs = Costs.from_dict(r["costs"])  # every constant present, none negative
    assert set(costs.scan) == set(costs.neighbour) == {"flat", "ivfsq", "ivf", "ivfpq", "hnsw"}
    assert "bench/cost_model.py" in costs.source
    measured = r["measured"]
    assert (measured["gallery_images"], measured["regions"]) == (250, 36)
    assert measured["dim"] == 8  # the tiny model's embed size
    qv1, qv32 = measured["query_vectors"]
    assert 0 < qv1 < qv32
    for part in ("exact", "dense", "flat", "ivfsq", "rerank"):
        assert len(measured[f"{part}_s"]) == 2 and min(measured[f"{part}_s"]) > 0, part


def test_small_gallery_below_the_rerank_exit_2(tiny_demo, tmp_path, capsys):
    assert cost_model.main(["--demo", str(tiny_demo), "--cache", str(tmp_path), "--small", "100"]) == 2
    assert "--small" in capsys.readouterr().err
