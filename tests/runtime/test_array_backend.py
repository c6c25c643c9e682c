"""The array backend (numpy here; CuPy on a GPU): parity with the original code, with ONNX Runtime on
every option combination, and serving with torch, onnx and onnxruntime unimportable.

Tolerances: float32 against float32 with other summation orders, 1e-5 absolute plus 1e-5 relative as
the exporter's own parity check (errors seen ~1e-6); the float16 variant against float32, 5e-3 as the
fp16 graphs (export/exporter.py explains it).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from runtime import array_model
from runtime.backends.arrays import ArrayModel, cupy_status
from runtime.config import SCANConfig
from runtime.manifest import write_manifest
from runtime.options import EngineOptions, SearchOptions, WriteOptions
from runtime.weights import ScanWeights, WeightsError, expected_shapes
from tests.conftest import golden_expected
from tests.helpers import (
    BLOCKED_IMPORTS,
    ENCODER_OPTIONS,
    HEAD_OPTIONS,
    encode_texts,
    option_config,
    run_with_blocked_imports,
)

ATOL = RTOL = 1e-5
FP16_TOL = 5e-3


def case_config(case: int) -> SCANConfig:
    """Case ``case`` of every head option x a cycle over every encoder option (as test_properties.py)."""
    return option_config(*HEAD_OPTIONS[case], case)


def seeded_inputs(case: int, n_images: int = 4):
    rng = np.random.default_rng(case)
    lengths = np.array([1, 7, 3, 1, 5][: 2 + case % 4], np.int64)
    lengths[0] = 7 if case % 2 else lengths[0]
    ids = rng.integers(0, 20, (len(lengths), int(lengths.max()))).astype(np.int64)
    ids[np.arange(ids.shape[1])[None, :] >= lengths[:, None]] = 0
    regions = rng.standard_normal((n_images, 6, 10)).astype(np.float32)
    regions[:, -1] = 0  # all-zero regions exist in real data
    return regions, ids, lengths


# ---------------------------------------------------------------------------------------------- shared code path


def test_math_is_written_once_over_the_array_module():
    """array_model.py imports no array library and reaches one only through its ``xp`` argument, so the
    CuPy path runs exactly the code the numpy tests run; every xp.* it calls exists in CuPy's API."""
    source = Path(array_model.__file__).read_text(encoding="utf-8")
    tree = ast.parse(source)
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    } | {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "functools", "types"}, f"array_model.py imports {sorted(imported)}"
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert not names & {"np", "numpy", "cupy", "cp", "torch"}, "array_model.py names an array library directly"
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert len(functions) >= 10
    for fn in functions:
        assert fn.args.args and fn.args.args[0].arg == "xp", f"{fn.name} does not take the array module first"
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "xp"
    }
    # Functions documented in both numpy and CuPy (cupy's reference: docs.cupy.dev/en/stable/reference);
    # ``fuse`` is looked up with getattr and exists in CuPy only.
    both = {
        "abs",
        "arange",
        "concatenate",
        "empty",
        "exp",
        "expand_dims",
        "float32",
        "log",
        "matmul",
        "maximum",
        "sqrt",
        "tanh",
        "where",
        "zeros",
    }
    assert used <= both, f"xp functions outside the shared numpy/CuPy API: {sorted(used - both)}"


def test_kernels_are_plain_functions_on_numpy():
    k = array_model.kernels(np)
    x = np.array([-2.0, 0.0, 3.0], np.float32)
    np.testing.assert_array_equal(k.leaky_relu(x), np.array([-0.2, 0.0, 3.0], np.float32))
    assert k.leaky_relu(x).dtype == np.float32


# ---------------------------------------------------------------------------------------------- parity


def _torch_reference(case: int):
    torch = pytest.importorskip("torch")
    from export.model import SCAN
    from export.weights import encoder_arrays

    cfg = case_config(case)
    torch.manual_seed(case)
    model = SCAN(cfg).eval()
    return cfg, model, encoder_arrays(model), torch


@pytest.mark.parametrize("case", range(len(HEAD_OPTIONS)))
def test_every_option_equals_the_original_algorithm(case):
    """numpy backend (encoders + head) == the original per-caption algorithm on the PyTorch encoders."""
    cfg, model, arrays, torch = _torch_reference(case)
    from export.model import slow_sims

    regions, ids, lengths = seeded_inputs(case)
    with torch.no_grad():
        images = model.img_enc(torch.from_numpy(regions))
        captions = model.txt_enc(torch.from_numpy(ids), torch.from_numpy(lengths))
        expected = slow_sims(images, captions, torch.from_numpy(lengths), cfg).numpy()
    m = ArrayModel(ScanWeights.from_arrays(cfg, arrays))
    got_images, got_gram = m.encode_images(regions)
    got_captions = m.encode_ids(ids, lengths)
    np.testing.assert_allclose(got_images, images.numpy(), atol=ATOL, rtol=RTOL, err_msg=f"{cfg} images")
    np.testing.assert_allclose(got_captions, captions.numpy(), atol=ATOL, rtol=RTOL, err_msg=f"{cfg} captions")
    got = m.sims(got_images, got_gram, got_captions, lengths)
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL, err_msg=f"{cfg} sims")
    no_gram = m.sims(got_images, None, got_captions, lengths)  # the head computes the Gram matrix itself
    np.testing.assert_allclose(no_gram, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    "cross_attn,agg,lam_lse",
    [("t2i", "LogSumExp", 20.0), ("i2t", "Mean", 6.0), ("i2t", "LogSumExp", 6.0), ("t2i", "Max", 6.0)],
)
def test_float16_storage_stays_within_fp16_tolerance(cross_attn, agg, lam_lse):
    torch = pytest.importorskip("torch")
    from export.model import SCAN, slow_sims
    from export.weights import encoder_arrays

    cfg = SCANConfig(
        vocab_size=20,
        img_dim=64,
        embed_size=32,
        word_dim=16,
        bi_gru=True,
        cross_attn=cross_attn,
        agg_func=agg,
        lambda_lse=lam_lse,
        lambda_softmax=9.0 if cross_attn == "t2i" else 4.0,
    )
    torch.manual_seed(3)
    model = SCAN(cfg).eval()
    rng = np.random.default_rng(3)
    regions = rng.standard_normal((6, 36, 64)).astype(np.float32)
    # No 1-word caption here: t2i normalises each region's logits over the words, for one word the sign
    # of the logit, so rounding a near-zero logit to float16 flips its weight from e^-9 to e^9 (the
    # model's own discontinuity, not an error of the backend); float32 tests cover 1-word captions.
    lengths = np.array([12, 2, 5, 9], np.int64)
    ids = rng.integers(0, 20, (4, 12)).astype(np.int64)
    with torch.no_grad():
        expected = slow_sims(
            model.img_enc(torch.from_numpy(regions)),
            model.txt_enc(torch.from_numpy(ids), torch.from_numpy(lengths)),
            torch.from_numpy(lengths),
            cfg,
        ).numpy()
    m = ArrayModel(ScanWeights.from_arrays(cfg, encoder_arrays(model)), precision="fp16")
    images, gram = m.encode_images(regions)
    captions = m.encode_ids(ids, lengths)
    assert images.dtype == gram.dtype == captions.dtype == np.float16
    got = m.sims(images, gram, captions, lengths)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, expected, atol=FP16_TOL, rtol=FP16_TOL)


OPTION_CASES_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
from runtime.backends.arrays import ArrayModel
from runtime.config import SCANConfig
from runtime.weights import ScanWeights

folder = Path(sys.argv[1])
worst, failures, cases = 0.0, [], sorted(folder.glob("*.json"))
for path in cases:
    meta = json.loads(path.read_text())
    cfg = SCANConfig.from_dict(meta["config"])
    ref = dict(np.load(folder / meta["arrays"], allow_pickle=False))
    m = ArrayModel(ScanWeights.load(folder / meta["weights"], cfg, sha256=meta["sha256"]))
    got = {"sims": m.sims(ref["head.images"], ref.get("head.image_gram"), ref["head.captions"], ref["lengths"])}
    if "image.images" in ref:
        got["image.images"], got["image.image_gram"] = m.encode_images(ref["regions"])
        got["text.captions"] = m.encode_ids(ref["ids"], ref["lengths"])
        got["end_to_end"] = m.sims(got["image.images"], got["image.image_gram"], got["text.captions"], ref["lengths"])
    for name, value in got.items():
        expected = ref["sims" if name == "end_to_end" else name]
        err = float(np.abs(value - expected).max())
        worst = max(worst, err)
        if value.shape != expected.shape or not np.allclose(value, expected, atol=1e-5, rtol=1e-5):
            failures.append(f"{path.stem} {name}: max err {err:.3g} ({meta['config']})")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "onnxruntime"))
print(json.dumps({"cases": len(cases), "worst": worst, "failures": failures, "loaded": loaded}))
sys.exit(1 if failures else 0)
"""


def test_every_option_equals_onnxruntime_with_graph_runtimes_blocked(tmp_path):
    """The exported graphs in ONNX Runtime (this process) vs the numpy backend in a process where torch,
    onnx and onnxruntime cannot be imported, loading only the weights file."""
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    import hashlib

    from export.exporter import export_graph, graph_specs
    from export.weights import weights_bytes

    for case in range(len(HEAD_OPTIONS)):
        cfg, model, arrays, _ = _torch_reference(case)
        regions, ids, lengths = seeded_inputs(case)
        with torch.no_grad():
            images = model.img_enc(torch.from_numpy(regions)).numpy()
            captions = model.txt_enc(torch.from_numpy(ids), torch.from_numpy(lengths)).numpy()
        specs = {s.graph: s for s in graph_specs(model)}
        feeds = {
            "images": images,
            "image_gram": images @ images.transpose(0, 2, 1),
            "captions": captions,
            "lengths": lengths,
        }
        head = ort.InferenceSession(export_graph(specs["head"]), providers=["CPUExecutionProvider"])
        out = {
            "lengths": lengths,
            "head.images": images,
            "head.captions": captions,
            "sims": head.run(None, {i.name: feeds[i.name] for i in head.get_inputs()})[0],
        }
        if cfg.cross_attn == "t2i":
            out["head.image_gram"] = feeds["image_gram"]
        if case < len(ENCODER_OPTIONS):  # every encoder option once
            image = ort.InferenceSession(export_graph(specs["image"]), providers=["CPUExecutionProvider"])
            text = ort.InferenceSession(export_graph(specs["text"]), providers=["CPUExecutionProvider"])
            out["image.images"], out["image.image_gram"] = image.run(None, {"regions": regions})
            out["text.captions"] = text.run(None, {"ids": ids, "lengths": lengths})[0]
            out["regions"], out["ids"] = regions, ids
        blob = weights_bytes(arrays)
        (tmp_path / f"{case:02d}.weights.npz").write_bytes(blob)
        np.savez(tmp_path / f"{case:02d}.arrays.npz", **out)
        (tmp_path / f"{case:02d}.json").write_text(
            json.dumps(
                {
                    "config": cfg.to_dict(),
                    "weights": f"{case:02d}.weights.npz",
                    "arrays": f"{case:02d}.arrays.npz",
                    "sha256": hashlib.sha256(blob).hexdigest(),
                }
            )
        )
    proc = run_with_blocked_imports(OPTION_CASES_SCRIPT, str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["cases"] == len(HEAD_OPTIONS) == 56 and not summary["failures"]
    assert summary["loaded"] == [], summary


GOLDEN_SCRIPT = """
import json, sys
import numpy as np
from runtime.engine import ScanEngine
from runtime.options import EngineOptions, SearchOptions
from bench.evaluation import full_sims, load_split

manifest, golden = sys.argv[1], sys.argv[2]
with ScanEngine.open(manifest, EngineOptions(backend="numpy")) as engine:
    regions, captions = load_split(golden, "test", engine.config.img_dim)
    sims = full_sims(engine, regions, captions, image_block=5, caption_batch=7, progress=False)
err = float(np.abs(sims - np.load(golden + "/expected_sims.npy")).max())
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({"max_abs_err": err, "shape": list(sims.shape), "loaded": loaded}))
""".replace("BLOCKED", repr(BLOCKED_IMPORTS))


def test_golden_cases_with_graph_runtimes_blocked(golden, exported):
    """The original SCAN code's similarity matrices, from the raw files, by the numpy backend alone."""
    proc = run_with_blocked_imports(GOLDEN_SCRIPT, str(exported[golden.name]), str(golden))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["shape"] == list(golden_expected(golden).shape)
    assert out["max_abs_err"] <= 1e-5
    assert out["loaded"] == []


# ---------------------------------------------------------------------------------------------- weights file


def test_weights_file_is_listed_and_verified(small_engines, tmp_path):
    import shutil

    from runtime.manifest import load_manifest
    from runtime.weights import load_weights

    src = small_engines["t2i"]
    manifest = load_manifest(src)
    entry = manifest.data["weights"]
    assert entry["file"] == "scan.weights.npz" and len(entry["sha256"]) == 64
    cfg = manifest.config
    weights = load_weights(manifest)
    assert weights.image_weight.shape == (cfg.embed_size, cfg.img_dim)
    assert set(entry["arrays"]) >= {"image.weight", "image.bias", "text.embed", "text.gru.l0.forward.weight_ih"}
    copy = tmp_path / "copy"
    shutil.copytree(src.parent, copy)
    with open(copy / "scan.weights.npz", "r+b") as f:  # one flipped byte
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(WeightsError, match="sha256 differs"):
        load_weights(load_manifest(copy / "scan.json"))
    (copy / "scan.weights.npz").unlink()
    with pytest.raises(WeightsError, match="missing"):
        load_weights(load_manifest(copy / "scan.json"))
    data = json.loads((copy / "scan.json").read_text())
    del data["weights"]
    write_manifest(copy / "scan.json", data)
    with pytest.raises(WeightsError, match="re-export"):
        load_weights(load_manifest(copy / "scan.json"))


def test_weights_that_do_not_fit_the_config_are_refused():
    cfg = case_config(0)
    rng = np.random.default_rng(0)
    arrays = {k: rng.standard_normal(s).astype(np.float32) for k, s in expected_shapes(cfg).items()}
    ScanWeights.from_arrays(cfg, arrays)
    bad = dict(arrays, **{"image.weight": arrays["image.weight"][:, :3]})
    with pytest.raises(WeightsError, match=r"image\.weight"):
        ScanWeights.from_arrays(cfg, bad)
    with pytest.raises(WeightsError, match="missing"):
        ScanWeights.from_arrays(cfg, {k: v for k, v in arrays.items() if k != "text.embed"})


# ---------------------------------------------------------------------------------------------- top-k


def test_topk_candidates_follow_faiss_ties():
    from runtime.topk import RunningTopK

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, (20, 50)).astype(np.float32)  # many ties at every k
    cfg = case_config(0)
    m = ArrayModel(ScanWeights.from_arrays(cfg, {k: np.zeros(s, np.float32) for k, s in expected_shapes(cfg).items()}))
    # faiss's order, computed independently: descending score, ties to the lower id. (block_topk's own output is
    # no reference: inside its partition, equal scores come in argpartition's order, which numpy versions differ
    # in; only RunningTopK.merge orders them, as it does here.)
    columns = np.broadcast_to(np.arange(50), scores.shape)
    faiss_order = np.lexsort((columns, -scores), axis=1)
    for k in (1, 3, 7, 50, 60):
        vals, rows = m.topk_candidates(scores, k, offset=100)
        top = RunningTopK(20, k)
        top.merge(vals, rows)
        want = faiss_order[:, :k]
        np.testing.assert_array_equal(top.ids[:, : want.shape[1]], 100 + want)
        np.testing.assert_array_equal(top.scores[:, : want.shape[1]], np.take_along_axis(scores, want, axis=1))


@pytest.mark.parametrize("mode", ["t2i", "i2t"])
def test_blocks_topk_equals_full_scoring_of_the_same_blocks(mode):
    """blocks_topk (candidates chosen where the scores are) == RunningTopK over each block's full scores,
    for host and uploaded blocks, both gallery axes, and duplicated items so that ties reach the k-th
    place within and across blocks (the same blocks: a GEMM's rounding may depend on its shape, so
    equal items in blocks of other sizes need not score bit-identically)."""
    from runtime.topk import RunningTopK

    cfg = SCANConfig(vocab_size=20, img_dim=10, embed_size=8, word_dim=5, bi_gru=True, cross_attn=mode)
    rng = np.random.default_rng(1)
    arrays = {k: (rng.standard_normal(s) * 0.5).astype(np.float32) for k, s in expected_shapes(cfg).items()}
    m = ArrayModel(ScanWeights.from_arrays(cfg, arrays))
    regions = rng.standard_normal((13, 6, 10)).astype(np.float32)
    regions = np.concatenate([regions, regions[[2, 2, 7, 0]], regions])  # ties, some across blocks
    images, gram = m.encode_images(regions)
    ids, lengths = rng.integers(0, 20, (5, 6)), np.array([6, 1, 3, 6, 2])
    ids = np.concatenate([ids, ids[[1, 1, 4]]])
    lengths = np.concatenate([lengths, lengths[[1, 1, 4]]])
    captions = m.encode_ids(ids, lengths)
    image_feeds = {"images": images, **({"image_gram": gram} if mode == "t2i" else {})}
    caption_feeds = {"captions": captions, "lengths": lengths}
    for axis, gallery, query in ((0, image_feeds, caption_feeds), (1, caption_feeds, image_feeds)):
        n, q = len(next(iter(gallery.values()))), len(next(iter(query.values())))
        for k, block in ((1, 5), (3, 5), (4, 30), (40, 8), (5, 100)):
            blocks = [(a, {name: v[a : a + block] for name, v in gallery.items()}) for a in range(0, n, block)]
            want = RunningTopK(q, k)
            for a, feeds in blocks:
                s = m.sims(**{"image_gram": None, **feeds, **query})
                want.add_block(s.T if axis == 0 else s, np.arange(a, a + len(next(iter(feeds.values())))))
            for held in (blocks, m.upload_blocks(blocks)):
                got = RunningTopK(q, k)
                for scores, rows in m.blocks_topk(held, query, k, axis):
                    got.merge(scores, rows)
                np.testing.assert_array_equal(got.ids, want.ids, err_msg=f"axis={axis} k={k} block={block}")
                np.testing.assert_array_equal(got.scores, want.scores)


# ---------------------------------------------------------------------------------------------- engine and CLI


def test_engine_numpy_backend_matches_onnxruntime_search(engine_path):
    from runtime.engine import ScanEngine
    from tests.runtime.conftest import random_captions, random_regions

    regions = random_regions(9, seed=5)
    captions = random_captions(7, seed=5)
    with (
        ScanEngine.open(engine_path, EngineOptions(backend="onnxruntime")) as ref,
        ScanEngine.open(engine_path, EngineOptions(backend="numpy")) as m,
    ):
        assert m.options.backend == "numpy"
        i_ref, g_ref = ref.encode_images(regions)
        i_got, g_got = m.encode_images(regions)
        np.testing.assert_allclose(i_got, i_ref, atol=ATOL, rtol=RTOL)
        w_ref, lengths = encode_texts(ref, captions)
        w_got, _ = encode_texts(m, captions)
        np.testing.assert_allclose(w_got, w_ref, atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose(
            m.sims(i_got, g_got, w_got, lengths), ref.sims(i_ref, g_ref, w_ref, lengths), atol=ATOL, rtol=RTOL
        )


SEARCH_CLI_SCRIPT = """
import runpy, sys
sys.path.insert(0, "runtime")  # as `python runtime/search.py` does
sys.argv = ["runtime/search.py", *sys.argv[1:]]
try:
    runpy.run_path("runtime/search.py", run_name="__main__")
finally:
    print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
""".replace("BLOCKED", repr(BLOCKED_IMPORTS))


def test_search_cli_serves_with_numpy_and_no_graph_runtime(small_engines, tmp_path):
    from tests.runtime.conftest import random_regions

    engine = str(small_engines["t2i"])
    feats = tmp_path / "feats.npy"
    np.save(feats, random_regions(6, seed=1))
    gal = str(tmp_path / "gal")
    build = run_with_blocked_imports(
        SEARCH_CLI_SCRIPT,
        "--engine",
        engine,
        "--backend",
        "numpy",
        "--gallery",
        gal,
        "--images",
        str(feats),
        "--no-progress",
    )
    assert build.returncode == 0, build.stderr
    query = run_with_blocked_imports(
        SEARCH_CLI_SCRIPT, "--engine", engine, "--backend", "numpy", "--gallery", gal, "-k", "3", "a dog on the beach"
    )
    assert query.returncode == 0, query.stderr
    assert "LOADED []" in query.stdout
    assert query.stdout.count("\n") >= 3


def test_array_backend_without_weights_is_a_clear_error(small_engines, tmp_path):
    import shutil

    from runtime.backends import BackendError
    from runtime.engine import ScanEngine

    copy = tmp_path / "e"
    shutil.copytree(small_engines["i2t"].parent, copy)
    data = json.loads((copy / "scan.json").read_text())
    del data["weights"]
    write_manifest(copy / "scan.json", data)
    with pytest.raises(BackendError, match=r"--backend numpy: .*re-export"):
        ScanEngine.open(copy / "scan.json", EngineOptions(backend="numpy"))


# ---------------------------------------------------------------------------------------------- CuPy (GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cupy_equals_numpy(precision):
    reason = cupy_status()
    if reason is not None:
        pytest.skip(reason)
    tol = ATOL if precision == "fp32" else FP16_TOL
    for case in range(len(HEAD_OPTIONS)):
        cfg, _, arrays, _ = _torch_reference(case)
        weights = ScanWeights.from_arrays(cfg, arrays)
        ref, gpu = ArrayModel(weights, "numpy"), ArrayModel(weights, "cupy", precision)
        regions, ids, lengths = seeded_inputs(case, n_images=5)
        i_ref, g_ref = ref.encode_images(regions)
        w_ref = ref.encode_ids(ids, lengths)
        i_gpu, g_gpu = gpu.encode_images(regions)
        w_gpu = gpu.encode_ids(ids, lengths)
        np.testing.assert_allclose(w_gpu.astype(np.float32), w_ref, atol=tol, rtol=tol, err_msg=str(cfg))
        np.testing.assert_allclose(
            gpu.sims(i_gpu, g_gpu, w_gpu, lengths),
            ref.sims(i_ref, g_ref, w_ref, lengths),
            atol=tol,
            rtol=tol,
            err_msg=str(cfg),
        )
        gallery = {"images": i_ref, **({"image_gram": g_ref} if cfg.cross_attn == "t2i" else {})}
        blocks = gpu.upload_blocks([(a, {n: v[a : a + 2] for n, v in gallery.items()}) for a in range(0, 5, 2)])
        found = list(gpu.blocks_topk(blocks, {"captions": w_ref, "lengths": lengths}, 1, axis=0))
        assert [rows.shape for _, rows in found] == [(len(lengths), 1)] * 3


def test_cupy_backend_reports_why_it_cannot_run():
    reason = cupy_status()
    if reason is None:
        pytest.skip("CuPy runs here")
    from runtime.backends import BackendError
    from runtime.backends.arrays import array_module

    with pytest.raises(BackendError, match="--backend cupy: "):
        array_module("cupy")


AUTO_SCRIPT = """
import json, sys
from runtime.engine import ScanEngine
with ScanEngine.open(sys.argv[1]) as engine:
    print(json.dumps({"backend": engine.options.backend}))
"""


def test_auto_serves_with_numpy_when_onnxruntime_is_missing(small_engines):
    proc = run_with_blocked_imports(AUTO_SCRIPT, str(small_engines["t2i"]))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"backend": "numpy"}
    assert "serving" in proc.stderr and "numpy backend" in proc.stderr


@pytest.mark.parametrize("resident", [None, True, False])
def test_searcher_on_numpy_equals_searcher_on_onnxruntime(engine_path, tmp_path, resident):
    """The one scoring loop of Searcher over the numpy backend's placement (upload + block_topk) finds
    what it finds over ONNX Runtime, in both directions, with several blocks and a tie-prone k."""
    from runtime.engine import ScanEngine
    from runtime.gallery import build_caption_gallery, build_image_gallery
    from runtime.searcher import Searcher
    from tests.runtime.conftest import random_captions, random_regions

    regions = random_regions(23, seed=2)
    captions = random_captions(31, seed=2)
    queries_text, queries_images = random_captions(5, seed=3), random_regions(4, seed=3)
    found = {}
    for backend in ("onnxruntime", "numpy"):
        with ScanEngine.open(engine_path, EngineOptions(backend=backend)) as engine:
            images = build_image_gallery(
                engine, regions, tmp_path / backend / "images", options=WriteOptions(progress=False)
            )
            caps = build_caption_gallery(
                engine, captions, tmp_path / backend / "captions", options=WriteOptions(progress=False)
            )
            with Searcher(
                engine,
                images=images,
                captions=caps,
                options=SearchOptions(image_block=6, caption_block=4, resident=resident),
            ) as s:
                found[backend] = (s.search(queries_text, 7), s.search(queries_images, 9))
    for (s_ref, i_ref), (s_got, i_got) in zip(found["onnxruntime"], found["numpy"]):
        np.testing.assert_array_equal(i_got, i_ref)
        np.testing.assert_allclose(s_got, s_ref, atol=ATOL, rtol=RTOL)


RECALL_CLI_SCRIPT = """
import sys
from bench.recall import main
sys.exit(main(sys.argv[1:]))
"""


def test_recall_cli_with_numpy_and_no_graph_runtime(golden, exported, tmp_path):
    """bench/recall.py --backend numpy reproduces the original code's matrix with torch/onnx/onnxruntime blocked."""
    out = tmp_path / "sims.npy"
    args = ["--engine", str(exported[golden.name]), "--data", str(golden), "--split", "test", "--backend", "numpy"]
    proc = run_with_blocked_imports(RECALL_CLI_SCRIPT, *args, "--save-sims", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "(numpy)" in proc.stderr
    assert np.abs(np.load(out) - golden_expected(golden)).max() <= 1e-5


def test_upload_merges_consecutive_blocks_of_one_shape():
    cfg = case_config(0)
    m = ArrayModel(ScanWeights.from_arrays(cfg, {k: np.zeros(s, np.float32) for k, s in expected_shapes(cfg).items()}))
    rng = np.random.default_rng(0)
    images = rng.standard_normal((23, 4, 8)).astype(np.float32)
    blocks = [(a, {"images": images[a : a + 5]}) for a in range(0, 23, 5)]
    merged = m.upload_blocks(blocks, merge_rows=11)
    assert [(offset, len(f["images"])) for offset, f in merged] == [(0, 10), (10, 10), (20, 3)]
    np.testing.assert_array_equal(np.concatenate([f["images"] for _, f in merged]), images)
    words = [
        (0, {"captions": np.zeros((3, 2, 8), np.float32), "lengths": np.full(3, 2)}),
        (3, {"captions": np.zeros((2, 2, 8), np.float32), "lengths": np.full(2, 2)}),
        (5, {"captions": np.zeros((4, 5, 8), np.float32), "lengths": np.full(4, 5)}),
    ]
    merged = m.upload_blocks(words, merge_rows=100)  # captions of other lengths are never joined
    assert [(offset, f["captions"].shape) for offset, f in merged] == [(0, (5, 2, 8)), (5, (4, 5, 8))]
    assert merged[0][1]["lengths"].dtype == np.int64


FAKE_CUPY_SEARCH_SCRIPT = """
import json, sys
import numpy as np
from tests.fake_cupy import install
install()
from runtime.engine import ScanEngine
from runtime.gallery import ImageGallery, CaptionGallery
from runtime.options import EngineOptions, SearchOptions
from runtime.searcher import Searcher

engine_path, folder = sys.argv[1], sys.argv[2]
with ScanEngine.open(engine_path, EngineOptions(backend="cupy")) as engine:
    images = ImageGallery.load(folder + "/images")
    caps = CaptionGallery.load(folder + "/captions")
    with Searcher(engine, images=images, captions=caps, options=SearchOptions(image_block=6, caption_block=4)) as s:
        text = s.search(json.load(open(folder + "/queries.json")), 7)
        image = s.search(np.load(folder + "/queries.npy"), 9)
        ids, lengths = engine.tokenizer.encode_batch(json.load(open(folder + "/queries.json")))
        words = engine.encode_ids(ids, lengths)
        uploaded = s._upload(s._generation, "images", 0)
        rows = [r for _, r in engine.head.block_sims(uploaded, {"captions": words, "lengths": lengths}, 0)]
        held = {key[1]: len(list(g)) for key, g in s._generation._made.items()}
np.savez(folder + "/found.npz", ts=text[0], ti=text[1], is_=image[0], ii=image[1], sims=np.concatenate(rows, 1))
print(json.dumps({"backend": engine.options.backend, "blocks": held}))
"""


def test_searcher_on_the_cupy_path_with_a_numpy_stand_in(engine_path, tmp_path):
    """--backend cupy through ScanEngine and Searcher (resident blocks joined on upload, candidates kept
    on the 'device' until one transfer) on a numpy stand-in for CuPy, against the numpy backend."""
    from runtime.engine import ScanEngine
    from runtime.gallery import build_caption_gallery, build_image_gallery
    from runtime.searcher import Searcher
    from tests.runtime.conftest import random_captions, random_regions

    queries_text, queries_images = random_captions(5, seed=3), random_regions(4, seed=3)
    (tmp_path / "queries.json").write_text(json.dumps(queries_text))
    np.save(tmp_path / "queries.npy", queries_images)
    with ScanEngine.open(engine_path, EngineOptions(backend="numpy")) as engine:
        images = build_image_gallery(
            engine, random_regions(23, seed=2), tmp_path / "images", options=WriteOptions(progress=False)
        )
        caps = build_caption_gallery(
            engine, random_captions(31, seed=2), tmp_path / "captions", options=WriteOptions(progress=False)
        )
        with Searcher(engine, images=images, captions=caps, options=SearchOptions(image_block=6, caption_block=4)) as s:
            want = (s.search(queries_text, 7), s.search(queries_images, 9))
        words, lengths = encode_texts(engine, queries_text)
        want_sims = engine.sims(images.images, images.image_gram, words, lengths).T  # (queries, images)
    proc = run_with_blocked_imports(FAKE_CUPY_SEARCH_SCRIPT, str(engine_path), str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["backend"] == "cupy"
    assert out["blocks"]["images"] == 1  # 4 uploaded blocks of 6 images joined into one device block
    got = np.load(tmp_path / "found.npz")
    np.testing.assert_allclose(got["sims"], want_sims, atol=ATOL, rtol=RTOL)  # block_sims of resident blocks
    for (s_ref, i_ref), s_got, i_got in zip(want, (got["ts"], got["is_"]), (got["ti"], got["ii"])):
        np.testing.assert_array_equal(i_got, i_ref)
        np.testing.assert_allclose(s_got, s_ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("lambda_softmax", [9.0, 12.0, 20.0, 30.0])
def test_float16_head_keeps_the_attention_weights_in_float32(lambda_softmax):
    """float16 storage with large lambda_softmax: the unnormalised weights e^(lambda x) reach e^30, far past
    float16's 65504, so the Gram product takes them in float32 (a float16 cast would give inf / NaN)."""
    rng = np.random.default_rng(0)

    def unit(shape):
        x = rng.standard_normal(shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    images, captions, lengths = unit((4, 36, 32)), unit((3, 7, 32)), np.array([7, 5, 3])
    cfg = SCANConfig(vocab_size=10, embed_size=32, lambda_softmax=lambda_softmax)  # t2i, clipped_l2norm, LSE
    ref = array_model.sims(np, images, None, captions, lengths, cfg, np.float32)
    gram16 = array_model.gram(np, images, np.float32).astype(np.float16)
    got = array_model.sims(np, images.astype(np.float16), gram16, captions.astype(np.float16), lengths, cfg, np.float32)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, ref, atol=FP16_TOL, rtol=FP16_TOL)
