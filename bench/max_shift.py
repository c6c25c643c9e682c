"""What the max subtraction before the attention exp would cost the float32 head graph in ONNX Runtime (CPU).

    python -m bench.max_shift [--quick] [--json bench/results/max_shift.json]

The float16 head subtracts the max before ``exp`` for every lambda (its Gram GEMM is float16); the float32
head skips it for bounded norms with lambda_softmax <= 30 (export/model.py). Baseline: the exported
float32 head as it is. Contender: the same head traced with the float16 head's always-shifted weights.
Both in one process on the same inputs, timed in alternation (``harness.interleaved``); medians, p10/p90
and the contender/baseline ratio per direction, the largest |difference| of their similarities, and the
load average before and after.
"""

from __future__ import annotations

import io
import sys
import warnings
from contextlib import contextmanager
from typing import Any

import numpy as np

from bench import harness
from bench.synthetic import unit_rows


@contextmanager
def shifted_attention():
    """``export.model._attention_weights`` with ``shift`` forced on while a graph is traced."""
    import export.model as model

    plain = model._attention_weights
    model._attention_weights = lambda *a: plain(*a[:6], True)
    try:
        yield
    finally:
        model._attention_weights = plain


def head_graph(cfg, feeds: dict[str, np.ndarray], shifted: bool) -> bytes:
    import torch

    from export.exporter import OPSET
    from export.graphs import HeadGraph, head_input_names

    names = head_input_names(cfg)
    buf = io.BytesIO()
    with warnings.catch_warnings(), shifted_attention() if shifted else _nothing():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            HeadGraph(cfg).eval(),
            tuple(torch.from_numpy(feeds[k]) for k in names),
            buf,
            input_names=names,
            output_names=["sims"],
            dynamic_axes={k: {0: "batch"} for k in names},
            opset_version=OPSET,
            dynamo=False,
        )
    return buf.getvalue()


@contextmanager
def _nothing():
    yield


def measure(n: int, r: int, q: int, length: int, d: int, rounds: int, seed: int = 0) -> dict[str, Any]:
    from runtime.backends.onnxruntime import open_session
    from runtime.config import SCANConfig

    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {
        "shape": {"N": n, "R": r, "Q": q, "L": length, "d": d},
        "load_average_before": harness.load_average(),
    }
    for mode in ("t2i", "i2t"):
        cfg = SCANConfig(vocab_size=10, embed_size=d, cross_attn=mode, lambda_softmax=9.0)  # clipped_l2norm
        images, captions = unit_rows(rng, (n, r, d)), unit_rows(rng, (q, length, d))
        lengths = rng.integers(3, length + 1, q).astype(np.int64)
        lengths[0] = length
        captions *= (np.arange(length)[None, :] < lengths[:, None])[..., None]
        feeds = {
            "images": images,
            "image_gram": images @ images.transpose(0, 2, 1),
            "captions": captions,
            "lengths": lengths,
        }
        sessions = {tag: open_session(head_graph(cfg, feeds, tag == "shifted")) for tag in ("unshifted", "shifted")}
        inputs = {tag: {i.name: feeds[i.name] for i in s.get_inputs()} for tag, s in sessions.items()}
        answers: dict[str, np.ndarray] = {}
        calls = {tag: _call(sessions[tag], inputs[tag], answers, tag) for tag in sessions}
        samples = harness.interleaved(calls, rounds, warmup=2, rotate=True, settle=True)
        cell = {tag: harness.stats(s) for tag, s in samples.items()}
        cell["shifted_over_unshifted"] = cell["shifted"]["median"] / cell["unshifted"]["median"]
        cell["max_abs_diff"] = float(np.abs(answers["shifted"] - answers["unshifted"]).max())
        out[mode] = cell
    out["load_average_after"] = harness.load_average()
    return out


def _call(session, inputs: dict[str, np.ndarray], answers: dict[str, np.ndarray], tag: str):
    def fn(_i: int) -> None:
        answers[tag] = session.run(None, inputs)[0]

    return fn


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, quick="small shapes and few rounds: a smoke run", seed=False)
    args = p.parse_args(argv)
    shape = (
        dict(n=32, r=8, q=2, length=5, d=16, rounds=3)
        if args.quick
        else dict(n=512, r=36, q=8, length=12, d=128, rounds=15)
    )
    report = {"started": harness.started(), "machine": harness.describe(), **measure(**shape)}
    shape_text, load = report["shape"], report["load_average_before"]
    lines = [f"max subtraction in the float32 head, ONNX Runtime CPU, {shape_text}, load {load}"]
    for mode in ("t2i", "i2t"):
        c = report[mode]
        ms = {k: 1e3 * c[k]["median"] for k in ("unshifted", "shifted")}
        lines.append(
            f"  {mode}: unshifted {ms['unshifted']:.1f} ms, shifted {ms['shifted']:.1f} ms "
            f"(x{c['shifted_over_unshifted']:.2f}; shifted p10-p90 {1e3 * c['shifted']['p10']:.1f}-"
            f"{1e3 * c['shifted']['p90']:.1f} ms), max |diff| {c['max_abs_diff']:.1e}"
        )
    harness.finish(report, "\n".join(lines), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
