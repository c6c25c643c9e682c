"""The export manifest is validated whole on load: schema, every file's sha256, and the seal over its content."""

from __future__ import annotations

import json
import shutil

import pytest

from runtime.manifest import ManifestError, load_manifest, record_plans, write_manifest
from runtime.search import main as search_main


@pytest.fixture
def export(small_engines, tmp_path):
    """A private copy of the small t2i export (the manifest and the files it lists)."""
    folder = tmp_path / "engines"
    shutil.copytree(small_engines["t2i"].parent, folder)
    return folder / "scan.json"


def _edit(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


MUTATIONS = {
    "graph sha256 deleted": (lambda m: m["graphs"]["head"].pop("sha256"), r"graphs\['head'\]: 'sha256' is missing"),
    "graph file deleted": (lambda m: m["graphs"]["text"].pop("file"), r"graphs\['text'\]: 'file' is missing"),
    "graph sha256 not hex": (
        lambda m: m["graphs"]["image"].__setitem__("sha256", "abc"),
        r"graphs\['image'\]: 'sha256' must be 64 lowercase hex digits, got 'abc'",
    ),
    "graph inputs not a list": (
        lambda m: m["graphs"]["head"].__setitem__("inputs", "images"),
        r"graphs\['head'\]: 'inputs' must be a list",
    ),
    "vocab not an object": (
        lambda m: m.__setitem__("vocab", "scan.vocab.json"),
        r"'vocab' must be an object with 'file' and 'sha256', got 'scan.vocab.json'",
    ),
    "vocab sha256 deleted": (lambda m: m["vocab"].pop("sha256"), r"'vocab': 'sha256' is missing"),
    "max_words a string": (lambda m: m.__setitem__("max_words", "abc"), r"'max_words' must be an integer, got 'abc'"),
    "max_words zero": (lambda m: m.__setitem__("max_words", 0), r"'max_words' must be at least 1, got 0"),
    "max_words missing": (lambda m: m.pop("max_words"), r"'max_words' is missing"),
    "graphs a list": (lambda m: m.__setitem__("graphs", []), r"'graphs' must be an object, got \[\]"),
    "no graphs": (lambda m: m.__setitem__("graphs", {}), r"'graphs' lists no graph"),
    "encoder id a number": (lambda m: m.__setitem__("image_encoder_id", 5), r"'image_encoder_id' must be a string"),
    "config bad value": (lambda m: m["config"].__setitem__("agg_func", "Nope"), r"bad config .*agg_func"),
    "config missing": (lambda m: m.pop("config"), r"'config' is missing"),
    "plan without sha256": (
        lambda m: m.__setitem__("plans", {"head": {"file": "scan.plan"}}),
        r"plans\['head'\]: 'sha256' is missing",
    ),
    "config img_dim edited": (lambda m: m["config"].__setitem__("img_dim", 16), r"its content was edited after export"),
    "config cross_attn edited": (
        lambda m: m["config"].__setitem__("cross_attn", "i2t"),
        r"its content was edited after export",
    ),
    "max_words edited": (lambda m: m.__setitem__("max_words", 30), r"its content was edited after export"),
    "seal deleted": (lambda m: m.pop("content_sha256"), r"no 'content_sha256' .*re-export with export/to_onnx.py"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_every_mutation_is_one_clear_error(export, mutation):
    change, message = MUTATIONS[mutation]
    load_manifest(export)  # the unmodified export loads
    _edit(export, change)
    with pytest.raises(ManifestError, match=rf"manifest {export}: {message}"):
        load_manifest(export)


@pytest.mark.parametrize("mutation", ["graph sha256 deleted", "graph file deleted", "config img_dim edited"])
def test_cli_reports_a_bad_manifest_in_one_line(export, mutation, tmp_path, capsys):
    _edit(export, MUTATIONS[mutation][0])
    assert search_main(["--engine", str(export), "--gallery", str(tmp_path / "g"), "a dog ."]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: manifest {export}: ") and len(err.strip().splitlines()) == 1


def test_a_foreign_graph_is_refused_even_without_its_recorded_sha256(export, small_engines):
    shutil.copy(small_engines["i2t"].parent / "scan.onnx", export.parent / "scan.onnx")
    with pytest.raises(ManifestError, match="sha256 differs"):
        load_manifest(export).file(load_manifest(export).graph("head"))
    _edit(export, MUTATIONS["graph sha256 deleted"][0])  # the check can no longer be skipped this way
    with pytest.raises(ManifestError, match="'sha256' is missing"):
        load_manifest(export)


def test_recorded_plans_and_rewrites_keep_the_seal(export):
    record_plans(export, {"head": {"file": "scan.plan", "sha256": "ab" * 32}})
    assert load_manifest(export).plan("head")["sha256"] == "ab" * 32
    data = json.loads(export.read_text())
    data["max_words"] = 30
    write_manifest(export, data)  # the writer seals what it writes
    assert load_manifest(export).max_words == 30
    with pytest.raises(ManifestError, match="'max_words' must be an integer"):
        write_manifest(export, {**data, "max_words": "30"})  # and never writes what load would refuse
