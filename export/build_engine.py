"""Build TensorRT plans from an export's ONNX graphs and record them in its manifest.

    python export/build_engine.py engines/scan.json [--out DIR] [--fp16 | --fp32] [--max-batch Q]
        [--max-words L] [--block N] [--regions R] [--timing-cache FILE] [--workspace-gb G] [--topk-max K]

Writes ``scan.plan`` (similarity head), ``scan.text.plan``, ``scan.image.plan`` and ``scan.topk.plan``
(the head with a device-side top-k, so a block returns (k, Q) results) and adds a ``plans`` record
for each to the manifest. A plan runs only on the TensorRT version and GPU model that built it:
build on the serving machine.

FP16: TensorRT 10 builds the fp32 graph with the FP16 flag and keeps reductions, softmax, exp/log,
the norms and the GRU loop in float32 (precision constraints); TensorRT 11 has no FP16 flag, so it
parses the exported fp16 graphs (whose fp32 islands are in the ONNX) into a strongly typed network.

Exit status: 0 built; 1 bad manifest or a failed build; 2 TensorRT, CUDA bindings or a GPU missing.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from export.progress import timed_progress
from export.trt_build import (
    DEFAULT_BLOCK,
    DEFAULT_MAX_BATCH,
    DEFAULT_REGIONS,
    DEFAULT_TOPK_MAX,
    FP16_FLAG,
    LayerInfo,
    PlanBuildError,
    TensorRTVersionError,
    add_topk_to_head,
    compute_profiles,
    fp32_layers,
    plan_record,
    precision_strategy,
    source_graph_key,
)
from runtime import atomic
from runtime.backends.base import BackendError
from runtime.backends.plan_check import PlanError
from runtime.install import installed_from_wheel
from runtime.logs import command_parser, setup_logging
from runtime.manifest import (
    PLAN_KINDS,
    STRONGLY_TYPED,
    Manifest,
    ManifestError,
    load_manifest,
    plan_file_name,
    plan_graph_kind,
    record_plans,
    relative_file,
)

logger = logging.getLogger(__name__)

DEFAULT_WORKSPACE_GB = 4.0


class MissingDependency(RuntimeError):
    """TensorRT, the CUDA bindings or a GPU is missing: exit status 2 with what to install."""


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(__doc__.split("\n\n")[0])
    p.add_argument("manifest", help="the export's manifest (engines/scan.json)")
    p.add_argument("--out", help="folder for the .plan files (default: the manifest's folder)")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", dest="fp32", action="store_false", help="FP16 engines with fp32 islands (default)")
    prec.add_argument("--fp32", dest="fp32", action="store_true", help="float32 engines (TF32 off)")
    p.set_defaults(fp32=False)
    p.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULT_MAX_BATCH,
        metavar="Q",
        help="most captions per call, dimension Q",
    )
    p.add_argument(
        "--max-words",
        type=int,
        default=None,
        metavar="L",
        help="longest caption in tokens, dimension L (default: the manifest's max_words)",
    )
    p.add_argument(
        "--block",
        type=int,
        default=DEFAULT_BLOCK,
        metavar="N",
        help="most images per call, dimension N",
    )
    p.add_argument(
        "--regions",
        type=int,
        default=DEFAULT_REGIONS,
        metavar="R",
        help="regions per image, fixed in the engine",
    )
    p.add_argument("--timing-cache", metavar="FILE", help="TensorRT timing cache: loaded if present, saved after")
    p.add_argument(
        "--workspace-gb",
        type=float,
        default=DEFAULT_WORKSPACE_GB,
        metavar="G",
        help="builder workspace limit in GiB",
    )
    p.add_argument(
        "--topk-max",
        type=int,
        default=DEFAULT_TOPK_MAX,
        metavar="K",
        help="largest k of the device top-k engine",
    )
    p.add_argument(
        "--kinds",
        default=",".join(PLAN_KINDS),
        help="engines to build, comma-separated",
    )
    return p


# ============================================================================================ TensorRT


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise MissingDependency(f"TensorRT is not installed ({e})") from e
    return trt


def open_gpu() -> tuple[str, str]:
    """(GPU name, compute capability) through the CUDA bindings the runtime also uses."""
    from runtime.backends.cuda_memory import open_allocator

    try:
        return open_allocator().device_info()
    except BackendError as e:
        raise MissingDependency(str(e)) from e


def make_logger(trt):
    """A TensorRT logger that forwards to ``logging`` and keeps the errors for the exception message."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):  # called by TensorRT, possibly from its own threads
            sev = trt.ILogger.Severity
            if severity in (sev.INTERNAL_ERROR, sev.ERROR):
                self.errors.append(str(msg))
                logger.error("TensorRT: %s", msg)
            elif severity == sev.WARNING:
                logger.warning("TensorRT: %s", msg)
            else:
                logger.debug("TensorRT: %s", msg)

    return _Logger()


_OP_CLASSES = {"UNARY": "IUnaryLayer", "ELEMENTWISE": "IElementWiseLayer"}
_FLOAT_TYPES = ("float32", "float16")


def _layer_op(trt, layer) -> str | None:
    """The unary / element-wise operation of a layer; ``get_layer`` returns a plain ILayer, so the
    Python object is re-classed to reach ``op`` (the pattern Polygraphy uses)."""
    cls_name = _OP_CLASSES.get(layer.type.name)
    if cls_name is None:
        return None
    try:
        layer.__class__ = getattr(trt, cls_name)
        return layer.op.name
    except Exception:  # an unknown binding layout: fp32_layers() then pins the layer conservatively
        return None


def network_layers(trt, network) -> list[LayerInfo]:
    float_types = {getattr(trt, t) for t in _FLOAT_TYPES}
    infos = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        ins = [layer.get_input(j) for j in range(layer.num_inputs)]
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        infos.append(
            LayerInfo(
                index=i,
                name=layer.name,
                type=layer.type.name,
                op=_layer_op(trt, layer),
                inputs=tuple(t.name for t in ins if t is not None),
                outputs=tuple(t.name for t in outs if t is not None),
                float_outputs=bool(outs) and all(t is not None and t.dtype in float_types for t in outs),
            )
        )
    return infos


def pin_sensitive_layers(trt, network) -> int:
    """TensorRT 10 FP16-flag path: keep the numerically sensitive layers in float32."""
    picked = fp32_layers(network_layers(trt, network))
    for i in picked:
        layer = network.get_layer(i)
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
    return len(picked)


def parse_network(trt, builder, tlog, source: Path | bytes, strategy: str, label: str):
    flags = 0
    if strategy == STRONGLY_TYPED and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        # Required on 10.x for a strongly typed network; deprecated and ignored (always on) in 11.
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    if network is None:
        raise PlanBuildError(f"{label}: Builder.create_network returned None")
    parser = trt.OnnxParser(network, tlog)
    if parser is None:
        raise PlanBuildError(f"{label}: trt.OnnxParser returned None")
    if isinstance(source, (bytes, bytearray)):
        ok = parser.parse(bytes(source))
        call = "OnnxParser.parse"
    else:
        ok = parser.parse_from_file(str(source))  # resolves external weight files beside the graph
        call = f"OnnxParser.parse_from_file({source})"
    if not ok:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or tlog.errors or ["(no message)"]
        raise PlanBuildError(f"{label}: {call} failed with {len(errors)} error(s):\n  " + "\n  ".join(errors))
    return network, parser  # the parser owns weights the network refers to: keep it alive


def load_timing_cache(config, blob: bytes, label: str):
    cache = config.create_timing_cache(blob)
    if cache is None:
        raise PlanBuildError(f"{label}: IBuilderConfig.create_timing_cache returned None")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        if not blob:
            raise PlanBuildError(f"{label}: IBuilderConfig.set_timing_cache refused an empty cache")
        # A cache from another GPU or TensorRT version: start a fresh one rather than fail the build.
        logger.warning("%s: the timing cache belongs to another GPU or TensorRT version; starting a new one", label)
        cache = config.create_timing_cache(b"")
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            raise PlanBuildError(f"{label}: IBuilderConfig.set_timing_cache failed on a new cache")
    return cache


def build_serialized(
    trt,
    *,
    source: Path | bytes,
    strategy: str,
    profiles: dict[str, dict[str, list[int]]],
    workspace_gb: float,
    timing_blob: bytes | None,
    label: str,
    progress: Callable[[str], None],
) -> tuple[bytes, bytes | None]:
    """Parse and build one engine; returns (plan bytes, updated timing cache bytes or None)."""
    tlog = make_logger(trt)
    try:
        builder = trt.Builder(tlog)
    except Exception as e:  # pybind raises when the factory returns nullptr (no GPU / driver)
        raise MissingDependency(f"trt.Builder failed ({e}); it needs a CUDA GPU and driver") from e
    if builder is None:
        raise MissingDependency("trt.Builder returned None; it needs a CUDA GPU and driver")
    network, _parser = parse_network(trt, builder, tlog, source, strategy, label)
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(names) != sorted(profiles):
        raise PlanBuildError(
            f"{label}: the network's inputs {sorted(names)} differ from the manifest's "
            f"{sorted(profiles)}; re-export the graphs"
        )
    config = builder.create_builder_config()
    if config is None:
        raise PlanBuildError(f"{label}: Builder.create_builder_config returned None")
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if hasattr(trt.BuilderFlag, "TF32"):
        # TF32 matmuls keep 10 mantissa bits: off, so fp32 engines match ONNX Runtime to ~1e-5 and the
        # fp32 islands of the fp16 engines are real fp32.
        config.clear_flag(trt.BuilderFlag.TF32)
    if strategy == FP16_FLAG:
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise TensorRTVersionError(
                f"TensorRT {trt.__version__} has no BuilderFlag.FP16; use the strongly "
                "typed path (TensorRT 11+) or --fp32"
            )
        config.set_flag(trt.BuilderFlag.FP16)
        # OBEY, not PREFER: a silently ignored float32 pin is exactly the overflow this avoids.
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = pin_sensitive_layers(trt, network)
        progress(f"{label}: FP16 with {pinned} of {network.num_layers} layers pinned to float32")
    profile = builder.create_optimization_profile()
    if profile is None:
        raise PlanBuildError(f"{label}: Builder.create_optimization_profile returned None")
    for name, p in profiles.items():
        profile.set_shape(name, p["min"], p["opt"], p["max"])
    if config.add_optimization_profile(profile) < 0:
        raise PlanBuildError(f"{label}: IBuilderConfig.add_optimization_profile rejected {profiles}")
    cache = load_timing_cache(config, timing_blob, label) if timing_blob is not None else None
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        detail = ("\n  " + "\n  ".join(tlog.errors[-10:])) if tlog.errors else " (see the TensorRT log above)"
        raise PlanBuildError(f"{label}: Builder.build_serialized_network returned None{detail}")
    new_cache = bytes(memoryview(cache.serialize())) if cache is not None else None
    return bytes(memoryview(plan)), new_cache


# ============================================================================================ main


def build_all(manifest: Manifest, args: argparse.Namespace, progress: Callable[[str], None]) -> dict[str, Any]:
    trt = import_tensorrt()
    gpu_name, cc = open_gpu()
    strategy = precision_strategy(trt.__version__, fp32=args.fp32)
    progress(f"TensorRT {trt.__version__} on {gpu_name} (compute capability {cc}); strategy {strategy}")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in PLAN_KINDS]
    if unknown or not kinds:
        raise PlanError(f"--kinds: unknown plan kind(s) {unknown or kinds}; choose from {', '.join(PLAN_KINDS)}")
    out = Path(args.out) if args.out else manifest.directory
    max_words = args.max_words if args.max_words is not None else manifest.max_words
    cache_path = Path(args.timing_cache) if args.timing_cache else None
    timing_blob: bytes | None = None
    if cache_path is not None:
        timing_blob = cache_path.read_bytes() if cache_path.is_file() else b""
        progress(f"timing cache {cache_path} ({f'loaded, {len(timing_blob)} bytes' if timing_blob else 'new'})")
    # What stays the same for every plan of this run, bound once.
    build = functools.partial(
        build_serialized, trt, strategy=strategy, workspace_gb=args.workspace_gb, progress=progress
    )
    record = functools.partial(
        plan_record, strategy=strategy, tensorrt_version=trt.__version__, gpu_name=gpu_name, compute_capability=cc
    )
    records: dict[str, Any] = {}
    for kind in kinds:
        key = source_graph_key(kind, strategy)
        try:
            graph = manifest.graph(plan_graph_kind(kind), "fp16" if strategy == STRONGLY_TYPED else "fp32")
        except ManifestError as e:
            raise ManifestError(
                f"{e}; TensorRT {trt.__version__} builds FP16 only from the exported fp16 graphs: "
                "re-export with them, or build with --fp32"
            ) from e
        path = manifest.file(graph)  # refuses a graph whose sha256 differs from the manifest's
        profiles = compute_profiles(
            graph["inputs"], max_batch=args.max_batch, max_words=max_words, block=args.block, regions=args.regions
        )
        source: Path | bytes = path
        extra: dict[str, Any] = {}
        if kind == "topk":
            source = add_topk_to_head(path, args.topk_max).SerializeToString()
            extra["topk_max"] = args.topk_max
        label = f"{kind} engine"
        progress(
            f"building {label} from {path.name} ({strategy}); profiles "
            + ", ".join(f"{n} {p['min']}..{p['max']}" for n, p in profiles.items())
        )
        t0 = time.perf_counter()
        plan, timing_blob = build(source=source, profiles=profiles, timing_blob=timing_blob, label=label)
        target = out / plan_file_name(manifest.name, kind)
        atomic.write_bytes(target, plan)
        if cache_path is not None and timing_blob:
            atomic.write_bytes(cache_path, timing_blob)  # after every engine: a later failure keeps the tuning
        records[kind] = record(
            file=relative_file(manifest.directory, target),
            sha256=hashlib.sha256(plan).hexdigest(),
            source_key=key,
            source_graph=graph,
            profiles=profiles,
            build_seconds=round(time.perf_counter() - t0, 1),
            **extra,
        )
        # Record each plan as soon as it is complete, so an interrupted run keeps what it built.
        record_plans(manifest.path, {kind: records[kind]})
        progress(f"{kind}: wrote {target} ({len(plan) / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f}s")
    return records


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(logging.WARNING, args.log_format)
    progress = timed_progress()

    if not args.workspace_gb > 0:
        print(f"error: --workspace-gb must be positive, received {args.workspace_gb}", file=sys.stderr)
        return 1
    try:
        manifest = load_manifest(args.manifest)
        records = build_all(manifest, args, progress)
    except (MissingDependency, TensorRTVersionError) as e:
        search = "scan-search" if installed_from_wheel() else "python runtime/search.py"
        print(
            f"error: {e}\n"
            "TensorRT engines need an NVIDIA GPU and driver with TensorRT 10+ and CUDA Python bindings: "
            "pip install tensorrt cuda-python (on that machine).\n"
            f"Meanwhile the ONNX graphs serve: {search} --engine {args.manifest} ...",
            file=sys.stderr,
        )
        return 2
    except (ManifestError, PlanError, BackendError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    progress("done")
    for kind, rec in records.items():
        print(
            f"  {rec['file']}  ({kind}, {rec['precision']} {rec['strategy']}, TensorRT {rec['tensorrt_version']}, "
            f"{rec['gpu_name']})"
        )
    print(f"  {args.manifest}  (manifest: plans recorded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
