"""export/trt_build.py (profiles, precision strategy, layer pinning, plan records, the device top-k graph,
checked in ONNX Runtime), the manifest's plan naming and atomic update (runtime/manifest.py), and the
serve-time refusal of a plan that does not fit (runtime/backends/plan_check.py).

No TensorRT needed: everything here is pure logic or ONNX.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from export.trt_build import (
    FP16_FLAG,
    FP32,
    STRONGLY_TYPED,
    LayerInfo,
    ProfileError,
    TensorRTVersionError,
    add_topk_to_head,
    compute_profiles,
    exp_island_layers,
    fp32_layers,
    loop_body_layers,
    parse_trt_version,
    plan_record,
    precision_strategy,
    source_graph_key,
    strategy_precision,
)
from runtime.backends.base import BackendError
from runtime.backends.onnxruntime import open_session
from runtime.backends.plan_check import PlanError, PlanMismatchError, check_plan_record
from runtime.manifest import ManifestError, load_manifest, plan_file_name, record_plans, relative_file, write_manifest
from tests.fake_tensorrt import copy_export, export_golden

ROOT = Path(__file__).resolve().parents[2]

# The manifest's graph entries as export/exporter.py writes them (embed 32, img_dim 64).
T2I_HEAD = [
    {"name": "images", "dtype": "float32", "shape": ["N", "R", 32]},
    {"name": "image_gram", "dtype": "float32", "shape": ["N", "R", "R"]},
    {"name": "captions", "dtype": "float32", "shape": ["Q", "L", 32]},
    {"name": "lengths", "dtype": "int64", "shape": ["Q"]},
]
I2T_HEAD = [e for e in T2I_HEAD if e["name"] != "image_gram"]
TEXT = [{"name": "ids", "dtype": "int64", "shape": ["Q", "L"]}, {"name": "lengths", "dtype": "int64", "shape": ["Q"]}]
IMAGE = [{"name": "regions", "dtype": "float32", "shape": ["N", "R", 64]}]


@pytest.fixture(scope="module")
def t2i_manifest_path(tmp_path_factory) -> Path:
    return export_golden("t2i_lse_f30k", tmp_path_factory.mktemp("t2i"))


# ------------------------------------------------------------------------------------------ profiles


def test_profiles_t2i_head() -> None:
    p = compute_profiles(T2I_HEAD, max_batch=32, max_words=128, block=512)
    assert p["images"] == {"min": [1, 36, 32], "opt": [512, 36, 32], "max": [512, 36, 32]}
    assert p["image_gram"] == {"min": [1, 36, 36], "opt": [512, 36, 36], "max": [512, 36, 36]}
    assert p["captions"] == {"min": [1, 1, 32], "opt": [8, 16, 32], "max": [32, 128, 32]}
    assert p["lengths"] == {"min": [1], "opt": [8], "max": [32]}


def test_profiles_i2t_head_has_no_gram() -> None:
    p = compute_profiles(I2T_HEAD, max_batch=4, max_words=10, block=64, regions=20)
    assert sorted(p) == ["captions", "images", "lengths"]
    # opt is clipped to max for small limits
    assert p["captions"] == {"min": [1, 1, 32], "opt": [4, 10, 32], "max": [4, 10, 32]}
    assert p["images"] == {"min": [1, 20, 32], "opt": [64, 20, 32], "max": [64, 20, 32]}


def test_profiles_text_and_image_graphs() -> None:
    text = compute_profiles(TEXT, max_batch=256, max_words=64, block=512)
    assert text == {
        "ids": {"min": [1, 1], "opt": [8, 16], "max": [256, 64]},
        "lengths": {"min": [1], "opt": [8], "max": [256]},
    }
    image = compute_profiles(IMAGE, max_batch=256, max_words=64, block=128)
    assert image == {"regions": {"min": [1, 36, 64], "opt": [128, 36, 64], "max": [128, 36, 64]}}


def test_profiles_from_a_real_manifest(t2i_manifest_path: Path) -> None:
    m = load_manifest(t2i_manifest_path)
    for kind in ("head", "text", "image"):
        g = m.graph(kind)
        p = compute_profiles(g["inputs"], max_words=m.max_words)
        assert sorted(p) == sorted(e["name"] for e in g["inputs"])
        for bounds in p.values():
            assert all(a <= b <= c for a, b, c in zip(bounds["min"], bounds["opt"], bounds["max"]))


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"max_batch": 0}, "max_batch"),
        ({"max_batch": True}, "max_batch"),
        ({"block": -1}, "block"),
        ({"max_words": 2.5}, "max_words"),
        ({"regions": 0}, "regions"),
    ],
)
def test_profile_flags_are_validated(kwargs, needle) -> None:
    args = {"max_batch": 8, "max_words": 16, "block": 8, **kwargs}
    with pytest.raises(ProfileError, match=needle):
        compute_profiles(T2I_HEAD, **args)


def test_profile_unknown_dimension_is_named() -> None:
    with pytest.raises(ProfileError, match=r"'x'.*'B'"):
        compute_profiles([{"name": "x", "shape": ["B", 3]}], max_words=8)
    with pytest.raises(ProfileError, match="neither"):
        compute_profiles([{"name": "x", "shape": [0]}], max_words=8)


# ------------------------------------------------------------------------------------------ precision


@pytest.mark.parametrize(
    "version, strategy",
    [
        ("10.9.0", FP16_FLAG),
        ("10.0.1.6", FP16_FLAG),
        ("10.13.3.9+cuda12.9", FP16_FLAG),
        ("11.0.1", STRONGLY_TYPED),
        ("11.4.0rc1", STRONGLY_TYPED),
        ("12.0", STRONGLY_TYPED),
    ],
)
def test_precision_strategy_per_version(version, strategy) -> None:
    assert precision_strategy(version) == strategy
    assert precision_strategy(version, fp32=True) == FP32


@pytest.mark.parametrize("version", ["9.3", "8.6.1"])
def test_old_tensorrt_is_refused(version) -> None:
    with pytest.raises(TensorRTVersionError, match=rf"TensorRT {version} is not supported.*10\.x"):
        precision_strategy(version)


def test_unreadable_version() -> None:
    with pytest.raises(TensorRTVersionError, match="cannot read"):
        parse_trt_version("banana")
    assert parse_trt_version("10.9.0.34") == (10, 9, 0, 34)
    assert issubclass(TensorRTVersionError, BackendError)


def test_source_graph_and_precision() -> None:
    assert source_graph_key("head", FP16_FLAG) == "head"  # TensorRT 10: the fp32 graph + FP16 flag
    assert source_graph_key("text", STRONGLY_TYPED) == "text.fp16"
    assert source_graph_key("topk", STRONGLY_TYPED) == "head.fp16"
    assert source_graph_key("topk", FP32) == "head"
    assert [strategy_precision(s) for s in (FP16_FLAG, STRONGLY_TYPED, FP32)] == ["fp16", "fp16", "fp32"]
    with pytest.raises(PlanError, match="unknown plan kind"):
        source_graph_key("vision", FP32)


# ------------------------------------------------------------------------------------------ layers


def _layer(i, type_, op=None, ins=(), outs=None, float_outputs=True):
    return LayerInfo(i, f"l{i}", type_, op, tuple(ins), tuple(outs if outs is not None else (f"t{i}",)), float_outputs)


def test_sensitive_layers_pinned_and_gemm_left_fp16() -> None:
    layers = [
        _layer(0, "MATRIX_MULTIPLY", ins=("a", "b")),
        _layer(1, "ELEMENTWISE", "POW", ins=("t0",)),
        _layer(2, "REDUCE", ins=("t1",)),
        _layer(3, "UNARY", "SQRT", ins=("t2",)),
        _layer(4, "ELEMENTWISE", "DIV", ins=("t0", "t3")),
        _layer(5, "SOFTMAX", ins=("t4",)),
        _layer(6, "UNARY", "EXP", ins=("t5",)),
        _layer(7, "UNARY", "LOG", ins=("t6",)),
        _layer(8, "ELEMENTWISE", "PROD", ins=("t7",)),
        _layer(9, "ACTIVATION", ins=("t8",)),
        _layer(10, "SHAPE", ins=("t9",), float_outputs=False),
        _layer(11, "REDUCE", ins=("mask",), float_outputs=False),  # an int reduction: no float precision
        _layer(12, "UNARY", None, ins=("t9",)),  # op unreadable: pinned to be safe
        _layer(13, "CAST", ins=("t9",)),
        _layer(14, "UNARY", "ABS", ins=("t9",)),
    ]
    # 8, 9 and 14 follow the exp with no division in between (exp_island_layers); the CAST never is pinned
    assert fp32_layers(layers) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 14]


def test_attention_weights_stay_float32_until_the_cosine_divides() -> None:
    """The float32 head's chain from exp(lambda * x) (up to e^30, unshifted) to the cosine: everything in
    between is pinned (products, sums, the Gram GEMM), the logits GEMM before it and the layers after the
    division are not."""
    layers = [
        _layer(0, "MATRIX_MULTIPLY", ins=("captions", "images"), outs=("s",)),
        _layer(1, "ELEMENTWISE", "PROD", ins=("s", "lam"), outs=("logits",)),
        _layer(2, "UNARY", "EXP", ins=("logits",), outs=("e",)),
        _layer(3, "ELEMENTWISE", "PROD", ins=("e", "s"), outs=("es",)),
        _layer(4, "REDUCE", ins=("es",), outs=("dot",)),
        _layer(5, "SHUFFLE", ins=("e",), outs=("et",)),
        _layer(6, "MATRIX_MULTIPLY", ins=("et", "image_gram"), outs=("ge",)),
        _layer(7, "ELEMENTWISE", "PROD", ins=("et", "ge"), outs=("ege",)),
        _layer(8, "REDUCE", ins=("ege",), outs=("ctx_sq",)),
        _layer(9, "UNARY", "SQRT", ins=("ctx_sq",), outs=("ctx",)),
        _layer(10, "ELEMENTWISE", "PROD", ins=("word_norm", "ctx"), outs=("den",)),
        _layer(11, "REDUCE", ins=("e",), outs=("z",)),
        _layer(12, "ELEMENTWISE", "PROD", ins=("z", "eps"), outs=("z_eps",)),
        _layer(13, "ELEMENTWISE", "MAX", ins=("den", "z_eps"), outs=("m",)),
        _layer(14, "ELEMENTWISE", "DIV", ins=("dot", "m"), outs=("cos",)),
        _layer(15, "ELEMENTWISE", "PROD", ins=("cos", "mask"), outs=("masked",)),
        _layer(16, "MATRIX_MULTIPLY", ins=("masked", "w"), outs=("y",)),
    ]
    assert exp_island_layers(layers) == set(range(2, 15))
    assert fp32_layers(layers) == list(range(2, 15))


def test_gru_loop_body_is_pinned() -> None:
    # x -> [ITERATOR] -> xt; h -> [RECURRENCE] -> ht; MATMUL(xt, W) + MATMUL(ht, U) -> sigmoid -> h'
    # h' feeds the recurrence back and leaves through LOOP_OUTPUT; a MATMUL after the loop is fp16.
    layers = [
        _layer(0, "TRIP_LIMIT", ins=("T",), outs=(), float_outputs=False),
        _layer(1, "ITERATOR", ins=("x",), outs=("xt",)),
        _layer(2, "RECURRENCE", ins=("h0", "hn"), outs=("ht",)),
        _layer(3, "MATRIX_MULTIPLY", ins=("xt", "W"), outs=("a",)),
        _layer(4, "MATRIX_MULTIPLY", ins=("ht", "U"), outs=("b",)),
        _layer(5, "ELEMENTWISE", "SUM", ins=("a", "b"), outs=("c",)),
        _layer(6, "ACTIVATION", ins=("c",), outs=("hn",)),
        _layer(7, "LOOP_OUTPUT", ins=("hn",), outs=("H",)),
        _layer(8, "MATRIX_MULTIPLY", ins=("H", "V"), outs=("y",)),
        _layer(9, "CONSTANT", ins=(), outs=("W",)),
    ]
    assert loop_body_layers(layers) == {0, 1, 2, 3, 4, 5, 6, 7}
    assert fp32_layers(layers) == [1, 2, 3, 4, 5, 6, 7]


# ------------------------------------------------------------------------------------------ names, records


def test_plan_file_names() -> None:
    assert plan_file_name("scan", "head") == "scan.plan"
    assert plan_file_name("scan", "text") == "scan.text.plan"
    assert plan_file_name("scan", "image") == "scan.image.plan"
    assert plan_file_name("coco", "topk") == "coco.topk.plan"
    with pytest.raises(ManifestError, match="unknown plan kind"):
        plan_file_name("scan", "plan")


def _fake_plan(manifest_path: Path, kind: str, payload: bytes, **over) -> dict:
    """Write a plan file beside the manifest and record it as if build_engine.py had built it."""
    m = load_manifest(manifest_path)
    target = m.directory / plan_file_name(m.name, kind)
    target.write_bytes(payload)
    key = over.pop("source_key", source_graph_key(kind, FP16_FLAG))
    graph = m.graphs.get(key) or m.graphs[source_graph_key(kind, FP16_FLAG)]
    rec = plan_record(
        file=relative_file(m.directory, target),
        sha256=hashlib.sha256(payload).hexdigest(),
        source_key=key,
        source_graph=graph,
        strategy=FP16_FLAG,
        tensorrt_version="10.9.0",
        gpu_name="NVIDIA H200",
        compute_capability="9.0",
        profiles=compute_profiles(graph["inputs"], max_words=m.max_words),
    )
    rec.update(over)
    record_plans(manifest_path, {kind: rec})
    return rec


@pytest.fixture
def manifest_copy(t2i_manifest_path: Path, tmp_path: Path) -> Path:
    """A private copy of the export (manifest + graphs) that a test may modify."""
    return copy_export(t2i_manifest_path, tmp_path)


def test_record_round_trip_keeps_everything_else(manifest_copy: Path) -> None:
    before = json.loads(manifest_copy.read_text())
    rec = _fake_plan(manifest_copy, "head", b"plan-bytes")
    rec_text = _fake_plan(manifest_copy, "text", b"text-plan")
    after = json.loads(manifest_copy.read_text())
    assert after["plans"] == {"head": rec, "text": rec_text}
    assert {k: v for k, v in after.items() if k != "plans"} == {k: v for k, v in before.items() if k != "plans"}
    assert rec["file"] == "scan.plan" and rec["source_graph"] == "scan.onnx"
    assert rec["source_sha256"] == before["graphs"]["head"]["sha256"]
    assert rec["precision"] == "fp16" and rec["strategy"] == FP16_FLAG
    assert set(rec) >= {
        "file",
        "sha256",
        "source_graph",
        "source_sha256",
        "precision",
        "strategy",
        "tensorrt_version",
        "gpu_name",
        "compute_capability",
        "profiles",
        "built_at",
    }
    assert rec["profiles"]["images"]["max"] == [512, 36, 32]
    # the record verifies against the machine it was "built" on
    plan = check_plan_record(load_manifest(manifest_copy), "head", "10.9.0", "NVIDIA H200", "9.0")
    assert plan == manifest_copy.parent / "scan.plan"
    # rebuilding replaces the record rather than adding another
    _fake_plan(manifest_copy, "head", b"plan-bytes-2")
    assert sorted(json.loads(manifest_copy.read_text())["plans"]) == ["head", "text"]
    assert not list(manifest_copy.parent.glob("*.tmp"))


def test_record_plans_rejects_unknown_kind_and_bad_json(tmp_path: Path) -> None:
    p = tmp_path / "scan.json"
    p.write_text("{not json")
    with pytest.raises(ManifestError, match="cannot re-read"):
        record_plans(p, {"head": {}})
    with pytest.raises(ManifestError, match="unknown plan kind"):
        record_plans(p, {"vision": {}})


def test_legacy_engines_key_is_read_and_moved_to_plans(manifest_copy: Path) -> None:
    """Manifests written before the rename list their plans under "engines": still served, moved on update."""
    rec = _fake_plan(manifest_copy, "head", b"plan-bytes")
    data = json.loads(manifest_copy.read_text())
    data["engines"] = data.pop("plans")
    manifest_copy.write_text(json.dumps(data))
    m = load_manifest(manifest_copy)
    assert m.plans == {"head": rec} and m.plan("head") == rec
    assert check_plan_record(m, "head", "10.9.0", "NVIDIA H200", "9.0") == manifest_copy.parent / "scan.plan"
    rec_text = _fake_plan(manifest_copy, "text", b"text-plan")
    after = json.loads(manifest_copy.read_text())
    assert "engines" not in after and after["plans"] == {"head": rec, "text": rec_text}


def test_plan_outside_manifest_folder_is_relative(tmp_path: Path) -> None:
    rel = relative_file(tmp_path / "engines", tmp_path / "plans" / "scan.plan")
    assert rel == os.path.join("..", "plans", "scan.plan")


@pytest.mark.parametrize(
    "args, needles",
    [
        (("11.0.1", "NVIDIA H200", "9.0"), ["built by TensorRT 10.9.0", "this is TensorRT 11.0.1"]),
        (("10.9.0", "NVIDIA A100-SXM4-80GB", "8.0"), ["compute capability 9.0", "A100", "compute capability 8.0"]),
        (("10.9.0", "NVIDIA H100 80GB HBM3", "9.0"), ["built on a NVIDIA H200", "H100"]),
    ],
)
def test_mismatched_engine_is_refused(manifest_copy: Path, args, needles) -> None:
    _fake_plan(manifest_copy, "head", b"plan")
    with pytest.raises(PlanMismatchError) as e:
        check_plan_record(load_manifest(manifest_copy), "head", *args)
    msg = str(e.value)
    for n in needles:
        assert n in msg
    assert "python export/build_engine.py" in msg and str(manifest_copy) in msg
    assert isinstance(e.value, BackendError)


def test_engine_from_another_graph_is_refused(manifest_copy: Path) -> None:
    _fake_plan(manifest_copy, "head", b"plan")
    data = json.loads(manifest_copy.read_text())
    data["graphs"]["head"]["sha256"] = "ab" * 32  # as if the model had been re-exported
    write_manifest(manifest_copy, data)
    with pytest.raises(PlanMismatchError, match=r"re-exported.*build_engine\.py"):
        check_plan_record(load_manifest(manifest_copy), "head", "10.9.0", "NVIDIA H200", "9.0")


def test_engine_whose_graph_is_gone_is_refused(manifest_copy: Path) -> None:
    _fake_plan(manifest_copy, "head", b"plan", source_key="head.fp16")
    data = json.loads(manifest_copy.read_text())
    del data["graphs"]["head.fp16"]  # e.g. re-exported without fp16 graphs after the build
    write_manifest(manifest_copy, data)
    with pytest.raises(PlanMismatchError, match=r"head\.fp16 graph, which scan\.json no longer lists"):
        check_plan_record(load_manifest(manifest_copy), "head", "10.9.0", "NVIDIA H200", "9.0")


def test_replaced_plan_file_is_refused(manifest_copy: Path) -> None:
    _fake_plan(manifest_copy, "text", b"plan")
    (manifest_copy.parent / "scan.text.plan").write_bytes(b"another plan")
    with pytest.raises(PlanMismatchError, match=r"sha256 .* differs .*replaced or damaged"):
        check_plan_record(load_manifest(manifest_copy), "text", "10.9.0", "NVIDIA H200", "9.0")
    (manifest_copy.parent / "scan.text.plan").unlink()
    with pytest.raises(PlanMismatchError, match="missing"):
        check_plan_record(load_manifest(manifest_copy), "text", "10.9.0", "NVIDIA H200", "9.0")


def test_no_plan_recorded(manifest_copy: Path) -> None:
    assert load_manifest(manifest_copy).topk_max == 0
    with pytest.raises(PlanMismatchError, match=r"lists no TensorRT image plan.*build_engine\.py"):
        check_plan_record(load_manifest(manifest_copy), "image", "10.9.0", "NVIDIA H200", "9.0")


# ------------------------------------------------------------------------------------------ device top-k


def _head_feeds(rng, n: int, q: int, lengths=None, gram: bool = True) -> dict:
    images = rng.standard_normal((n, 36, 32)).astype(np.float32)
    images /= np.linalg.norm(images, axis=-1, keepdims=True)
    lengths = np.array(lengths if lengths is not None else rng.integers(1, 12, q), np.int64)
    words = rng.standard_normal((q, int(lengths.max()), 32)).astype(np.float32)
    words *= (np.arange(words.shape[1])[None, :] < lengths[:, None])[..., None]
    feeds = {"images": images, "captions": words, "lengths": lengths}
    if gram:
        feeds["image_gram"] = images @ images.transpose(0, 2, 1)
    return feeds


@pytest.mark.parametrize("n, k_max", [(40, 10), (7, 10), (10, 10), (1, 5), (25, 1)])
def test_topk_head_matches_numpy(t2i_manifest_path: Path, n: int, k_max: int) -> None:
    head = t2i_manifest_path.parent / "scan.onnx"
    plain = open_session(head)
    topk = open_session(add_topk_to_head(head, k_max).SerializeToString())
    assert [o.name for o in topk.get_outputs()] == ["topk_scores", "topk_index"]
    feeds = _head_feeds(np.random.default_rng(n * 100 + k_max), n, q=6)
    sims = plain.run(["sims"], feeds)[0]  # (N, Q)
    scores, index = topk.run(None, feeds)
    k = min(k_max, n)
    assert scores.shape == (k, 6) and index.shape == (k, 6) and index.dtype == np.int64
    expected = np.argsort(-sims, axis=0, kind="stable")[:k]  # best image first, per caption
    np.testing.assert_array_equal(index, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(sims, expected, axis=0), rtol=1e-6, atol=1e-6)


def test_topk_accepts_bytes_and_modelproto(t2i_manifest_path: Path) -> None:
    import onnx

    head = t2i_manifest_path.parent / "scan.onnx"
    a = add_topk_to_head(head.read_bytes(), 3)
    b = add_topk_to_head(onnx.load(str(head)), 3)
    assert a.SerializeToString() == b.SerializeToString()
    ops = [n.op_type for n in a.graph.node[-5:]]
    assert ops == ["Shape", "Gather", "Min", "Reshape", "TopK"]
    # the input model is not modified
    assert [o.name for o in onnx.load(str(head)).graph.output] == ["sims"]


def test_topk_bad_arguments(t2i_manifest_path: Path) -> None:
    head = t2i_manifest_path.parent / "scan.onnx"
    with pytest.raises(ProfileError, match="k_max"):
        add_topk_to_head(head, 0)
    with pytest.raises(ProfileError, match="3840"):
        add_topk_to_head(head, 5000)
    with pytest.raises(PlanError, match="no output 'sims'"):
        add_topk_to_head(t2i_manifest_path.parent / "scan.text.onnx", 3)  # not the head
    with pytest.raises(PlanError, match="expected ONNX bytes"):
        add_topk_to_head(42, 3)


def test_topk_i2t_head(tmp_path_factory) -> None:
    """The i2t head (no image_gram input) gets the same top-k."""
    path = export_golden("i2t_avg", tmp_path_factory.mktemp("i2t"))
    m = load_manifest(path)
    if "image_gram" in [e["name"] for e in m.graph("head")["inputs"]]:
        pytest.skip("the i2t golden head takes image_gram")
    profiles = compute_profiles(m.graph("head")["inputs"], max_words=m.max_words)
    assert "image_gram" not in profiles
    head = path.parent / "scan.onnx"
    topk = open_session(add_topk_to_head(head, 4).SerializeToString())
    plain = open_session(head)
    cfg = m.config
    rng = np.random.default_rng(3)
    feeds = _head_feeds(rng, 9, 5, gram=False)
    feeds["images"] = np.ascontiguousarray(np.resize(feeds["images"], (9, 36, cfg.embed_size)), np.float32)
    feeds["captions"] = np.ascontiguousarray(
        np.resize(feeds["captions"], (*feeds["captions"].shape[:2], cfg.embed_size)), np.float32
    )
    sims = plain.run(["sims"], feeds)[0]
    _scores, index = topk.run(None, feeds)
    np.testing.assert_array_equal(index, np.argsort(-sims, axis=0, kind="stable")[:4])
