"""export/build_engine.py, in process through ``main([...])``.

Without TensorRT it must exit 2 saying what to install and that the ONNX graphs serve meanwhile.
The build logic (strategy per TensorRT version, float32 pins, profiles, timing cache, parse errors,
manifest records) is driven against the fake ``tensorrt`` of tests/fake_tensorrt.py;
it checks this code's calls and bookkeeping, not TensorRT itself.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from export.build_engine import main
from runtime.manifest import load_manifest, write_manifest
from tests.fake_tensorrt import FakeAllocator, copy_export, install_fakes, make_fake_trt
from tests.helpers import minimal_manifest

ARGS = ["--max-batch", "16", "--block", "64", "--max-words", "40"]


@pytest.fixture
def manifest(t2i_export: Path, tmp_path: Path) -> Path:
    return copy_export(t2i_export, tmp_path)


# ------------------------------------------------------------------------------------------ exit 2


def test_without_tensorrt_exits_2_with_help(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # ``import tensorrt`` raises ImportError
    path = minimal_manifest(tmp_path)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err
    assert "pip install tensorrt" in err and "NVIDIA GPU and driver" in err
    assert f"runtime/search.py --engine {path}" in err


def test_without_gpu_exits_2(monkeypatch, tmp_path: Path, capsys) -> None:
    import runtime.backends.cuda_memory as backend_mod

    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt())

    def no_gpu():
        raise backend_mod.BackendError("no CUDA GPU is visible (cudaGetDeviceCount returned 0)")

    monkeypatch.setattr(backend_mod, "open_allocator", no_gpu)
    assert main([str(minimal_manifest(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "pip install tensorrt" in err and "runtime/search.py" in err


def test_builder_without_gpu_exits_2(monkeypatch, manifest: Path, capsys) -> None:
    install_fakes(monkeypatch, trt=make_fake_trt(has_gpu=False))
    assert main([str(manifest), *ARGS]) == 2
    assert "trt.Builder failed" in capsys.readouterr().err


def test_old_tensorrt_exits_2(monkeypatch, tmp_path: Path, capsys) -> None:
    install_fakes(monkeypatch, trt=make_fake_trt(version="9.3.0"))
    assert main([str(minimal_manifest(tmp_path))]) == 2
    assert "TensorRT 9.3.0 is not supported" in capsys.readouterr().err


def test_missing_manifest_exits_1(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path / "nope.json")]) == 1
    assert "no such file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ TensorRT 10


def test_tensorrt10_fp16_build(monkeypatch, manifest: Path, tmp_path: Path, capsys) -> None:
    trt, _ = install_fakes(monkeypatch)
    cache = tmp_path / "cache" / "timing.cache"
    assert main([str(manifest), *ARGS, "--timing-cache", str(cache), "--topk-max", "7"]) == 0
    out = capsys.readouterr().out
    assert "strategy fp16-flag" in out and "done" in out and "pinned to float32" in out
    m = load_manifest(manifest)
    engines = m.plans
    assert sorted(engines) == ["head", "image", "text", "topk"]
    for kind, file in (
        ("head", "scan.plan"),
        ("text", "scan.text.plan"),
        ("image", "scan.image.plan"),
        ("topk", "scan.topk.plan"),
    ):
        rec = engines[kind]
        plan = manifest.parent / file
        assert rec["file"] == file and hashlib.sha256(plan.read_bytes()).hexdigest() == rec["sha256"]
        assert rec["precision"] == "fp16" and rec["strategy"] == "fp16-flag"
        assert rec["tensorrt_version"] == "10.9.0" and rec["gpu_name"] == "NVIDIA H200"
        assert rec["compute_capability"] == "9.0"
        source = "head" if kind == "topk" else kind
        assert rec["source_key"] == source
        assert rec["source_sha256"] == m.graphs[source]["sha256"]
    assert engines["topk"]["topk_max"] == 7
    assert engines["head"]["profiles"]["captions"] == {"min": [1, 1, 32], "opt": [8, 16, 32], "max": [16, 40, 32]}
    assert engines["text"]["profiles"]["ids"]["max"] == [16, 40]
    assert not list(manifest.parent.glob("*.tmp")) and not list(manifest.parent.glob(".*.tmp"))
    # builder configuration: FP16 + obeyed constraints, TF32 off; profile shapes as recorded
    assert len(trt.builds) == 4
    for build in trt.builds:
        assert {"FP16", "OBEY_PRECISION_CONSTRAINTS"} <= build["config"].flags
        assert "TF32" not in build["config"].flags
        assert build["network"].flags == 0
    head = trt.builds[0]
    assert head["config"].profiles[0].shapes["images"] == ([1, 36, 32], [64, 36, 32], [64, 36, 32])
    pinned = {l.type.name + ":" + str(l._op) for l in head["network"].layers if l.precision is not None}
    loose = {l.type.name + ":" + str(l._op) for l in head["network"].layers if l.precision is None}
    assert {"UNARY:EXP", "UNARY:LOG", "ELEMENTWISE:DIV", "REDUCE:None"} <= pinned
    assert "MATRIX_MULTIPLY:None" in loose and "MATRIX_MULTIPLY:None" not in pinned
    for layer in head["network"].layers:
        if layer.precision is not None:
            assert layer.precision == trt.float32
            assert set(layer.output_types.values()) == {trt.float32}
    # the timing cache was loaded and saved, atomically, after every engine
    assert cache.read_bytes() == b"+tuned" * 4
    assert main([str(manifest), *ARGS, "--timing-cache", str(cache), "--kinds", "text"]) == 0
    assert cache.read_bytes() == b"+tuned" * 5


def test_fp32_build(monkeypatch, manifest: Path) -> None:
    trt, _ = install_fakes(monkeypatch)
    assert main([str(manifest), *ARGS, "--fp32", "--kinds", "head"]) == 0
    rec = load_manifest(manifest).plans["head"]
    assert rec["precision"] == "fp32" and rec["strategy"] == "fp32"
    config = trt.builds[0]["config"]
    assert "FP16" not in config.flags and "TF32" not in config.flags
    assert all(layer.precision is None for layer in trt.builds[0]["network"].layers)


def test_out_folder_is_recorded_relative(monkeypatch, manifest: Path, tmp_path: Path) -> None:
    install_fakes(monkeypatch)
    out = tmp_path / "plans"
    assert main([str(manifest), *ARGS, "--kinds", "image", "--out", str(out)]) == 0
    rec = load_manifest(manifest).plans["image"]
    assert (manifest.parent / rec["file"]).resolve() == (out / "scan.image.plan").resolve()
    from runtime.backends.tensorrt import TensorRTBackend

    with TensorRTBackend.from_manifest(load_manifest(manifest), "image") as backend:
        assert [t.name for t in backend.outputs] == ["images", "image_gram"]


def test_parse_errors_are_all_reported(monkeypatch, manifest: Path, capsys) -> None:
    trt, _ = install_fakes(monkeypatch)
    trt.parse_errors = ["GRU: sequence_lens not supported", "Loop: bad trip count"]
    assert main([str(manifest), *ARGS, "--kinds", "text"]) == 1
    err = capsys.readouterr().err
    assert "parse_from_file" in err and "failed with 2 error(s)" in err
    assert "GRU: sequence_lens not supported" in err and "Loop: bad trip count" in err
    assert not load_manifest(manifest).plans


def test_failed_build_is_reported(monkeypatch, manifest: Path, capsys) -> None:
    trt, _ = install_fakes(monkeypatch)
    trt.fail_build = True
    assert main([str(manifest), *ARGS, "--kinds", "head"]) == 1
    assert "build_serialized_network returned None" in capsys.readouterr().err
    assert not (manifest.parent / "scan.plan").exists()


def test_changed_graph_is_refused(monkeypatch, manifest: Path, capsys) -> None:
    install_fakes(monkeypatch)
    (manifest.parent / "scan.onnx").write_bytes((manifest.parent / "scan.onnx").read_bytes() + b"\0")
    assert main([str(manifest), *ARGS, "--kinds", "head"]) == 1
    assert "sha256 differs" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--kinds", "head,vision"], "unknown plan kind"),
        (["--block", "0"], "block"),
        (["--topk-max", "0", "--kinds", "topk"], "k_max"),
        (["--workspace-gb", "0"], "--workspace-gb"),
    ],
)
def test_bad_flags_exit_1(monkeypatch, manifest: Path, capsys, argv, needle) -> None:
    install_fakes(monkeypatch)
    assert main([str(manifest), *ARGS, *argv]) == 1
    assert needle in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ TensorRT 11


def test_tensorrt11_needs_fp16_graphs(monkeypatch, manifest: Path, capsys) -> None:
    install_fakes(monkeypatch, trt=make_fake_trt(version="11.0.1"))
    data = json.loads(manifest.read_text())
    data["graphs"] = {k: v for k, v in data["graphs"].items() if not k.endswith(".fp16")}  # an fp32-only export
    write_manifest(manifest, data)
    assert main([str(manifest), *ARGS, "--kinds", "head"]) == 1
    err = capsys.readouterr().err
    assert "no fp16 head graph" in err and "--fp32" in err


def test_tensorrt11_strongly_typed_from_fp16_graphs(monkeypatch, manifest: Path, capsys) -> None:
    trt, _ = install_fakes(monkeypatch, trt=make_fake_trt(version="11.0.1"))
    assert main([str(manifest), *ARGS]) == 0
    assert "strategy strongly-typed" in capsys.readouterr().out
    engines = load_manifest(manifest).plans
    assert engines["head"]["source_graph"] == "scan.fp16.onnx" and engines["head"]["source_key"] == "head.fp16"
    assert engines["topk"]["source_key"] == "head.fp16" and engines["text"]["source_graph"] == "scan.text.fp16.onnx"
    assert {r["strategy"] for r in engines.values()} == {"strongly-typed"}
    for build in trt.builds:
        assert build["network"].flags == 1 << 1  # STRONGLY_TYPED
        assert "FP16" not in build["config"].flags  # TensorRT 11 has no such flag
        assert all(layer.precision is None for layer in build["network"].layers)  # not allowed when strongly typed
    from runtime.backends.tensorrt import TensorRTBackend

    with TensorRTBackend.from_manifest(load_manifest(manifest), "head") as head:
        assert head.precision == "fp16"


def test_engine_built_for_other_gpu_is_refused_after_build(monkeypatch, manifest: Path) -> None:
    install_fakes(monkeypatch)
    assert main([str(manifest), *ARGS, "--kinds", "text"]) == 0
    install_fakes(monkeypatch, allocator=FakeAllocator(gpu=("NVIDIA A100-SXM4-80GB", "8.0")))
    from runtime.backends.plan_check import PlanMismatchError
    from runtime.backends.tensorrt import TensorRTBackend

    with pytest.raises(PlanMismatchError, match="A100"):
        TensorRTBackend.from_manifest(load_manifest(manifest), "text")
