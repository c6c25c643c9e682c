"""Tiny random models for the bench scripts' smoke tests (tests in CI have no ./demo).

Nothing imported here at collection: tests/helpers.py needs torch, and bench tests without it still run."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A tiny random t2i model (img_dim 12, embed 8) in the demo's layout: ``engines/scan.json`` inside."""
    pytest.importorskip("torch")  # exported with PyTorch
    pytest.importorskip("onnx")
    from tests.runtime.conftest import export_small

    folder = tmp_path_factory.mktemp("tiny_demo")
    export_small(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_member(tmp_path_factory, tiny_demo):
    """A second tiny model (another seed, the same img_dim): an ensemble's other member."""
    from tests.runtime.conftest import export_small

    return export_small(tmp_path_factory.mktemp("tiny_member"), seed=1)
