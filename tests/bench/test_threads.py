"""bench/threads.py --quick replays one query's ONNX Runtime calls for every setting; no timing thresholds."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")  # the random model is exported with PyTorch
pytest.importorskip("onnx")

from bench import threads
from runtime.threads import available_cores


def test_quick_run_reports_every_setting_and_situation(tmp_path):
    out = tmp_path / "threads.json"
    argv = ["--quick", "--rounds", "2", "--repeats", "1", "--json", str(out), "--cache", str(tmp_path / "cache")]
    assert threads.main(argv) == 0
    r = json.loads(out.read_text())
    assert r["schema"] == threads.SCHEMA and list(r["models"]) == ["quick"]
    m = r["models"]["quick"]
    assert m["calls_per_query"] >= 2  # the text encoder and at least one head call
    intra = sorted({1, available_cores()})
    expected = {f"intra_op={t} spinning={s}" for t in intra for s in ("off", "on")}
    assert set(m["settings"]) == expected
    for setting in m["settings"].values():
        assert set(setting) == {"alone", "contended"}
        assert all(x["median_ms"] > 0 and x["queries_per_s"] > 0 for x in setting.values())
