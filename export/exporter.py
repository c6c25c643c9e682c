"""Export a loaded SCAN checkpoint to ONNX and prove each graph equal to the PyTorch reference.

Parity is checked in ONNX Runtime on shapes *other* than the export example (caption length 1, a
1-image block, long captions), because a graph can silently freeze a traced dimension.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.checkpoint import LoadedCheckpoint
from export.graphs import HeadGraph, ImageGraph, TextGraph, head_input_names
from export.model import SCAN
from export.weights import encoder_arrays, weights_bytes
from runtime import atomic
from runtime.backends.onnxruntime import open_session
from runtime.manifest import (
    DEFAULT_MAX_WORDS,
    FORMAT,
    graph_file_name,
    graph_key,
    vocab_file_name,
    weights_file_name,
    write_manifest,
)

logger = logging.getLogger(__name__)

OPSET = 17
PRECISIONS = ("fp32", "fp16")
# float32 ONNX Runtime vs PyTorch: different kernels and summation orders, so agreement is to a few
# float32 ulps of the accumulated values; 1e-5 (abs, plus the same relative) is 100x the errors seen.
PARITY_ATOL = 1e-5
PARITY_RTOL = 1e-5
# float16 graphs vs the float32 reference: inputs, weights and GEMM operands are rounded to 11
# significant bits (unit roundoff 4.9e-4), so each output carries a few float16 ulps of error;
# 5e-3 is 10 ulps at 1.0 and over 10x the largest error seen on the golden and demo models.
FP16_ATOL = 5e-3
FP16_RTOL = 5e-3
TOLERANCES = {"fp32": (PARITY_ATOL, PARITY_RTOL), "fp16": (FP16_ATOL, FP16_RTOL)}


class ParityError(RuntimeError):
    """An exported graph disagrees with the PyTorch reference."""


@dataclass(frozen=True)
class GraphSpec:
    graph: str  # "image", "text" or "head"
    precision: str
    module: torch.nn.Module
    inputs: list[str]
    outputs: list[str]
    dynamic: dict[str, dict[int, str]]
    example: tuple[torch.Tensor, ...]


def encoder_id(module: torch.nn.Module, cfg_items: dict[str, Any]) -> str:
    """A hash of an encoder's weights and the options that shape its output; gallery caches bind to it."""
    digest = hashlib.sha256(json.dumps(cfg_items, sort_keys=True).encode())
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def random_captions(
    q: int, max_len: int, vocab_size: int, gen: torch.Generator, lengths: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    if lengths is None:
        lengths = torch.randint(1, max_len + 1, (q,), generator=gen).tolist()
        lengths[0] = max_len  # the padded length must be reached by some caption
    lens = torch.tensor(lengths, dtype=torch.int64)
    ids = torch.randint(4, max(vocab_size, 5), (q, int(lens.max())), generator=gen) % vocab_size
    ids = ids * (torch.arange(ids.shape[1]).unsqueeze(0) < lens.unsqueeze(1))
    return ids, lens


def _half_floats(feeds: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(t.half() if t.is_floating_point() else t for t in feeds)


def graph_specs(model: SCAN, precision: str = "fp32") -> list[GraphSpec]:
    cfg = model.cfg
    gen = torch.Generator().manual_seed(0)
    regions = torch.randn(2, 7, cfg.img_dim, generator=gen)
    ids, lens = random_captions(3, 6, cfg.vocab_size, gen, lengths=[6, 4, 2])
    with torch.no_grad():
        images, image_gram = ImageGraph(model)(regions)
        captions = model.txt_enc(ids, lens)
    head_feeds = {"images": images, "image_gram": image_gram, "captions": captions, "lengths": lens}
    head_inputs = head_input_names(cfg)
    head_dyn = {
        "images": {0: "N", 1: "R"},
        "image_gram": {0: "N", 1: "R", 2: "R"},
        "captions": {0: "Q", 1: "L"},
        "lengths": {0: "Q"},
        "sims": {0: "N", 1: "Q"},
    }
    cast = _half_floats if precision == "fp16" else (lambda t: t)
    return [
        GraphSpec(
            "image",
            precision,
            ImageGraph(model, precision),
            ["regions"],
            ["images", "image_gram"],
            {"regions": {0: "N", 1: "R"}, "images": {0: "N", 1: "R"}, "image_gram": {0: "N", 1: "R", 2: "R"}},
            cast((regions,)),
        ),
        GraphSpec(
            "text",
            precision,
            TextGraph(model, precision),
            ["ids", "lengths"],
            ["captions"],
            {"ids": {0: "Q", 1: "L"}, "lengths": {0: "Q"}, "captions": {0: "Q", 1: "L"}},
            (ids, lens),
        ),
        GraphSpec(
            "head",
            precision,
            HeadGraph(cfg),
            head_inputs,
            ["sims"],
            {k: v for k, v in head_dyn.items() if k in head_inputs or k == "sims"},
            cast(tuple(head_feeds[k] for k in head_inputs)),
        ),
    ]


def export_graph(spec: GraphSpec) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but is the one that keeps ONNX GRU nodes (docs/design.md section 3).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            spec.module.eval(),
            spec.example,
            buf,
            input_names=spec.inputs,
            output_names=spec.outputs,
            dynamic_axes=spec.dynamic,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    return buf.getvalue()


def parity_cases(model: SCAN, graph: str) -> list[dict[str, torch.Tensor]]:
    """Inputs of shapes unlike the export example, including the edge cases that break frozen graphs."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(1)
    if graph == "image":
        return [{"regions": torch.randn(n, r, cfg.img_dim, generator=gen)} for n, r in ((1, 36), (5, 3), (3, 1))]
    text_shapes = [(1, 1, None), (4, 40, None), (6, 9, [9, 1, 3, 9, 2, 5]), (1, 64, [64])]
    if graph == "text":
        cases = []
        for q, max_len, lens in text_shapes:
            ids, lengths = random_captions(q, max_len, cfg.vocab_size, gen, lens)
            cases.append({"ids": ids, "lengths": lengths})
        return cases
    cases = []
    for n, r, q, max_len, lens in (
        (1, 36, 1, 1, [1]),
        (5, 36, 4, 30, None),
        (3, 4, 7, 12, None),
        (1, 2, 2, 50, [50, 1]),
    ):
        ids, lengths = random_captions(q, max_len, cfg.vocab_size, gen, lens)
        with torch.no_grad():
            images = model.img_enc(torch.randn(n, r, cfg.img_dim, generator=gen))
            captions = model.txt_enc(ids, lengths)
        feeds = {
            "images": images,
            "image_gram": images @ images.transpose(1, 2),
            "captions": captions,
            "lengths": lengths,
        }
        cases.append({k: feeds[k] for k in head_input_names(cfg)})
    return cases


def reference(model: SCAN, graph: str, feeds: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """What the original model computes for these inputs (packed GRU, batched head)."""
    with torch.no_grad():
        if graph == "image":
            images = model.img_enc(feeds["regions"])
            return [images.numpy(), (images @ images.transpose(1, 2)).numpy()]
        if graph == "text":
            return [model.txt_enc(feeds["ids"], feeds["lengths"]).numpy()]
        from export.model import slow_sims

        return [slow_sims(feeds["images"], feeds["captions"], feeds["lengths"], model.cfg).numpy()]


def float16_runner(onnx_bytes: bytes) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    """The graph in onnx's reference evaluator: numpy kernels, so a float16 op computes and rounds in
    float16 as TensorRT's strongly typed network does. ONNX Runtime's CPU provider cannot show float16
    overflow: it has no float16 MatMul and runs the float16 GEMMs in float32 (casts it inserts itself)."""
    from onnx import load_from_string
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(load_from_string(onnx_bytes))
    return lambda feeds: evaluator.run(None, feeds)


def check_parity(model: SCAN, graph: str, onnx_bytes: bytes, precision: str = "fp32") -> dict[str, Any]:
    """Run the graph on ``parity_cases`` against the float32 PyTorch reference: in ONNX Runtime, and for
    the fp16 head also in float16 arithmetic (``float16_runner``), where an overflow would show."""
    atol, rtol = TOLERANCES[precision]
    name = graph_key(graph, precision)
    session = open_session(onnx_bytes)
    out_names = [o.name for o in session.get_outputs()]
    runners = {"ONNX Runtime": lambda feeds: session.run(None, feeds)}
    if precision == "fp16" and graph == "head":
        runners["float16 arithmetic (onnx reference evaluator)"] = float16_runner(onnx_bytes)
    worst = 0.0
    shapes = []
    for feeds in parity_cases(model, graph):
        expected = reference(model, graph, feeds)
        onnx_feeds = {
            k: (v.half() if precision == "fp16" and v.is_floating_point() else v).numpy() for k, v in feeds.items()
        }
        shapes.append({k: list(v.shape) for k, v in feeds.items()})
        for runner, run in runners.items():
            got = [g.astype(np.float32) if g.dtype == np.float16 else g for g in run(onnx_feeds)]
            for out_name, e, g in zip(out_names, expected, got):
                if e.shape != g.shape:
                    raise ParityError(
                        f"{name} graph in {runner}: output {out_name} has shape {g.shape}, reference {e.shape} "
                        f"(inputs {shapes[-1]})"
                    )
                with np.errstate(invalid="ignore", over="ignore"):
                    err = float(np.max(np.abs(e - g))) if e.size else 0.0
                if not np.all(np.isfinite(g)):
                    raise ParityError(
                        f"{name} graph in {runner}: output {out_name} has {int(np.sum(~np.isfinite(g)))} "
                        f"non-finite values (inf/NaN: an overflow) on inputs {shapes[-1]}"
                    )
                if not np.allclose(g, e, atol=atol, rtol=rtol):
                    raise ParityError(
                        f"{name} graph in {runner}: output {out_name} differs from the PyTorch reference by "
                        f"{err:.3g} (tolerance {atol:g} + {rtol:g} rel) on inputs {shapes[-1]}"
                    )
                worst = max(worst, err)
    return {
        "max_abs_err": worst,
        "atol": atol,
        "rtol": rtol,
        "cases": shapes,
        "passed": True,
        "reference": "PyTorch float32",
        "runners": list(runners),
    }


def export_all(
    ckpt: LoadedCheckpoint,
    vocab_json: dict[str, Any],
    out_dir: Path,
    name: str = "scan",
    max_words: int = DEFAULT_MAX_WORDS,
    progress: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Export, verify, then write the graphs, vocabulary and manifest atomically. Returns the manifest."""
    model = ckpt.model
    cfg = model.cfg
    graphs: dict[str, Any] = {}
    blobs: dict[str, bytes] = {}
    for precision in PRECISIONS:
        for spec in graph_specs(model, precision):
            key = graph_key(spec.graph, precision)
            t0 = time.perf_counter()
            progress(f"exporting {key} graph")
            blob = export_graph(spec)
            progress(f"checking {key} graph against PyTorch in ONNX Runtime")
            parity = check_parity(model, spec.graph, blob, precision)
            blobs[key] = blob
            graphs[key] = {
                "file": graph_file_name(name, spec.graph, precision),
                "sha256": hashlib.sha256(blob).hexdigest(),
                "precision": precision,
                **_io_entries(blob),
                "parity": parity,
                "export_seconds": round(time.perf_counter() - t0, 3),
            }
            progress(f"{key}: max |onnx - torch| = {parity['max_abs_err']:.2e} (ok, tolerance {parity['atol']:g})")
    img_keys = ["img_dim", "embed_size", "precomp_enc_type", "no_imgnorm"]
    txt_keys = ["vocab_size", "word_dim", "embed_size", "num_layers", "bi_gru", "no_txtnorm"]
    cfg_dict = cfg.to_dict()
    vocab_bytes = (json.dumps(vocab_json, ensure_ascii=False) + "\n").encode("utf-8")
    arrays = encoder_arrays(model)
    weight_blob = weights_bytes(arrays)
    manifest = {
        "format": FORMAT,
        "name": name,
        "config": cfg_dict,
        "opset": OPSET,
        "max_words": max_words,
        "checkpoint": {
            "file": str(ckpt.path),
            "sha256": ckpt.sha256,
            "epoch": _plain(ckpt.epoch),
            "best_rsum": _plain(ckpt.best_rsum),
        },
        "image_encoder_id": encoder_id(model.img_enc, {k: cfg_dict[k] for k in img_keys}),
        "text_encoder_id": encoder_id(model.txt_enc, {k: cfg_dict[k] for k in txt_keys}),
        "vocab": {"file": vocab_file_name(name), "sha256": hashlib.sha256(vocab_bytes).hexdigest()},
        "weights": {
            "file": weights_file_name(name),
            "sha256": hashlib.sha256(weight_blob).hexdigest(),
            "arrays": {k: {"shape": list(v.shape), "dtype": v.dtype.name} for k, v in arrays.items()},
        },
        "graphs": graphs,
        "plans": {},
        "exported_with": {"torch": torch.__version__, "onnx_opset": OPSET},
    }
    for key, blob in blobs.items():
        atomic.write_bytes(out_dir / graphs[key]["file"], blob)
    atomic.write_bytes(out_dir / manifest["vocab"]["file"], vocab_bytes)
    atomic.write_bytes(out_dir / manifest["weights"]["file"], weight_blob)
    # The manifest goes last: it only ever names files that are already complete.
    write_manifest(out_dir / f"{name}.json", manifest)
    return manifest


def _io_entries(blob: bytes) -> dict[str, list[dict[str, Any]]]:
    """The graph's inputs and outputs with dtype and (symbolic) shape, for the manifest."""
    import onnx

    graph = onnx.load_from_string(blob).graph
    initializers = {t.name for t in graph.initializer}

    def entry(v) -> dict[str, Any]:
        dims = [d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
        return {"name": v.name, "dtype": dtype, "shape": dims}

    return {
        "inputs": [entry(v) for v in graph.input if v.name not in initializers],
        "outputs": [entry(v) for v in graph.output],
    }


def _plain(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    return x if isinstance(x, (int, float, str, type(None))) else str(x)
