"""bench/openvino_head.py runs end to end (--quick) and its --demo agreement reads a demo-layout folder; no
timing thresholds. Skipped without OpenVINO (the `openvino` extra)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("torch")  # the random models are exported with PyTorch


def test_quick_run_reports_every_contender(tmp_path):
    from bench.openvino_head import SEARCHES, main

    out = tmp_path / "openvino_head.json"
    argv = ["--quick", "--images", "64", "--rounds", "2", "--agreement-queries", "4", "--json", str(out)]
    assert main([*argv, "--cache", str(tmp_path)]) == 0
    r = json.loads(out.read_text())
    rows = r["contenders"]
    assert {"ort_fp32", "ov_bf16_gallery", "ov_fp32", *SEARCHES} <= set(rows)
    assert rows["ort_fp32"]["top10_agreement"] == 1.0 and rows["ort_fp32"]["max_abs_score_diff"] == 0.0
    for name, c in rows.items():
        assert c["p50_ms"] > 0 and 0.0 <= c["top10_agreement"] <= 1.0, name
    assert "demo_agreement" not in r  # only with --demo


def test_demo_agreement_on_a_demo_layout(tmp_path, tiny_demo):
    from bench.openvino_head import demo_agreement
    from tests.runtime.conftest import make_gallery, random_captions, random_regions

    make_gallery(tiny_demo / "engines" / "scan.json", tmp_path / "gallery")
    data = tmp_path / "data" / "demo_precomp"
    data.mkdir(parents=True)
    (data / "test_caps.txt").write_text("\n".join(random_captions(7, seed=5)) + "\n")
    np.save(data / "test_ims.npy", random_regions(3, seed=6))
    (tmp_path / "engines").symlink_to(tiny_demo / "engines")

    got = demo_agreement(tmp_path, captions=5, images=3)
    assert set(got) == {"text_to_image", "image_to_text"}
    assert got["text_to_image"]["queries"] == 5 and got["image_to_text"]["queries"] == 3
    for d in got.values():
        assert 0.0 <= d["top10_agreement"] <= 1.0 and 0.0 <= d["top1_equal"] <= 1.0
        # bf16 keeps 8 significant bits: the scores move, but little (unit-norm cosines, averaged)
        assert 0.0 < d["max_abs_score_diff"] < 0.05


def test_demo_agreement_names_a_folder_that_is_not_a_demo(tmp_path):
    from bench import harness
    from bench.openvino_head import demo_agreement

    with pytest.raises(harness.ArgumentError, match="--demo"):
        demo_agreement(tmp_path)
