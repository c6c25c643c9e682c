"""Measure the constants of two-stage search's cost model (runtime/search_plan.py) on this machine.

    python -m bench.cost_model [--quick] [--write] [--json bench/results/cost_model.json]
                               [--small 2000] [--large 20000]

With the demo model (``make demo``) and galleries of the demo's scenes (``bench/scale.py``'s, cached under
``--cache``: 2K images (``--small``) for the exact head, the dense score, the flat index and the rerank; 20K
images (``--large``) for an IVF-SQ8 index), each part of a search is timed alone (median of ``--repeats``) at
two sizes of work and the two constants of its line are solved from the two medians:

* exact head:  ``t = exact * Qv * V * d + exact_pass * V * d`` (one query vs one batch of 32 queries);
* dense score: ``t = dense * Qv * V * d + dense_pass * V * d`` (the same two);
* flat index:  ``t = Qv * (scan_flat * V * d + neighbour_flat * k)`` (k = 256 and 2048 neighbours);
* IVF-SQ8:     ``t = Qv * (scan_ivfsq * visited * d + neighbour_ivfsq * k)`` (the same two k; visited =
  nlist + nprobe * V / nlist, nprobe 16);
* rerank:      ``t = rerank * Qv * M * R * d + rerank_query * Q`` (M = 50 and 250 candidates).

``--write`` stores them in runtime/search_costs.json, which searches read. Figures taken under load are
larger than on a quiet machine for every part alike; the choice depends on their ratios. The load average
is recorded beside them. About 2-4 minutes (``--quick``: fewer repeats).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench import harness
from bench.scale import REPO, demo_engine, ensure_gallery, gallery_folder
from bench.synthetic import SCENE_CACHE, SceneStream
from runtime import atomic
from runtime.options import EngineOptions, SearchOptions
from runtime.search_plan import COSTS_FILE, COSTS_FORMAT, Costs

SCHEMA = "scan-runtime-bench-cost-model/1"
SMALL, LARGE = 2000, 20000  # gallery sizes (images): the exact/dense/flat/rerank parts, the IVF index
RERANK_MS = (50, 250)  # candidates reranked per query: the small gallery must hold the larger


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # untimed: first touch of the pages and code paths
    return float(np.median(harness.time_calls(fn, 0, repeats, repeats, 0.0)))


def line(t1: float, t2: float, x1: float, x2: float) -> tuple[float, float]:
    """(slope, intercept) of the line through (x1, t1) and (x2, t2), each clamped at 0."""
    slope = max(0.0, (t2 - t1) / (x2 - x1))
    return slope, max(0.0, t1 - slope * x1)


def measure(engine, small, large, captions: Sequence[str], repeats: int) -> tuple[Costs, dict[str, Any]]:
    from runtime.gallery.index import DenseCandidates, load_index
    from runtime.searcher import Searcher
    from runtime.two_stage import TwoStage

    config = engine.config
    n, r, d = small.images.shape
    v = n * r
    one, batch = list(captions[:1]), list(captions[:32])
    ids, lengths = engine.tokenizer.encode_batch(batch)
    words = engine.encode_ids(ids, lengths)
    vectors = [w[:k] for w, k in zip(words, lengths)]
    qv1, qv32 = int(lengths[0]), int(lengths.sum())
    raw: dict[str, Any] = {"gallery_images": n, "regions": r, "dim": d, "query_vectors": [qv1, qv32]}

    with Searcher(engine, images=small) as s:  # exact: the head over every image, one query batch
        t1, t32 = (median_time(lambda q=q: s.search(q, 10), repeats) for q in (one, batch))
    raw["exact_s"] = [t1, t32]
    exact, exact_pass = line(t1, t32, qv1 * v * d, qv32 * v * d)
    exact_pass /= v * d

    dense_source = DenseCandidates(small)
    t1, t32 = (median_time(lambda q=q: dense_source.search(q, config, 250), repeats) for q in (vectors[:1], vectors))
    raw["dense_s"] = [t1, t32]
    dense, dense_pass = line(t1, t32, qv1 * v * d, qv32 * v * d)
    dense_pass /= v * d

    scan, neighbour = {}, {}
    ks = (256, 2048)
    for kind, gallery in (("flat", small), ("ivfsq", large)):
        index = load_index(gallery, engine.manifest.image_encoder_id)
        if index.index_type != kind:
            raise RuntimeError(f"{gallery.folder}: expected a {kind} index (auto's at its size), found {index.meta}")
        nlist = int(index.meta["index"].get("nlist", 0))
        v_index = len(gallery) * r
        visited = v_index if kind == "flat" else nlist + 16 * v_index / nlist
        t_small, t_large = (
            median_time(lambda k=k, index=index: index.search(vectors, config, 250, neighbors=k, nprobe=16), repeats)
            for k in ks
        )
        raw[f"{kind}_s"] = [t_small, t_large]
        neighbour[kind], fixed = line(t_small, t_large, qv32 * ks[0], qv32 * ks[1])
        scan[kind] = fixed / (qv32 * visited * d)
    for kind in ("ivf", "ivfpq", "hnsw"):  # not measured: IVF-SQ8's figures stand in
        scan[kind], neighbour[kind] = scan["ivfsq"], neighbour["ivfsq"]

    two_stage = TwoStage(SearchOptions(candidates=250, candidate_plan="index"))
    rng = np.random.default_rng(0)
    queries = [{"captions": words[i : i + 1], "lengths": lengths[i : i + 1]} for i in range(len(batch))]

    def rerank(m: int) -> None:
        for q in queries:
            positions = np.sort(rng.choice(n, m, replace=False))
            two_stage.rescore(engine, small, "images", positions, q, SearchOptions().image_block)

    ms = RERANK_MS
    t_small, t_large = (median_time(lambda m=m: rerank(m), repeats) for m in ms)
    raw["rerank_s"] = [t_small, t_large]
    rerank_cost, per_query = line(t_small, t_large, qv32 * ms[0] * r * d, qv32 * ms[1] * r * d)
    costs = Costs(
        exact=exact,
        exact_pass=exact_pass,
        dense=dense,
        dense_pass=dense_pass,
        scan=scan,
        neighbour=neighbour,
        rerank=rerank_cost,
        rerank_query=per_query / len(queries),
        source=f"bench/cost_model.py, {time.strftime('%Y-%m-%d')}, load {harness.load_average()}",
    )
    return costs, raw


def build_parser() -> argparse.ArgumentParser:
    p = harness.parser(__doc__, quick="3 repeats of each part instead of 7", cache=SCENE_CACHE, seed=False)
    p.add_argument("--write", action="store_true", help=f"store the constants in {COSTS_FILE.relative_to(REPO)}")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats of each part (default 7; quick 3)")
    p.add_argument("--demo", default=str(REPO / "demo"), help="demo folder (make demo's)")
    p.add_argument(
        "--small",
        type=int,
        default=SMALL,
        help=f"images of the gallery of the exact, dense, flat-index and rerank parts (default {SMALL}; its auto "
        f"index must be flat, at least {RERANK_MS[-1]})",
    )
    p.add_argument(
        "--large",
        type=int,
        default=LARGE,
        help=f"images of the IVF-SQ8 index's gallery (default {LARGE}; its auto index must be IVF-SQ8)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return harness.run(_run, build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    from runtime.engine import ScanEngine

    harness.positive(args, "repeats")
    if args.small < RERANK_MS[-1]:
        raise harness.ArgumentError(f"--small: expected at least {RERANK_MS[-1]} images, received {args.small}")
    repeats = args.repeats or (3 if args.quick else 7)
    manifest = demo_engine(Path(args.demo))
    report: dict[str, Any] = {"schema": SCHEMA, "machine": harness.describe(), "command": sys.argv}
    report["load_average_at_start"] = harness.load_average()
    with ScanEngine.open(manifest, EngineOptions(backend="onnxruntime")) as engine:
        stream = SceneStream(engine.config.img_dim, seed=0)
        captions = stream.captions(args.small)
        small, large = (
            ensure_gallery(engine, stream, n, gallery_folder(args.cache, engine, stream, n), "auto", False)[0]
            for n in (args.small, args.large)
        )
        rng = np.random.default_rng(1)
        queries = [captions[i] for i in rng.choice(5 * args.small, 32, replace=False)]
        costs, raw = measure(engine, small, large, queries, repeats)
    report.update(costs=costs.to_dict(), measured=raw, load_average_at_end=harness.load_average())
    text = "\n".join(f"{k:>13}: {v}" for k, v in costs.to_dict().items())
    harness.finish(report, text, args.json)
    if args.write:
        atomic.write_json(COSTS_FILE, {"format": COSTS_FORMAT, "costs": costs.to_dict()})
        print(f"wrote {COSTS_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
