"""Constraint files for pip from pyproject.toml's requirements (used by the Makefile).

    python .ci/lowest.py --torch 'torch==2.13.0+cpu'   # the lowest versions pyproject.toml allows (make test-lowest)
    python .ci/lowest.py --freeze                      # this environment's versions (make constraints)

Lowest: every ``name>=X`` of the base requirements and of the extras the fast tests use becomes ``name==X``.
Not lowered: torch, pinned to the Makefile's CPU build (PyPI's Linux wheels of torch are CUDA builds of several
GB, and the CPU builds of older releases live on PyTorch's own index only); ray (the 'cluster' extra, 1.7 GB;
its tests skip without it) and ruff (the 'dev' extra, pinned; tests do not use it) are left out.

Freeze: the installed version of every requirement of scan-runtime's extras but gpu/cupy, and of their
requirements in turn, torch excepted (the Makefile pins it per platform).
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: pip carries a copy of tomli
    from pip._vendor import tomli as tomllib
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOWEST_EXTRAS = ("cpu", "export", "test", "bench", "serve", "scale")
FREEZE_EXTRAS = ("cpu", "export", "test", "bench", "dev", "serve", "scale", "cluster", "openvino")
NOT_PINNED = {"torch", "scan-runtime"}


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def lowest(torch: str) -> list[str]:
    p = project()
    reqs = [Requirement(r) for r in p["dependencies"]]
    reqs += [Requirement(r) for extra in LOWEST_EXTRAS for r in p["optional-dependencies"][extra]]
    out = [torch]
    for r in reqs:
        if canonicalize_name(r.name) in NOT_PINNED:
            continue
        bounds = [s.version for s in r.specifier if s.operator in (">=", "==")]
        if not bounds:
            sys.exit(f"{r}: no lower bound in pyproject.toml")
        out.append(f"{r.name}=={bounds[0]}")
    return out


def freeze() -> list[str]:
    p = project()
    todo = [(Requirement(r), ()) for r in p["dependencies"]]
    todo += [(Requirement(r), ()) for extra in FREEZE_EXTRAS for r in p["optional-dependencies"][extra]]
    pins: dict[str, str] = {}
    while todo:
        req, extras = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (extras or ("",))):
            continue
        name = canonicalize_name(req.name)
        if name in pins or name in NOT_PINNED:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional requirement this environment does not have
        pins[name] = f"{dist.metadata['Name']}=={dist.version}"
        todo += [(Requirement(r), tuple(req.extras)) for r in dist.requires or ()]
    return [pins[k] for k in sorted(pins)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--torch", help="the torch requirement to pin (the Makefile's TORCH)")
    mode.add_argument("--freeze", action="store_true", help="this environment's versions")
    args = ap.parse_args()
    if args.freeze:
        print(
            f"# The versions the test suite last passed on (Python {sys.version_info[0]}.{sys.version_info[1]}):\n"
            "# `make constraints` rewrites this file; the Makefile installs with it. torch is pinned by the Makefile."
        )
        lines = freeze()
    else:
        lines = lowest(args.torch)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
