"""Thread budgets from the core count (runtime/threads.py) and their use by ONNX Runtime sessions."""

from __future__ import annotations

import pytest

from runtime.threads import MAX_INTRA_OP, Threads, available_cores, blas_library, limit_blas


def test_small_and_large_machines_get_sensible_budgets():
    two = Threads.for_cores(2)
    assert (two.intra_op, two.inter_op, two.blas, two.batch_workers) == (2, 1, 2, 1)
    assert two.spinning is False and two.http_processes == 1
    one = Threads.for_cores(1)
    assert (one.intra_op, one.blas, one.batch_workers) == (1, 1, 1)
    big = Threads.for_cores(64)  # a session's pool stops at MAX_INTRA_OP; more cores mean more batch workers
    assert big.intra_op == MAX_INTRA_OP and big.batch_workers == 64 // MAX_INTRA_OP
    assert big.intra_op * big.batch_workers <= 64
    assert Threads.for_cores().cores == available_cores() >= 1
    assert Threads.for_cores(8).to_dict()["intra_op"] == 8


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "4"])
def test_a_bad_core_count_is_refused(bad):
    with pytest.raises(ValueError, match="cores must be a positive integer"):
        Threads.for_cores(bad)


def test_blas_limit_is_applied_when_threadpoolctl_is_installed():
    pytest.importorskip("threadpoolctl")
    import numpy as np  # noqa: F401  (loads the BLAS that threadpoolctl limits)

    try:
        assert limit_blas(1) is not None and "(1 threads)" in blas_library()
    finally:
        limit_blas(Threads.for_cores().blas)


def test_sessions_take_the_budget_unless_told(monkeypatch, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from runtime.backends import onnxruntime as backend

    seen = []

    class Session:
        def __init__(self, source, sess_options, providers):
            seen.append(sess_options)

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(ort, "InferenceSession", Session)
    backend.open_session(b"model")
    backend.open_session(b"model", threads=3, inter_op_threads=2, spinning=True)
    budget = Threads.for_cores()
    default, told = seen
    assert (default.intra_op_num_threads, default.inter_op_num_threads) == (budget.intra_op, budget.inter_op)
    assert default.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert (told.intra_op_num_threads, told.inter_op_num_threads) == (3, 2)
    assert told.get_session_config_entry("session.intra_op.allow_spinning") == "1"
