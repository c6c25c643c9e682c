"""TensorRT plan building rules: pure logic, importable and testable without TensorRT or a GPU.

What lives here (``export/build_engine.py`` does the TensorRT calls; serving checks plans with
``runtime/backends/plan_check.py``):

* optimization profiles: min/opt/max shapes for every input of a manifest graph, from its named
  dynamic dimensions (``N`` images, ``R`` regions, ``Q`` queries, ``L`` words);
* the precision strategy for a TensorRT version: TensorRT 10 builds the fp32 graph with the FP16
  builder flag and pins the numerically sensitive layers to float32; TensorRT 11 removed that flag
  (networks are strongly typed), so it parses the fp16 graph, whose fp32 islands are in the ONNX;
* which layers count as numerically sensitive (for the TensorRT 10 path), decided on plain records
  of the parsed network so the rule is testable here;
* the manifest's ``plans`` records (written with ``runtime.manifest.record_plans``);
* ``add_topk_to_head``: the head graph with a TopK appended, so a block returns (k, Q) results
  instead of (N, Q) similarities.
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.backends.plan_check import TOPK_OUTPUTS, PlanError
from runtime.manifest import PLAN_KINDS, STRONGLY_TYPED, plan_source_key

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- errors


class ProfileError(PlanError):
    """An optimization profile cannot be computed (bad flag, unknown dynamic dimension)."""


class TensorRTVersionError(PlanError):
    """The installed TensorRT is too old, or its version string cannot be read."""


class PlanBuildError(PlanError):
    """A TensorRT call failed while parsing or building a plan."""


# ---------------------------------------------------------------------------------------------- kinds


# Defaults chosen to cover what the runtime sends by default: text is encoded 256 captions at a
# time (runtime/gallery/), queries are scored 32 at a time, images 128 at a time and gallery
# blocks are 512 images (runtime/searcher.py). Activation memory grows with N*Q*R*L at the maximum.
DEFAULT_MAX_BATCH = 256
DEFAULT_BLOCK = 512
DEFAULT_REGIONS = 36
DEFAULT_TOPK_MAX = 100
# Opt shapes: what a typical call looks like, so TensorRT tunes its kernels for those.
OPT_QUERIES = 8
OPT_WORDS = 16
# TensorRT's TopK supports K up to 3840 (ITopKLayer documentation).
TRT_TOPK_LIMIT = 3840


def _check_kind(kind: str) -> None:
    if kind not in PLAN_KINDS:
        raise PlanError(f"unknown plan kind {kind!r}; expected one of {', '.join(PLAN_KINDS)}")


# ---------------------------------------------------------------------------------------------- profiles


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ProfileError(f"{name} must be a positive integer, received {value!r}")
    return value


def dimension_bounds(
    max_batch: int, max_words: int, block: int, regions: int = DEFAULT_REGIONS
) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) for each named dynamic dimension of the exported graphs."""
    q = _positive_int("max_batch (--max-batch)", max_batch)
    words = _positive_int("max_words (--max-words)", max_words)
    n = _positive_int("block (--block)", block)
    r = _positive_int("regions (--regions)", regions)
    return {
        # images per call: a gallery block for the head, an encode batch for the image graph
        "N": (1, n, n),
        # regions per image are fixed by the feature extractor (36 bottom-up regions): one shape
        # lets TensorRT specialise every kernel that touches R
        "R": (r, r, r),
        "Q": (1, min(OPT_QUERIES, q), q),
        "L": (1, min(OPT_WORDS, words), words),
    }


def compute_profiles(
    inputs: Sequence[Mapping[str, Any]],
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_words: int,
    block: int = DEFAULT_BLOCK,
    regions: int = DEFAULT_REGIONS,
) -> dict[str, dict[str, list[int]]]:
    """``{input: {"min": [...], "opt": [...], "max": [...]}}`` for a manifest graph entry's ``inputs``.

    Every input is listed with ``name`` and ``shape`` (ints, or names for dynamic dimensions).
    """
    bounds = dimension_bounds(max_batch, max_words, block, regions)
    profiles: dict[str, dict[str, list[int]]] = {}
    for entry in inputs:
        name = entry.get("name")
        shape = entry.get("shape")
        if not isinstance(name, str) or not isinstance(shape, (list, tuple)):
            raise ProfileError(f"graph input {entry!r}: expected a 'name' and a 'shape' list")
        lo, opt, hi = [], [], []
        for axis, dim in enumerate(shape):
            if isinstance(dim, str):
                if dim not in bounds:
                    raise ProfileError(
                        f"input {name!r} axis {axis}: dynamic dimension {dim!r} is not one of "
                        f"{', '.join(bounds)}; the graph was not exported by export/to_onnx.py"
                    )
                a, b, c = bounds[dim]
            elif isinstance(dim, int) and not isinstance(dim, bool) and dim > 0:
                a = b = c = dim
            else:
                raise ProfileError(
                    f"input {name!r} axis {axis}: dimension {dim!r} is neither a positive size "
                    "nor a named dynamic dimension"
                )
            lo.append(a)
            opt.append(b)
            hi.append(c)
        profiles[name] = {"min": lo, "opt": opt, "max": hi}
    return profiles


# ---------------------------------------------------------------------------------------------- precision

FP16_FLAG = "fp16-flag"
FP32 = "fp32"
STRATEGIES = (FP16_FLAG, STRONGLY_TYPED, FP32)
MIN_TRT_MAJOR = 10


def parse_trt_version(version: str) -> tuple[int, ...]:
    """``"10.9.0.34"`` -> ``(10, 9, 0, 34)``; suffixes such as ``rc1`` or ``+cuda12`` are ignored."""
    m = re.match(r"^\s*(\d+(?:\.\d+)*)", str(version))
    if not m:
        raise TensorRTVersionError(f"cannot read the TensorRT version {version!r}")
    return tuple(int(x) for x in m.group(1).split("."))


def precision_strategy(trt_version: str, fp32: bool = False) -> str:
    """How to build for this TensorRT: ``fp16-flag`` (10.x), ``strongly-typed`` (>= 11) or ``fp32``."""
    major = parse_trt_version(trt_version)[0]
    if major < MIN_TRT_MAJOR:
        raise TensorRTVersionError(
            f"TensorRT {trt_version} is not supported: the engines need TensorRT 10.x or newer "
            "(name-based tensor API, execute_async_v3). Upgrade with: pip install --upgrade tensorrt"
        )
    if fp32:
        return FP32
    # TensorRT 11 removed BuilderFlag.FP16 and the precision constraints: the network is strongly
    # typed, so FP16 has to come from the ONNX graph itself.
    return FP16_FLAG if major == 10 else STRONGLY_TYPED


def strategy_precision(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise PlanError(f"unknown precision strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    return FP32 if strategy == FP32 else "fp16"


def source_graph_key(kind: str, strategy: str) -> str:
    """Manifest ``graphs`` key the plan is parsed from: only the strongly typed path uses fp16 graphs."""
    _check_kind(kind)
    strategy_precision(strategy)  # validates
    return plan_source_key(kind, strategy)


# ---------------------------------------------------------------------------------------------- layers

# Layer types kept in float32 on the TensorRT 10 FP16-flag path. Reductions accumulate (sums over
# 1024 features or 36 regions lose digits in fp16), softmax and normalisation exponentiate.
SENSITIVE_LAYER_TYPES = frozenset({"REDUCE", "SOFTMAX", "RAGGED_SOFTMAX", "NORMALIZATION", "RNN_V2"})
# Unary ops that overflow or lose precision in fp16: exp(20 * cos) overflows (docs/design.md section 2), log and
# sqrt of the sums they follow, reciprocals of norms.
SENSITIVE_UNARY_OPS = frozenset({"EXP", "LOG", "SQRT", "RECIP", "POW"})
# Element-wise ops of the norms: x^2 before the sum, division by the norm.
SENSITIVE_ELEMENTWISE_OPS = frozenset({"DIV", "POW"})
# ILoop boundary layers: the ONNX GRU becomes a loop; every layer of its body stays float32, since
# the recurrence accumulates rounding over every time step.
LOOP_BOUNDARY_TYPES = frozenset({"RECURRENCE", "ITERATOR", "LOOP_OUTPUT", "TRIP_LIMIT"})
# Never given a precision: they define types (CAST), hold weights, or are shape plumbing.
NEVER_CONSTRAINED_TYPES = frozenset({"CAST", "CONSTANT", "SHAPE", "ASSERTION", "IDENTITY"})


@dataclass(frozen=True)
class LayerInfo:
    """A parsed network layer, reduced to what the precision rule needs (see build_engine.py)."""

    index: int
    name: str
    type: str  # LayerType member name, e.g. "REDUCE"
    op: str | None  # UnaryOperation / ElementWiseOperation name, or None when unknown
    inputs: tuple[str, ...]  # tensor names
    outputs: tuple[str, ...]
    float_outputs: bool  # every output is float32 or float16 (so a precision applies)


def loop_body_layers(layers: Sequence[LayerInfo]) -> set[int]:
    """Indices of loop layers: the boundary layers and everything reachable from an iterator or
    recurrence output before a loop output (a body tensor can only leave the loop through one)."""
    consumers: dict[str, list[LayerInfo]] = {}
    for layer in layers:
        for t in layer.inputs:
            consumers.setdefault(t, []).append(layer)
    body = {layer.index for layer in layers if layer.type in LOOP_BOUNDARY_TYPES}
    queue = deque(layer for layer in layers if layer.type in ("ITERATOR", "RECURRENCE"))
    seen = {layer.index for layer in queue}
    while queue:
        layer = queue.popleft()
        if layer.type == "LOOP_OUTPUT":
            continue  # its outputs are outside the loop
        for t in layer.outputs:
            for nxt in consumers.get(t, ()):
                if nxt.index not in seen:
                    seen.add(nxt.index)
                    body.add(nxt.index)
                    queue.append(nxt)
    return body


def exp_island_layers(layers: Sequence[LayerInfo]) -> set[int]:
    """Indices of the float layers downstream of an ``exp`` up to the next division, inclusive.

    The float32 head graph exponentiates bounded logits without subtracting their max (export/model.py),
    so its attention weights reach e^lambda_softmax (past float16's 65504 from lambda 11.1), and their sums,
    dot products and Gram product larger still, until the cosine's division brings them back into [-1, 1]
    (a softmax's division into [0, 1]). Every layer in between stays float32 under the FP16 flag: the
    element-wise products, the reductions and the small Gram GEMM; the logits GEMM before ``exp`` does not.
    """
    consumers: dict[str, list[LayerInfo]] = {}
    for layer in layers:
        for t in layer.inputs:
            consumers.setdefault(t, []).append(layer)
    queue = deque(layer for layer in layers if layer.type == "UNARY" and layer.op == "EXP")
    island = {layer.index for layer in queue}
    while queue:
        layer = queue.popleft()
        if layer.type == "ELEMENTWISE" and layer.op == "DIV":
            continue  # bounded again: what it feeds is outside the island
        for t in layer.outputs:
            for nxt in consumers.get(t, ()):
                if nxt.index not in island and nxt.float_outputs and nxt.type not in NEVER_CONSTRAINED_TYPES:
                    island.add(nxt.index)
                    queue.append(nxt)
    return island


def fp32_layers(layers: Sequence[LayerInfo]) -> list[int]:
    """Indices of the layers to pin to float32 when building with the FP16 flag (TensorRT 10).

    An element-wise or unary layer whose operation could not be read is pinned too: slower, not wrong.
    """
    islands = loop_body_layers(layers) | exp_island_layers(layers)
    picked = []
    for layer in layers:
        if not layer.float_outputs or layer.type in NEVER_CONSTRAINED_TYPES:
            continue
        sensitive = (
            layer.index in islands
            or layer.type in SENSITIVE_LAYER_TYPES
            or (layer.type == "UNARY" and (layer.op is None or layer.op in SENSITIVE_UNARY_OPS))
            or (layer.type == "ELEMENTWISE" and (layer.op is None or layer.op in SENSITIVE_ELEMENTWISE_OPS))
        )
        if sensitive:
            picked.append(layer.index)
    return picked


# ---------------------------------------------------------------------------------------------- names


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def plan_record(
    *,
    file: str,
    sha256: str,
    source_key: str,
    source_graph: Mapping[str, Any],
    strategy: str,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: str,
    profiles: Mapping[str, Mapping[str, Sequence[int]]],
    **extra: Any,
) -> dict[str, Any]:
    """One ``plans`` entry of the manifest."""
    record = {
        "file": file,
        "sha256": sha256,
        "source_graph": source_graph["file"],
        "source_key": source_key,
        "source_sha256": source_graph["sha256"],
        "precision": strategy_precision(strategy),
        "strategy": strategy,
        "tensorrt_version": str(tensorrt_version),
        "gpu_name": str(gpu_name),
        "compute_capability": str(compute_capability),
        "profiles": {k: {b: [int(x) for x in v[b]] for b in ("min", "opt", "max")} for k, v in profiles.items()},
        "built_at": utc_now(),
    }
    record.update(extra)
    return record


# ---------------------------------------------------------------------------------------------- device top-k


def add_topk_to_head(onnx_model: bytes | str | Path | Any, k_max: int):
    """The head graph with ``TopK`` over the image axis (axis 0) of ``sims`` (N, Q) appended.

    ``K = min(k_max, N)`` is computed in the graph (Shape -> Gather -> Min -> Reshape to a 1-D int64),
    so a block smaller than ``k_max`` still works. Outputs ``topk_scores`` (K, Q) (largest first,
    the dtype of ``sims``) and ``topk_index`` (K, Q) int64 row numbers within the block; ``sims``
    itself is no longer an output, so only (K, Q) values come back per block.
    Returns an ``onnx.ModelProto``; needs the ``onnx`` package (the export extra).
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k_max = _positive_int("k_max (--topk-max)", k_max)
    if k_max > TRT_TOPK_LIMIT:
        raise ProfileError(f"k_max (--topk-max) {k_max} exceeds TensorRT's TopK limit of {TRT_TOPK_LIMIT}")
    if isinstance(onnx_model, (bytes, bytearray)):
        model = onnx.load_from_string(bytes(onnx_model))
    elif isinstance(onnx_model, (str, Path)):
        model = onnx.load(str(onnx_model))
    elif isinstance(onnx_model, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(onnx_model)
    else:
        raise PlanError(
            f"add_topk_to_head: expected ONNX bytes, a path or a ModelProto, received {type(onnx_model).__name__}"
        )
    graph = model.graph
    sims = "sims"  # the head graph's output (export/exporter.py graph_specs)
    outputs = {o.name: o for o in graph.output}
    if sims not in outputs:
        raise PlanError(f"add_topk_to_head: the graph has no output {sims!r} (outputs: {sorted(outputs)})")
    sims_type = outputs[sims].type.tensor_type
    dims = [d.dim_param or d.dim_value for d in sims_type.shape.dim]
    if len(dims) != 2:
        raise PlanError(f"add_topk_to_head: {sims!r} must be 2-D (N, Q), its shape is {dims}")
    taken = {n.name for n in graph.node} | {t for n in graph.node for t in n.output}

    def fresh(base: str) -> str:
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        return name

    c_axis0, c_kmax, c_one = fresh("topk/axis0"), fresh("topk/k_max"), fresh("topk/shape1")
    t_shape, t_n, t_min, t_k = fresh("topk/sims_shape"), fresh("topk/n"), fresh("topk/k_scalar"), fresh("topk/k")
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(0, np.int64), c_axis0),
            numpy_helper.from_array(np.array(k_max, np.int64), c_kmax),
            numpy_helper.from_array(np.array([1], np.int64), c_one),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Shape", [sims], [t_shape], name=fresh("topk/Shape")),
            helper.make_node("Gather", [t_shape, c_axis0], [t_n], name=fresh("topk/Gather"), axis=0),
            helper.make_node("Min", [t_n, c_kmax], [t_min], name=fresh("topk/Min")),
            helper.make_node("Reshape", [t_min, c_one], [t_k], name=fresh("topk/Reshape")),
            helper.make_node(
                "TopK", [sims, t_k], list(TOPK_OUTPUTS), name=fresh("topk/TopK"), axis=0, largest=1, sorted=1
            ),
        ]
    )
    q_dim = dims[1]
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info(TOPK_OUTPUTS[0], sims_type.elem_type, ["K", q_dim]),
            helper.make_tensor_value_info(TOPK_OUTPUTS[1], TensorProto.INT64, ["K", q_dim]),
        ]
    )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise PlanError(f"add_topk_to_head: the extended graph does not validate ({e})") from e
    return model
