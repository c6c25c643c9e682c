"""Two-stage ensemble search against the exact ensemble: top-10 overlap and latency, on seeded demo data.

    python bench/ensemble_two_stage.py --engine demo/engines/scan.json --engine demo96/engines/scan.json \
        --json bench/results/ensemble_two_stage.json

The galleries are the demo world's (``bench.synthetic.SceneFeatures``, seed 0): the first ``--images``
generated images, and the captions of the first ``--captions // 5`` of them. Text queries are captions
of gallery images, image queries are gallery images. For each M and candidate source ("union": every
member's M candidates, "first": the first member's), the overlap of the top-10 with the exact ensemble's
(mean over queries of |two-stage top-10 and exact top-10| / 10), the candidates scored per query, and
the p50 latency of single-query searches beside the exact ensemble's, measured in one process.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Any

import numpy as np

from bench import harness
from bench.harness import overlap_at
from bench.synthetic import SCENE_CACHE, SceneFeatures
from runtime.cli import add_engine_arguments, open_engines
from runtime.engine import ScanEngine
from runtime.gallery import GalleryFolder
from runtime.options import CANDIDATE_SOURCES, SearchOptions, WriteOptions
from runtime.searcher import Searcher


def build_parser() -> argparse.ArgumentParser:
    p = harness.parser(__doc__, cache=SCENE_CACHE, seed=False)
    p.add_argument("--engine", action="append", required=True, help="a member (repeat); demo-world models")
    p.add_argument("--weights", help="the ensemble's weights (default equal)")
    p.add_argument("--images", type=int, default=10000, help="image gallery size (default 10000)")
    p.add_argument("--captions", type=int, default=10000, help="caption gallery size (default 10000)")
    p.add_argument("--queries", type=int, default=200, help="queries per direction for the overlap (default 200)")
    p.add_argument("--timed", type=int, default=20, help="single-query searches timed per mode (default 20)")
    p.add_argument("--candidates", default="20,50,100,200", help="values of M (default 20,50,100,200)")
    add_engine_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return harness.run(_run, build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    ms = harness.ints(args.candidates, "candidates")
    info = harness.describe(announce=True)
    with open_engines(args.engine, args) as engines:
        rows = _measure(engines, args, ms)
    result = {
        "engines": args.engine,
        "weights": args.weights,
        "images": args.images,
        "captions": args.captions,
        "queries": args.queries,
        "machine": info,
        "load_average_at_end": harness.load_average(),
        "rows": rows,
    }
    lines = [
        f"ensemble of {len(args.engine)}; load average {info['load_average_at_start']} -> "
        f"{result['load_average_at_end']}",
        f"  {'direction':<14} {'gallery':>7} {'mode':<10} {'M':>5} {'source':<6} {'scored/q':>9} "
        f"{'overlap@10':>10} {'p50 ms':>8}",
    ]
    for r in rows:
        m = "" if r["candidates"] is None else r["candidates"]
        lines.append(
            f"  {r['direction']:<14} {r['gallery']:>7} {r['mode']:<10} {m:>5} {r['source'] or '':<6} "
            f"{r['scored_per_query']:>9.0f} {r['overlap_at_10']:>10.3f} {r['p50_ms']:>8.1f}"
        )
    harness.finish(result, "\n".join(lines), args.json)
    return 0


def _measure(engines: list[ScanEngine], args: argparse.Namespace, ms: list[int]) -> list[dict[str, Any]]:
    img_dim = engines[0].config.img_dim
    features, texts = SceneFeatures(img_dim, args.cache).ensure(max(args.images, args.captions // 5 + 1))
    if args.captions > len(texts):
        raise harness.ArgumentError(f"--captions: the generator's first chunk has {len(texts)} captions")
    rng = np.random.default_rng(0)
    text_queries = [texts[i] for i in rng.choice(min(len(texts), 5 * args.images), args.queries, replace=False)]
    image_queries = np.asarray(features[rng.choice(args.captions // 5, args.queries, replace=False)], np.float32)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ensemble_two_stage.") as tmp:
        folder, options = GalleryFolder(tmp, engines), WriteOptions(progress=not args.no_progress, index="auto")
        images = folder.write_images(np.asarray(features[: args.images], np.float32), options=options).images
        captions = folder.write_captions(texts[: args.captions], options=options).captions
        for direction, queries, kw, size in (
            ("text_to_image", text_queries, {"images": images}, args.images),
            ("image_to_text", image_queries, {"captions": captions}, args.captions),
        ):
            with Searcher(engines, weights=args.weights, **kw) as exact:
                _, want = exact.search(queries, 10)
                rows.append(_row(direction, size, "exact", None, None, size, 1.0, _p50(exact, queries, args.timed)))
            for m in ms:
                for source in CANDIDATE_SOURCES:
                    with Searcher(
                        engines,
                        weights=args.weights,
                        **kw,
                        options=SearchOptions(candidates=m, candidate_source=source),
                    ) as e:
                        _, got = e.search(queries, 10)
                        scored = _scored(e, direction, queries[: args.timed])
                        rows.append(
                            _row(
                                direction,
                                size,
                                "two_stage",
                                m,
                                source,
                                scored,
                                overlap_at(got, want),
                                _p50(e, queries, args.timed),
                            )
                        )
                print(f"{direction} M={m} done", file=sys.stderr)
    return rows


def _row(direction, size, mode, m, source, scored, overlap, p50) -> dict[str, Any]:
    return {
        "direction": direction,
        "gallery": size,
        "mode": mode,
        "candidates": m,
        "source": source,
        "scored_per_query": float(scored),
        "overlap_at_10": float(overlap),
        "p50_ms": p50,
    }


def _p50(searcher, queries, n: int) -> float:
    """p50 ms of single-query searches of the first ``n`` queries."""
    times, _ = harness.time_each(lambda q: searcher.search(queries[q : q + 1], 10), n)
    return 1e3 * float(np.median(times))


def _scored(ensemble: Searcher, direction: str, queries) -> float:
    """Mean number of items the candidate stage hands to the exact score, per query."""
    kind = "images" if direction == "text_to_image" else "captions"
    engines, two_stage = ensemble.engines, ensemble.two_stage
    if kind == "images":
        vectors = []
        for e in engines:
            ids, lengths = e.tokenizer.encode_batch(list(queries))
            words = e.encode_ids(ids, lengths)
            vectors.append([w[:n] for w, n in zip(words, lengths)])
    else:
        vectors = [list(e.encode_images(queries)[0]) for e in engines]
    galleries = ensemble.galleries(kind)
    proposals = two_stage.proposals(lambda i: two_stage.index(engines[i], galleries[i], kind), engines, vectors)
    return float(np.mean([len(p) for p in proposals]))


if __name__ == "__main__":
    sys.exit(main())
