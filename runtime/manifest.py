"""The export manifest ``<name>.json``, the one owner of its layout: what was exported, from what, and how
it was verified.

It binds the graphs, the vocabulary, the weights file and any TensorRT plans to one checkpoint: every
file is listed with its sha256, and a file that does not match is refused rather than served. Everything else reads the
manifest through :class:`Manifest` and writes it through :func:`write_manifest` / :func:`record_plans`;
the naming rules (graph keys, graph and plan file names) live here too.

Every manifest is checked against its schema on load (required keys and their types, a sha256 for every
listed file) and against its seal: ``content_sha256``, written by :func:`write_manifest`, covers every key
but the plans (the model config included), so an edited manifest is refused rather than served.

Vocabulary: the *engine* is the exported model as served (what ``--engine`` names, ``ScanEngine``); a
*graph* is an ONNX file; a *plan* is a TensorRT serialized engine file (``scan.plan``). The manifest key
for plans is ``plans``; manifests written before the rename say ``engines`` and are still read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime import atomic
from runtime.atomic import sha256_file
from runtime.config import ConfigError, SCANConfig

FORMAT = "scan-runtime/1"
GRAPH_PRECISIONS = ("fp32", "fp16")
# Longest caption an export serves, in tokens incl. <start>/<end> (export/to_onnx.py --max-words).
DEFAULT_MAX_WORDS = 128
# "topk" is the head graph with a TopK appended (export/trt_build.add_topk_to_head); it has no graph of its own.
PLAN_KINDS = ("head", "text", "image", "topk")
PLANS_KEY = "plans"
LEGACY_PLANS_KEY = "engines"
# The TensorRT build strategy that parses the fp16 graphs (TensorRT >= 11, strongly typed networks).
STRONGLY_TYPED = "strongly-typed"
PLAN_BUILD_SCRIPT = "export/build_engine.py"


# ---------------------------------------------------------------------------------------------- naming rules


def graph_key(kind: str, precision: str = "fp32") -> str:
    """Manifest ``graphs`` key: ``head`` (fp32) or ``head.fp16``."""
    if precision not in GRAPH_PRECISIONS:
        raise ManifestError(f"precision must be one of {GRAPH_PRECISIONS}, received {precision!r}")
    return kind if precision == "fp32" else f"{kind}.{precision}"


def graph_file_name(name: str, kind: str, precision: str = "fp32") -> str:
    """``scan.onnx`` (head), ``scan.text.onnx``, ``scan.image.fp16.onnx``, ..."""
    stem = name if kind == "head" else f"{name}.{kind}"
    return f"{stem}.onnx" if precision == "fp32" else f"{stem}.{precision}.onnx"


def vocab_file_name(name: str) -> str:
    return f"{name}.vocab.json"


def weights_file_name(name: str) -> str:
    """The encoders' weights as plain arrays (runtime/weights.py), for the array backends."""
    return f"{name}.weights.npz"


def check_plan_kind(kind: str) -> None:
    if kind not in PLAN_KINDS:
        raise ManifestError(f"unknown plan kind {kind!r}; expected one of {', '.join(PLAN_KINDS)}")


def plan_file_name(name: str, kind: str) -> str:
    """``scan.plan`` (head), ``scan.text.plan``, ``scan.image.plan``, ``scan.topk.plan``."""
    check_plan_kind(kind)
    return f"{name}.plan" if kind == "head" else f"{name}.{kind}.plan"


def plan_graph_kind(kind: str) -> str:
    """The manifest graph a plan kind is built from."""
    check_plan_kind(kind)
    return "head" if kind == "topk" else kind


def plan_source_key(kind: str, strategy: str) -> str:
    """Manifest ``graphs`` key a plan is parsed from: only the strongly typed path uses the fp16 graphs."""
    return graph_key(plan_graph_kind(kind), "fp16" if strategy == STRONGLY_TYPED else "fp32")


class ManifestError(ValueError):
    """A manifest, or a file it lists, is missing, malformed or does not match."""


@dataclass(frozen=True)
class Manifest:
    path: Path
    data: dict[str, Any]

    @property
    def directory(self) -> Path:
        return self.path.parent

    @property
    def name(self) -> str:
        return str(self.data["name"])

    @property
    def config(self) -> SCANConfig:
        try:
            return SCANConfig.from_dict(self.data["config"])
        except (ConfigError, TypeError) as e:
            raise ManifestError(f"manifest {self.path}: bad config ({e})") from e

    @property
    def max_words(self) -> int:
        return int(self.data.get("max_words", DEFAULT_MAX_WORDS))

    @property
    def image_encoder_id(self) -> str:
        return str(self.data["image_encoder_id"])

    @property
    def text_encoder_id(self) -> str:
        return str(self.data["text_encoder_id"])

    @property
    def graphs(self) -> dict[str, dict[str, Any]]:
        """``{graph key: entry}``; an entry has ``file``, ``sha256``, ``inputs`` and ``outputs``."""
        graphs = self.data.get("graphs")
        return graphs if isinstance(graphs, dict) else {}

    def graph(self, kind: str, precision: str = "fp32") -> dict[str, Any]:
        key = graph_key(kind, precision)
        graphs = self.graphs
        if key not in graphs:
            raise ManifestError(f"manifest {self.path}: no {precision} {kind} graph (has {sorted(graphs)})")
        return graphs[key]

    def dim_names(self, key: str) -> dict[str, list[Any]]:
        """``{tensor: shape}`` of graph ``key``'s inputs and outputs (ints, or names of dynamic dimensions)."""
        entry = self.graphs.get(key, {})
        return {e["name"]: list(e.get("shape", [])) for e in entry.get("inputs", []) + entry.get("outputs", [])}

    # ------------------------------------------------------------------ TensorRT plans

    @property
    def plans(self) -> dict[str, dict[str, Any]]:
        """``{plan kind: record}`` of the TensorRT plans built for this export (empty when none)."""
        plans = self.data.get(PLANS_KEY)
        if not isinstance(plans, dict) or not plans:
            plans = self.data.get(LEGACY_PLANS_KEY)
        return plans if isinstance(plans, dict) else {}

    def plan(self, kind: str) -> dict[str, Any]:
        """The record of the ``kind`` plan; ManifestError saying how to build it when there is none."""
        check_plan_kind(kind)
        record = self.plans.get(kind)
        if not isinstance(record, dict):
            raise ManifestError(
                f"{self.path} lists no TensorRT {kind} plan (has {sorted(self.plans) or 'none'}); "
                f"build it with: python {PLAN_BUILD_SCRIPT} {self.path}"
            )
        return record

    def plan_source_key(self, kind: str) -> str:
        """The graph key the ``kind`` plan was built from."""
        record = self.plan(kind)
        return str(record.get("source_key") or plan_source_key(kind, str(record.get("strategy", "fp32"))))

    @property
    def topk_max(self) -> int:
        """Largest k the device top-k plan returns; 0 when there is no top-k plan."""
        record = self.plans.get("topk")
        return int(record.get("topk_max", 0)) if isinstance(record, dict) else 0

    def file(self, entry: dict[str, Any]) -> Path:
        """Resolve a listed file next to the manifest; refuse it if missing or if its sha256 differs."""
        path = self.directory / entry["file"]
        if not path.is_file():
            raise ManifestError(f"{path}: listed in {self.path} but missing; re-run export/to_onnx.py")
        if sha256_file(path) != entry["sha256"]:
            raise ManifestError(
                f"{path}: sha256 differs from the one recorded in {self.path}; the file was changed or "
                f"belongs to another export. Re-export rather than mixing artifacts."
            )
        return path

    def vocab_path(self) -> Path:
        return self.file(self.data["vocab"])

    @property
    def weights(self) -> dict[str, Any]:
        """The record of the weights file (``file``, ``sha256``, ``arrays``); empty for exports older than it."""
        entry = self.data.get("weights")
        return entry if isinstance(entry, dict) else {}


# ---------------------------------------------------------------------------------------------- schema

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Keys a manifest may gain after export (build_engine.py records plans, each with its own sha256); the seal
# (``content_sha256``) covers every other key, the model config included.
UNSEALED_KEYS = (PLANS_KEY, LEGACY_PLANS_KEY, "content_sha256")


def content_sha256(data: Mapping[str, Any]) -> str:
    """sha256 of the manifest's sealed content: every key but the plans and the seal, canonical JSON."""
    sealed = {k: v for k, v in data.items() if k not in UNSEALED_KEYS}
    return hashlib.sha256(json.dumps(sealed, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _type_name(types: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", dict: "an object", list: "a list"}
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(names.get(t, t.__name__) for t in types)


def _need(path: Path, obj: Mapping[str, Any], key: str, types: type | tuple[type, ...], where: str = "") -> Any:
    if key not in obj:
        raise ManifestError(f"manifest {path}: {where}{key!r} is missing")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, types):
        raise ManifestError(f"manifest {path}: {where}{key!r} must be {_type_name(types)}, got {value!r:.60}")
    return value


def _file_entry(path: Path, entry: Any, where: str) -> None:
    if not isinstance(entry, dict):
        raise ManifestError(f"manifest {path}: {where} must be an object with 'file' and 'sha256', got {entry!r:.60}")
    _need(path, entry, "file", str, f"{where}: ")
    digest = _need(path, entry, "sha256", str, f"{where}: ")
    if not _SHA256.match(digest):
        raise ManifestError(f"manifest {path}: {where}: 'sha256' must be 64 lowercase hex digits, got {digest!r:.70}")


def _tensors(path: Path, entry: Mapping[str, Any], where: str) -> None:
    for side in ("inputs", "outputs"):
        tensors = _need(path, entry, side, list, f"{where}: ")
        for i, t in enumerate(tensors):
            at = f"{where}: {side}[{i}]: "
            if not isinstance(t, dict):
                raise ManifestError(f"manifest {path}: {at}must be an object, got {t!r:.60}")
            _need(path, t, "name", str, at)
            _need(path, t, "dtype", str, at)
            shape = _need(path, t, "shape", list, at)
            if not all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in shape):
                raise ManifestError(f"manifest {path}: {at}'shape' must hold integers and names, got {shape!r:.60}")


def validate(path: Path, data: Any) -> SCANConfig:
    """Check a whole manifest against its schema and its seal; the model config it holds.

    One ManifestError naming the first bad key, so a hand-edited or truncated manifest fails here, clearly,
    not deep in a backend.
    """
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ManifestError(f"manifest {path}: expected format {FORMAT!r}, got {got!r}")
    _need(path, data, "name", str)
    try:
        config = SCANConfig.from_dict(_need(path, data, "config", dict))
    except (ConfigError, TypeError, ValueError) as e:
        raise ManifestError(f"manifest {path}: bad config ({e})") from e
    if _need(path, data, "max_words", int) < 1:
        raise ManifestError(f"manifest {path}: 'max_words' must be at least 1, got {data['max_words']}")
    for key in ("image_encoder_id", "text_encoder_id"):
        if not _SHA256.match(_need(path, data, key, str)):
            raise ManifestError(f"manifest {path}: {key!r} must be 64 lowercase hex digits, got {data[key]!r:.70}")
    _file_entry(path, data.get("vocab"), "'vocab'")
    if "weights" in data:  # exports older than the array backend have none
        _file_entry(path, data["weights"], "'weights'")
    graphs = _need(path, data, "graphs", dict)
    if not graphs:
        raise ManifestError(f"manifest {path}: 'graphs' lists no graph")
    for key, entry in graphs.items():
        _file_entry(path, entry, f"graphs[{key!r}]")
        _tensors(path, entry, f"graphs[{key!r}]")
    for plans_key in (PLANS_KEY, LEGACY_PLANS_KEY):
        plans = data.get(plans_key)
        if plans is None:
            continue
        if not isinstance(plans, dict):
            raise ManifestError(f"manifest {path}: {plans_key!r} must be an object, got {plans!r:.60}")
        for kind, record in plans.items():
            _file_entry(path, record, f"{plans_key}[{kind!r}]")
    seal = data.get("content_sha256")
    if seal is None:
        raise ManifestError(
            f"manifest {path}: no 'content_sha256' (written before manifests were sealed); "
            f"re-export with export/to_onnx.py"
        )
    if seal != content_sha256(data):
        raise ManifestError(
            f"manifest {path}: its content was edited after export ('content_sha256' does not match "
            f"the config, graphs and other keys it seals); re-export rather than editing it"
        )
    return config


def write_manifest(path: str | Path, data: Mapping[str, Any]) -> None:
    """Write a whole manifest atomically (the exporter; write it after the files it lists)."""
    data = dict(data)
    if data.get("format") != FORMAT:
        raise ManifestError(f"manifest {path}: expected format {FORMAT!r}, got {data.get('format')!r}")
    data.setdefault(PLANS_KEY, {})
    data["content_sha256"] = content_sha256(data)
    validate(Path(path), data)  # never write what load_manifest would refuse
    atomic.write_json(Path(path), data)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise read-modify-write of the manifest between processes (POSIX advisory lock)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename still keeps the file whole
        yield
        return
    lock_path = path.with_name(f".{path.name}.lock")
    with open(lock_path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def record_plans(manifest_path: str | Path, records: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Add or replace ``plans[kind]`` records in the manifest on disk; every other key is kept.

    Re-reads the file under a lock rather than trusting an in-memory copy, since another tool may
    have changed it since it was loaded, and replaces it in one atomic rename. Records of a legacy
    ``engines`` key move to ``plans``.
    """
    path = Path(manifest_path)
    for kind in records:
        check_plan_kind(kind)
    with _locked(path):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(f"manifest {path}: cannot re-read it to record the plans ({e})") from e
        if not isinstance(data, dict):
            raise ManifestError(f"manifest {path}: not a JSON object")
        plans = data.get(PLANS_KEY)
        legacy = data.pop(LEGACY_PLANS_KEY, None)
        if not isinstance(plans, dict):
            plans = {}
        if isinstance(legacy, dict):
            plans = {**legacy, **plans}
        for kind, record in records.items():
            plans[kind] = dict(record)
        data[PLANS_KEY] = plans
        atomic.write_json(path, data)
    return data


def relative_file(manifest_dir: Path, target: Path) -> str:
    """Path of ``target`` as recorded in the manifest: relative to the manifest's folder."""
    return os.path.relpath(Path(target).resolve(), Path(manifest_dir).resolve())


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"manifest {path}: not valid UTF-8 JSON ({e})") from e
    validate(path, data)
    return Manifest(path=path, data=data)


def resolve_manifest(engine: str | Path) -> Manifest:
    """``--engine`` accepts the manifest itself or any file it lists (``scan.onnx``, ``scan.plan``)."""
    engine = Path(engine)
    if engine.suffix == ".json" and not engine.name.endswith(".vocab.json"):
        return load_manifest(engine)
    stem = engine.name.split(".")[0]
    candidate = engine.parent / f"{stem}.json"
    # A .plan that was never built (no TensorRT here) still names its export: the backend choice then
    # falls back to the manifest's ONNX graphs, with a warning.
    if not engine.exists() and not (engine.suffix == ".plan" and candidate.is_file()):
        raise ManifestError(f"engine {engine}: no such file; export one with export/to_onnx.py CKPT")
    if candidate.is_file():
        return load_manifest(candidate)
    raise ManifestError(f"engine {engine}: no manifest {candidate} beside it; pass the manifest with --engine")
