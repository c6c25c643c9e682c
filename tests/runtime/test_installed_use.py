"""Installed use: the install hint follows how the project was installed; JSON log lines; one version."""

from __future__ import annotations

import json
import logging
import sys
from importlib import metadata
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10: pip carries a copy of tomli
    from pip._vendor import tomli as tomllib

import runtime
from runtime import install
from runtime.logs import JsonFormatter, setup_logging

ROOT = Path(__file__).resolve().parents[2]


class FakeDistribution:
    def __init__(self, direct_url: dict | None, files_at: Path, record: bool = True) -> None:
        self.direct_url = direct_url
        self.files_at = files_at
        self.record = record  # pip's list of the files it installed (an egg-info in a clone has none)

    def read_text(self, name: str) -> str | None:
        if name == "RECORD":
            return "runtime/install.py,,\n" if self.record else None
        return json.dumps(self.direct_url) if name == "direct_url.json" and self.direct_url is not None else None

    def locate_file(self, path: str) -> Path:
        return self.files_at / path


def _not_installed(name: str):
    raise metadata.PackageNotFoundError(name)


def test_hint_in_a_clone_names_the_clone(monkeypatch, tmp_path):
    monkeypatch.setattr(metadata, "distribution", _not_installed)
    monkeypatch.chdir(ROOT)
    assert install.install_command("serve") == "pip install -e '.[serve]'"
    monkeypatch.chdir(tmp_path)  # from elsewhere: the clone's path, so the command works where it is pasted
    assert install.install_command("cpu", "export") == f"pip install -e '{ROOT}[cpu,export]'"


def test_hint_for_an_editable_install_names_the_clone(monkeypatch, tmp_path):
    editable = FakeDistribution({"url": ROOT.as_uri(), "dir_info": {"editable": True}}, ROOT)
    monkeypatch.setattr(metadata, "distribution", lambda name: editable)
    monkeypatch.chdir(tmp_path)
    assert install.install_command("serve") == f"pip install -e '{ROOT}[serve]'"


def test_hint_for_an_installed_wheel_names_the_distribution(monkeypatch):
    wheel = FakeDistribution({"url": "file:///tmp/scan_runtime-0.1.0-py3-none-any.whl", "archive_info": {}}, ROOT)
    monkeypatch.setattr(metadata, "distribution", lambda name: wheel)
    assert install.install_command("serve") == "pip install 'scan-runtime[serve]'"
    # A wheel installed elsewhere while this clone's code runs (e.g. pytest from the clone): the clone's hint.
    monkeypatch.setattr(metadata, "distribution", lambda name: FakeDistribution(None, Path("/elsewhere")))
    assert install.install_command("serve").startswith("pip install -e ")


def test_hint_beside_the_clones_egg_info_names_the_clone(monkeypatch):
    """`pip install -e .` leaves scan_runtime.egg-info in the clone; with the root on sys.path it is found, and
    its files are the clone's own (relative to the root): still the clone's hint."""
    monkeypatch.setattr(metadata, "distribution", lambda name: FakeDistribution(None, ROOT, record=False))
    monkeypatch.chdir(ROOT)
    assert install.install_command("serve") == "pip install -e '.[serve]'"


def test_json_log_lines_carry_level_logger_message_extras_and_traceback():
    record = logging.LogRecord("runtime.x", logging.WARNING, __file__, 1, "%d items", (3,), None)
    record.request_id = "abc"
    out = json.loads(JsonFormatter().format(record))
    assert {k: out[k] for k in ("level", "logger", "message", "request_id")} == {
        "level": "WARNING",
        "logger": "runtime.x",
        "message": "3 items",
        "request_id": "abc",
    }
    assert out["time"].endswith("+00:00")
    try:
        raise ValueError("bad")
    except ValueError:
        failed = logging.LogRecord("runtime.x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    line = JsonFormatter().format(failed)
    assert "\n" not in line and "ValueError: bad" in json.loads(line)["exception"]


def test_setup_logging_rejects_an_unknown_format():
    with pytest.raises(ValueError, match="text, json"):
        setup_logging(logging.INFO, "xml")


def test_one_version():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'dynamic = ["version"]' in text and 'attr = "runtime.__version__"' in text
    assert runtime.__version__.count(".") >= 2


def test_every_console_script_names_a_main():
    """pyproject.toml's [project.scripts]: each target imports and is a ``main(argv=None) -> int``."""
    import importlib
    import inspect

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert {"scan-export", "scan-build-plan", "scan-search", "scan-serve", "scan-recall", "scan-bench"} <= set(scripts)
    for name, target in scripts.items():
        module, function = target.split(":")
        main = getattr(importlib.import_module(module), function)
        assert list(inspect.signature(main).parameters) == ["argv"], name


HELP_CHECK = """
import argparse, contextlib, importlib, io, json, sys
from runtime.logs import HelpFormatter

def undocumented(parser, where):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from undocumented(sub, f"{where} {name}")
        if not isinstance(action, argparse._HelpAction) and not (action.help and action.help.strip()):
            yield f"{where} {'/'.join(action.option_strings) or action.dest}"

out = {}
for name, target in json.loads(sys.argv[1]).items():
    module = importlib.import_module(target.split(":")[0])
    sys.argv[0] = name  # as the installed console script runs it
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        try:
            getattr(module, target.split(":")[1])(["--help"])
        except SystemExit as e:
            code = e.code
    parser = module.build_parser()
    out[name] = {
        "code": code,
        "help": text.getvalue(),
        "undocumented": list(undocumented(parser, name)),
        "formatter": parser.formatter_class is HelpFormatter,
    }
out["torch imported"] = sorted(m for m in sys.modules if m.split(".")[0] == "torch")
print(json.dumps(out))
"""


def test_every_console_script_helps_with_defaults_without_torch():
    """Each console script's ``--help``: named after the command that ran it (no fixed prog), help text for
    every flag, defaults shown, ``--log-format``; and answering it imports no torch (seconds to import)."""
    import subprocess

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    run = subprocess.run(
        [sys.executable, "-c", HELP_CHECK, json.dumps(scripts)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out.pop("torch imported") == []
    for name, got in out.items():
        assert got["code"] == 0 and got["help"].startswith(f"usage: {name} "), (name, got["help"][:200])
        assert got["undocumented"] == [], name
        assert got["formatter"] and "--log-format" in got["help"], name
    assert "(default: 8080)" in out["scan-serve"]["help"] and "(default: test)" in out["scan-recall"]["help"]
