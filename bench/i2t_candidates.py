"""Image -> text candidates against exact search: top-10 overlap and time per query, per approach and M.

    python bench/i2t_candidates.py --engine demo/engines/scan.json --json bench/results/i2t_candidates.json
    python bench/i2t_candidates.py --engine demo/engines/scan.json --quick

The caption gallery is the demo world's (``bench.synthetic.SceneStream``, seed 0): the first
``--captions`` captions, five of each of the generator's first images; it is encoded once with
the engine and kept under ``--cache`` with its candidate index (``auto``). The queries are the first
``--queries`` test images of the demo dataset (``--query-images``). For every query the exact SCAN score
of every caption is computed (batched), and each approach's ``M`` candidates are reranked by it: the
overlap is |that top-10 and the exact top-10| / 10, averaged over the queries. Approaches:

* ``index``: the candidate index's neighbours of the query's regions (the path before the codebook);
* ``dense``: the exact candidate score ``AGG_words max_regions cos`` of every caption (one GEMM per
  query): the ceiling of the hard-attention score;
* ``codebook``: the same score with each word replaced by its codebook centroid, no refinement;
* ``codebook+refine R``: the codebook's best ``R * M`` rescored with the exact candidate score (the
  default path, ``R`` = 8); ``kmeans`` rows: the same with a k-means codebook over a flat index.

Times are the median seconds of one query's candidate stage; ``two_stage_p50_ms`` and ``exact_p50_ms``
are whole single-image searches (``Searcher``) at the default refine, measured in this process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import harness
from bench.synthetic import FEATURES_VERSION, SCENE_CACHE, SceneStream
from runtime.cli import add_engine_arguments, open_engines
from runtime.gallery import CaptionGallery, centroids
from runtime.gallery.captions import build_caption_gallery
from runtime.gallery.index import build_index, load_index
from runtime.options import SearchOptions, WriteOptions
from runtime.searcher import Searcher

REFINES = (1, 2, 4, 8)


def build_parser() -> argparse.ArgumentParser:
    p = harness.parser(__doc__, quick="5000 captions, 10 queries, M 20,50,100 (about a minute)", cache=SCENE_CACHE)
    p.add_argument("--engine", required=True, help="a demo-world model's manifest")
    p.add_argument("--captions", type=int, default=50000, help="caption gallery size (default 50000)")
    p.add_argument("--queries", type=int, default=20, help="image queries (default 20)")
    p.add_argument("--candidates", default="20,50,100,200", help="values of M (default 20,50,100,200)")
    p.add_argument(
        "--query-images", type=Path, default=Path("demo/data/demo_precomp/test_ims.npy"), help="query region features"
    )
    p.add_argument("--timed", type=int, default=10, help="single-query searches timed (default 10)")
    p.add_argument("--no-kmeans", action="store_true", help="skip the k-means codebook rows (a flat index)")
    add_engine_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return harness.run(_run, build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    if args.quick:
        args.captions, args.queries, args.candidates, args.timed = 5000, 10, "20,50,100", 5
    ms = harness.ints(args.candidates, "candidates")
    harness.positive(args, "captions", "queries", "timed")
    info = harness.describe(announce=True)
    t0 = time.perf_counter()
    with open_engines([args.engine], args) as engines:
        result = _measure(engines[0], args, ms)
    result.update(
        engine=args.engine,
        machine=info,
        load_average_at_end=harness.load_average(),
        run_seconds=round(time.perf_counter() - t0, 1),
    )
    lines = [
        f"{result['captions']} captions ({result['words']} words), {args.queries} image queries; load average "
        f"{info['load_average_at_start']} -> {result['load_average_at_end']}; index {result['index']}",
        f"  exact: {result['exact_batched_ms_per_query']:.1f} ms/query batched, "
        f"{result['exact_p50_ms']:.1f} ms p50 single; two-stage M={result['timed_m']}: "
        f"{result['two_stage_p50_ms']:.1f} ms p50 single (overlap {result['two_stage_overlap']:.3f})",
        f"  {'approach':<24} " + " ".join(f"{'M=' + str(m):>7}" for m in ms) + f" {'ms/query':>9}",
    ]
    for r in result["rows"]:
        cells = " ".join(f"{r['overlap_at_10'][str(m)]:>7.3f}" for m in ms)
        lines.append(f"  {r['approach']:<24} {cells} {r['ms_per_query']:>9.1f}")
    harness.finish(result, "\n".join(lines), args.json)
    return 0


def _gallery(engine, args: argparse.Namespace) -> CaptionGallery:
    """The first ``--captions`` demo-world captions encoded by ``engine``, with an index, kept in the cache."""
    # keyed by the generator's version too: a gallery of an older generator's captions is not reused
    folder = args.cache / "i2t" / f"{engine.manifest.text_encoder_id[:12]}-{args.captions}-v{FEATURES_VERSION}"
    try:
        gallery = CaptionGallery.load(folder, engine.manifest.text_encoder_id)
        load_index(gallery)
        return gallery
    except Exception:  # absent or incomplete: build it
        # the captions of as many images as needed: the first chunk's alone (40960) are fewer than the default
        texts = SceneStream(engine.config.img_dim).captions(-(-args.captions // 5))[: args.captions]
        options = WriteOptions(progress=not args.no_progress, index="auto")
        return build_caption_gallery(engine, texts, folder, options)


def _measure(engine, args: argparse.Namespace, ms: list[int]) -> dict[str, Any]:
    gallery = _gallery(engine, args)
    regions = np.asarray(np.load(args.query_images, mmap_mode="r")[: args.queries], np.float32)
    config = engine.config
    images, grams = engine.encode_images(regions)
    queries = list(images)

    t = time.perf_counter()
    exact = np.zeros((len(queries), len(gallery)), np.float32)  # by storage position
    for pos, caps, lengths in gallery.blocks(2048):
        exact[:, pos : pos + len(lengths)] = engine.sims(images, grams, np.asarray(caps, np.float32), lengths)
    exact_batched = (time.perf_counter() - t) / len(queries)
    want = [set(np.argsort(-s, kind="stable")[:10].tolist()) for s in exact]

    index = load_index(gallery)
    rows = [_row("index", ms, exact, want, lambda q, m: index.search([q], config, m)[0], queries)]
    all_ids = np.arange(len(gallery))
    centroids.exact_scores(index, all_ids, queries[0], config)  # warm-up: the gallery's pages read once
    position = index.layout.position_of_id
    rows.append(
        _row(
            "dense",
            ms,
            exact,
            want,
            lambda q, m: _top(centroids.exact_scores(index, all_ids, q, config), m, position),
            queries,
        )
    )
    centroids.Codebook.of(index)  # made once per index, not timed per query
    for refine in REFINES:
        name = "codebook" if refine == 1 else f"codebook+refine{refine}"
        rows.append(
            _row(name, ms, exact, want, lambda q, m, r=refine: centroids.propose(index, [q], config, m, r)[0], queries)
        )
    book_source = centroids.Codebook.of(index).source
    if not args.no_kmeans and index.index_type != "flat":
        flat = build_index(gallery, "flat")
        t = time.perf_counter()
        centroids.Codebook.of(flat)
        kmeans_s = time.perf_counter() - t
        for refine in (1, 8):
            name = "kmeans" if refine == 1 else f"kmeans+refine{refine}"
            rows.append(
                _row(
                    name, ms, exact, want, lambda q, m, r=refine: centroids.propose(flat, [q], config, m, r)[0], queries
                )
            )
        kmeans = {"source": centroids.Codebook.of(flat).source, "seconds": round(kmeans_s, 1)}
        del flat
    else:
        kmeans = None

    timed_m = 100 if 100 in ms else ms[-1]
    n = min(args.timed, len(regions))
    with Searcher(engine, captions=gallery) as s:
        exact_times, _ = harness.time_each(lambda q: s.search(regions[q : q + 1], 10), n, warmup=1)
    with Searcher(engine, captions=gallery, options=SearchOptions(candidates=timed_m)) as s:
        two_times, _ = harness.time_each(lambda q: s.search(regions[q : q + 1], 10), n, warmup=1)
        _, got = s.search(regions, 10)
    pos_of_id = np.empty(len(gallery), np.int64)
    pos_of_id[np.asarray(gallery.ids)] = np.arange(len(gallery))
    two_overlap = float(np.mean([len(set(pos_of_id[g].tolist()) & w) / 10 for g, w in zip(got, want)]))
    return {
        "captions": len(gallery),
        "words": int(gallery.words.shape[0]),
        "queries": len(queries),
        "index": index.meta["index"],
        "codebook": book_source,
        "kmeans_codebook": kmeans,
        "exact_batched_ms_per_query": 1e3 * exact_batched,
        "exact_p50_ms": 1e3 * float(np.median(exact_times)),
        "timed_m": timed_m,
        "two_stage_p50_ms": 1e3 * float(np.median(two_times)),
        "two_stage_overlap": two_overlap,
        "rows": rows,
    }


def _top(scores: np.ndarray, m: int, position_of_id: np.ndarray) -> np.ndarray:
    return np.sort(position_of_id[np.argsort(-scores, kind="stable")[:m]])


def _row(name: str, ms: list[int], exact: np.ndarray, want: list[set], propose, queries) -> dict[str, Any]:
    """Overlap at each M and the median seconds of one query's candidate stage (at the largest M)."""
    overlap, times = {}, []
    for m in ms:
        hits = []
        for q, query in enumerate(queries):
            t = time.perf_counter()
            positions = propose(query, m)
            times.append((m, time.perf_counter() - t))
            got = positions[np.argsort(-exact[q, positions], kind="stable")[:10]]
            hits.append(len(set(got.tolist()) & want[q]) / 10)
        overlap[str(m)] = float(np.mean(hits))
    largest = [t for m, t in times if m == ms[-1]]
    print(f"{name}: {json.dumps(overlap)}", file=sys.stderr)
    return {"approach": name, "overlap_at_10": overlap, "ms_per_query": 1e3 * float(np.median(largest))}


if __name__ == "__main__":
    sys.exit(main())
