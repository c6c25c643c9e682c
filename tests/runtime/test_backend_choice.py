"""--backend auto|tensorrt|onnxruntime: selection and fallback, without TensorRT installed."""

from __future__ import annotations

import dataclasses
import json

import pytest

import runtime.backends as backends
from runtime.backends import BackendError, choose_backend
from runtime.manifest import load_manifest
from runtime.search import main as search


@pytest.fixture
def manifest(small_engines):
    return load_manifest(small_engines["t2i"])


def test_onnx_engine_and_manifest_use_onnxruntime(manifest, caplog):
    assert choose_backend("auto", manifest.path, manifest) == "onnxruntime"
    assert choose_backend("auto", manifest.directory / "scan.onnx", manifest) == "onnxruntime"
    assert choose_backend("onnxruntime", manifest.directory / "scan.plan", manifest) == "onnxruntime"
    assert "falling back" not in caplog.text


def test_auto_falls_back_from_plan_with_a_warning(manifest, monkeypatch, caplog):
    monkeypatch.setattr(backends, "tensorrt_available", lambda: False)
    assert choose_backend("auto", manifest.directory / "scan.plan", manifest) == "onnxruntime"
    assert "TensorRT is not installed" in caplog.text and "falling back" in caplog.text


def test_tensorrt_requested_without_tensorrt_is_an_error(manifest, monkeypatch):
    monkeypatch.setattr(backends, "tensorrt_available", lambda: False)
    with pytest.raises(BackendError, match="pip install tensorrt"):
        choose_backend("tensorrt", manifest.directory / "scan.plan", manifest)


@pytest.mark.parametrize("key", ["plans", "engines"])  # "engines": manifests written before the rename
def test_tensorrt_chosen_only_when_plans_are_recorded(manifest, monkeypatch, caplog, key):
    monkeypatch.setattr(backends, "tensorrt_available", lambda: True)
    assert choose_backend("auto", manifest.directory / "scan.plan", manifest) == "onnxruntime"
    assert "lists no plans" in caplog.text
    with pytest.raises(BackendError, match=r"build_engine\.py"):
        choose_backend("tensorrt", manifest.directory / "scan.plan", manifest)
    data = {k: v for k, v in json.loads(manifest.path.read_text()).items() if k not in ("plans", "engines")}
    built = dataclasses.replace(manifest, data={**data, key: {"head": {"file": "scan.plan"}}})
    assert built.plans == {"head": {"file": "scan.plan"}}
    assert choose_backend("auto", manifest.directory / "scan.plan", built) == "tensorrt"
    assert choose_backend("tensorrt", manifest.path, built) == "tensorrt"


def test_unknown_backend(manifest):
    with pytest.raises(BackendError, match="unknown backend 'cuda'"):
        choose_backend("cuda", manifest.path, manifest)


def test_search_cli_with_unbuilt_plan_serves_onnx(small_engines, tmp_path, monkeypatch, capsys, caplog):
    """`--engine engines/scan.plan` on a machine without TensorRT: a warning, then ONNX Runtime serves."""
    monkeypatch.setattr(backends, "tensorrt_available", lambda: False)
    import numpy as np

    np.save(tmp_path / "ims.npy", np.random.default_rng(0).standard_normal((4, 5, 12)).astype(np.float32))
    plan = small_engines["t2i"].parent / "scan.plan"
    assert not plan.exists()
    assert (
        search(
            [
                "--engine",
                str(plan),
                "--gallery",
                str(tmp_path / "g"),
                "--images",
                str(tmp_path / "ims.npy"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert search(["--engine", str(plan), "--gallery", str(tmp_path / "g"), "--json", "-k", "2", "a dog"]) == 0
    assert "falling back" in caplog.text
    assert len(json.loads(capsys.readouterr().out)[0]["results"]) == 2
