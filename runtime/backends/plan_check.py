"""Serve-time checks of a TensorRT plan: does the manifest's record fit this TensorRT, this GPU, the graph
the manifest lists now, and the plan file on disk? And does a call fit the plan's optimization profile?

The build-time side (profiles, precision strategy, layer pinning, the top-k graph) is export/trt_build.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from runtime import atomic
from runtime.backends.base import BackendError
from runtime.manifest import PLAN_BUILD_SCRIPT, Manifest, ManifestError

# Outputs of the top-k plan (the head graph with a TopK appended, export/trt_build.add_topk_to_head).
TOPK_OUTPUTS = ("topk_scores", "topk_index")


class PlanError(BackendError):
    """Base of the TensorRT plan errors; every message says what to change."""


class PlanMismatchError(PlanError):
    """A recorded plan does not belong to this TensorRT, GPU, graph, or plan file."""


def shape_in_profile(shape: Sequence[int], profile: Mapping[str, Sequence[int]]) -> bool:
    lo, hi = profile["min"], profile["max"]
    return len(shape) == len(lo) and all(a <= s <= b for s, a, b in zip(shape, lo, hi))


def _rebuild_hint(manifest: Manifest) -> str:
    return f"rebuild the plans on this machine: python {PLAN_BUILD_SCRIPT} {manifest.path}"


def check_plan_record(manifest: Manifest, kind: str, trt_version: str, gpu_name: str, compute_capability: str) -> Path:
    """Return the plan file of ``kind`` if it may run here; raise PlanMismatchError saying why not.

    A TensorRT plan only runs on the TensorRT version and GPU it was built for, and it must come from
    the graph the manifest lists now (a re-export changes the weights).
    """
    try:
        record = manifest.plan(kind)
    except ManifestError as e:
        raise PlanMismatchError(str(e)) from e
    plan = manifest.directory / str(record.get("file", ""))
    problems = []
    if str(record.get("tensorrt_version")) != str(trt_version):
        problems.append(
            f"built by TensorRT {record.get('tensorrt_version')}, this is TensorRT {trt_version} "
            "(plans are specific to the TensorRT version)"
        )
    if str(record.get("compute_capability")) != str(compute_capability):
        problems.append(
            f"built for compute capability {record.get('compute_capability')} "
            f"({record.get('gpu_name')}), this GPU is {gpu_name} with compute capability "
            f"{compute_capability}"
        )
    elif str(record.get("gpu_name")) != str(gpu_name):
        problems.append(
            f"built on a {record.get('gpu_name')}, this GPU is a {gpu_name} "
            "(plans are tuned for, and only guaranteed on, the GPU model they were built on)"
        )
    key = manifest.plan_source_key(kind)
    graph = manifest.graphs.get(key)
    if graph is None:
        problems.append(f"built from the {key} graph, which {manifest.path.name} no longer lists")
    elif graph.get("sha256") != record.get("source_sha256"):
        problems.append(
            f"built from {record.get('source_graph')} sha256 {str(record.get('source_sha256'))[:12]}..., "
            f"the manifest's {key} graph is now {graph.get('file')} "
            f"sha256 {str(graph.get('sha256'))[:12]}... (the model was re-exported)"
        )
    if problems:
        raise PlanMismatchError(f"TensorRT {kind} plan {plan}: " + "; ".join(problems) + f". {_rebuild_hint(manifest)}")
    if not plan.is_file():
        raise PlanMismatchError(
            f"TensorRT {kind} plan {plan}: listed in {manifest.path} but missing. {_rebuild_hint(manifest)}"
        )
    actual = atomic.sha256_file(plan)
    if actual != record.get("sha256"):
        raise PlanMismatchError(
            f"TensorRT {kind} plan {plan}: sha256 {actual[:12]}... differs from the "
            f"{str(record.get('sha256'))[:12]}... recorded in {manifest.path} (the file was "
            f"replaced or damaged). {_rebuild_hint(manifest)}"
        )
    return plan
