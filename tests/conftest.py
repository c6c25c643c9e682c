"""Shared fixtures: the golden cases from the original SCAN code (tests/golden/) and small exported models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


# Part of the repository: a missing case is a broken checkout, so it fails loudly instead of skipping.
GOLDEN = Path(__file__).resolve().parent / "golden"
GOLDEN_CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "case.json").is_file())
if not GOLDEN_CASES:
    raise RuntimeError(f"no golden cases under {GOLDEN}: the checkout is incomplete (see tests/golden/README.md)")


@pytest.fixture(params=GOLDEN_CASES)
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


@pytest.fixture(scope="session")
def t2i_export(tmp_path_factory) -> Path:
    """The t2i golden case exported once per session: the TensorRT and pycuda stand-in tests build plans
    from copies of it (tests.fake_tensorrt.copy_export)."""
    from tests.fake_tensorrt import export_golden

    return export_golden("t2i_lse_f30k", tmp_path_factory.mktemp("t2i_export"))
