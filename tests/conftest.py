"""Shared fixtures: the golden cases from the original SCAN code and small exported models."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def golden_root() -> Path | None:
    for candidate in (os.environ.get("SCAN_GOLDEN_DIR"), REPO.parent / "shared" / "golden", REPO / "shared" / "golden"):
        if candidate and (Path(candidate) / "README.md").is_file():
            return Path(candidate)
    return None


GOLDEN = golden_root()
GOLDEN_CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "case.json").is_file()) if GOLDEN else []


@pytest.fixture(params=GOLDEN_CASES or [pytest.param(None, marks=pytest.mark.skip(reason="no shared/golden"))])
def golden(request) -> Path:
    return GOLDEN / request.param


def golden_case(path: Path) -> dict:
    return json.loads((path / "case.json").read_text())


def golden_expected(path: Path) -> np.ndarray:
    return np.load(path / "expected_sims.npy")


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """Export each golden checkpoint once per session: {case name: manifest path}."""
    from export.to_onnx import main

    out = {}
    for case in GOLDEN_CASES:
        d = tmp_path_factory.mktemp(f"export_{case}")
        rc = main([str(GOLDEN / case / "ckpt.pth.tar"), "--vocab", str(GOLDEN / case / "vocab.json"), "--out", str(d)])
        assert rc == 0
        out[case] = d / "scan.json"
    return out
