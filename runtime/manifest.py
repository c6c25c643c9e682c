"""The export manifest ``<name>.json``: what was exported, from what, and how it was verified.

It binds the graphs, the vocabulary and any TensorRT engines to one checkpoint: every file is listed
with its sha256, and a file that does not match is refused rather than served.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.atomic import sha256_file
from runtime.config import ConfigError, SCANConfig

FORMAT = "scan-runtime/1"


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
        return int(self.data.get("max_words", 128))

    @property
    def image_encoder_id(self) -> str:
        return str(self.data["image_encoder_id"])

    @property
    def text_encoder_id(self) -> str:
        return str(self.data["text_encoder_id"])

    def graph(self, kind: str, precision: str = "fp32") -> dict[str, Any]:
        key = kind if precision == "fp32" else f"{kind}.{precision}"
        graphs = self.data.get("graphs", {})
        if key not in graphs:
            raise ManifestError(f"manifest {self.path}: no {precision} {kind} graph (has {sorted(graphs)})")
        return graphs[key]

    def file(self, entry: dict[str, Any], verify: bool = True) -> Path:
        """Resolve a listed file next to the manifest; refuse it if missing or if its sha256 differs."""
        path = self.directory / entry["file"]
        if not path.is_file():
            raise ManifestError(f"{path}: listed in {self.path} but missing; re-run export/to_onnx.py")
        if verify and entry.get("sha256") and sha256_file(path) != entry["sha256"]:
            raise ManifestError(
                f"{path}: sha256 differs from the one recorded in {self.path}; the file was changed or "
                f"belongs to another export. Re-export rather than mixing artifacts.")
        return path

    def vocab_path(self) -> Path:
        return self.file(self.data["vocab"])


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"manifest {path}: not valid UTF-8 JSON ({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ManifestError(f"manifest {path}: expected format {FORMAT!r}, got {got!r}")
    for key in ("name", "config", "graphs", "vocab", "image_encoder_id", "text_encoder_id"):
        if key not in data:
            raise ManifestError(f"manifest {path}: missing key {key!r}")
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
