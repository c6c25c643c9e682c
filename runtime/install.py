"""The install command for an optional part (an extra) of scan-runtime, said the way this copy was installed.

A hint must work when pasted: in a clone (installed editable, or used from its root) the extra comes from the
clone, ``pip install -e '<clone>[serve]'``; an installed wheel takes it from the distribution's own
metadata, ``pip install 'scan-runtime[serve]'`` (pip keeps the installed scan-runtime and adds the extra's
requirements).
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "scan-runtime"
# torch for export and the demo's training: PyPI's Linux wheels are CUDA builds of several GB; PyTorch's own
# index serves the CPU build.
TORCH_CPU = "pip install torch --index-url https://download.pytorch.org/whl/cpu"

_ROOT = Path(__file__).resolve().parent.parent  # the clone, or site-packages for an installed wheel


def installed_from_wheel() -> bool:
    """True when this module is the file an installed, non-editable scan-runtime put in site-packages."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return False
    direct = dist.read_text("direct_url.json")
    if direct and json.loads(direct).get("dir_info", {}).get("editable"):
        return False
    if dist.read_text("RECORD") is None:
        # Not installed by pip: the egg-info that `pip install -e .` leaves in a clone, found when the clone's
        # root is on sys.path (python -m from the root, pytest); its files are the clone's, relative to the root.
        return False
    try:
        return Path(str(dist.locate_file("runtime/install.py"))).resolve() == Path(__file__).resolve()
    except OSError:
        return False


def install_command(*extras: str) -> str:
    """``pip install ...`` that adds ``extras`` to this copy of scan-runtime."""
    spec = ",".join(extras)
    if installed_from_wheel():
        return f"pip install '{DISTRIBUTION}[{spec}]'"
    root = "." if Path.cwd().resolve() == _ROOT else str(_ROOT)
    return f"pip install -e '{root}[{spec}]'"
