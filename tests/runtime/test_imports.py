"""runtime/ is serve-time code: every module imports with torch and onnx made unimportable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BLOCKER = r"""
import importlib, importlib.abc, pkgutil, sys

BLOCKED = ("torch", "onnx")

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:  # onnx and onnx.*, not onnxruntime
            raise ImportError(f"{name} is blocked: runtime/ must not import it")
        return None

for name in list(sys.modules):
    if name.split(".")[0] in BLOCKED:
        del sys.modules[name]
sys.meta_path.insert(0, Blocker())

import runtime
names = sorted(m.name for m in pkgutil.walk_packages(runtime.__path__, "runtime."))
for name in names:
    importlib.import_module(name)
leaked = sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED)
assert not leaked, leaked
print(len(names), " ".join(names))
"""


def test_every_runtime_module_imports_without_torch_and_onnx() -> None:
    out = subprocess.run([sys.executable, "-c", BLOCKER], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    count, names = out.stdout.split(maxsplit=1)
    names = names.split()
    # the walk must have seen the package, including the backends, or the test proves nothing
    assert int(count) == len(names) >= 10
    for expected in (
        "runtime.engine",
        "runtime.searcher",
        "runtime.manifest",
        "runtime.backends.tensorrt",
        "runtime.backends.plan_check",
        "runtime.backends.cuda_memory",
        "runtime.backends.onnxruntime",
    ):
        assert expected in names


def test_the_blocker_blocks() -> None:
    """The same blocker makes an import of onnx fail, so a pass above means something."""
    code = BLOCKER.split("import runtime")[0] + "import onnx\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "onnx is blocked" in out.stderr
