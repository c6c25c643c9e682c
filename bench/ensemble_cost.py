"""What an ensemble costs: its search time against its members' searched one by one, in one process.

    python bench/ensemble_cost.py --json bench/results/ensemble_cost.json        # the random full-size t2i + i2t
    python bench/ensemble_cost.py --engine A/scan.json --engine B/scan.json --images 200 --captions 1000

Per direction (text -> image, image -> text) and repeat, the contenders run interleaved on the same
queries: each member's ``Searcher`` alone and the ``Searcher`` of all. Reported: medians and p10..p90
(ms), and the per-repeat ratio of the ensemble's time to the sum of its members' (1.0: the ensemble
costs exactly its members; the ensemble's extra work is one weighted sum and one top-k per block).
Without ``--engine`` the models are the benchmark's random full-size ones (bench/random_models.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench import harness
from bench.synthetic import FULL, caption_texts
from runtime.cli import add_engine_arguments, open_engines
from runtime.engine import ScanEngine
from runtime.gallery import GalleryFolder
from runtime.options import WriteOptions
from runtime.searcher import Searcher


def build_parser() -> argparse.ArgumentParser:
    p = harness.parser(__doc__)
    p.add_argument("--engine", action="append", help="a member (repeat); default: the random full-size t2i + i2t")
    p.add_argument("--images", type=int, default=1000, help="image gallery size (default 1000)")
    p.add_argument("--captions", type=int, default=5000, help="caption gallery size (default 5000)")
    p.add_argument("--regions", type=int, default=36, help="regions per image (default 36)")
    p.add_argument("--batch", type=int, default=8, help="queries per search call (default 8)")
    p.add_argument("-k", type=int, default=10, help="results per query")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per contender after one warm-up")
    add_engine_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return harness.run(_run, build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    harness.positive(args, "images", "captions", "regions", "batch", "k", "repeats")
    paths = args.engine or _default_models()
    info = harness.describe(announce=True)
    with open_engines(paths, args) as engines:
        rows, ratios = _measure(engines, args)
    result = {
        "engines": [str(p) for p in paths],
        "images": args.images,
        "captions": args.captions,
        "batch": args.batch,
        "k": args.k,
        "repeats": args.repeats,
        "machine": info,
        "load_average_at_end": harness.load_average(),
        "rows": rows,
        "ratio_to_sum_of_members": ratios,
    }
    harness.finish(result, _format(result), args.json)
    return 0


def _default_models() -> list[Path]:
    from bench.random_models import DEFAULT_CACHE, prepare_model

    return [prepare_model(FULL, mode, 0, DEFAULT_CACHE)[0] for mode in ("t2i", "i2t")]


def _measure(engines: list[ScanEngine], args: argparse.Namespace) -> tuple[list[dict], dict[str, dict]]:
    rng = np.random.default_rng(args.seed)
    img_dim = engines[0].config.img_dim
    vocab = min(e.config.vocab_size for e in engines)
    regions = rng.standard_normal((args.images, args.regions, img_dim), dtype=np.float32)
    gallery_texts = caption_texts(rng, args.captions, vocab)
    text_queries = caption_texts(rng, args.batch, vocab)
    image_queries = rng.standard_normal((args.batch, args.regions, img_dim), dtype=np.float32)
    rows, ratios = [], {}
    with tempfile.TemporaryDirectory(prefix="ensemble_cost.") as tmp:
        folder = GalleryFolder(tmp, engines)
        images = folder.write_images(regions, options=WriteOptions(progress=False)).images
        captions = folder.write_captions(gallery_texts, options=WriteOptions(progress=False)).captions
        for direction, queries, kw, size in (
            ("text_to_image", text_queries, {"images": images}, args.images),
            ("image_to_text", image_queries, {"captions": captions}, args.captions),
        ):
            members = [Searcher(e, **{key: g[i] for key, g in kw.items()}) for i, e in enumerate(engines)]
            ensemble = Searcher(engines, **kw)
            contenders = {f"member{i + 1}": m for i, m in enumerate(members)} | {"ensemble": ensemble}
            samples = harness.interleaved(
                {name: lambda i, c=c, q=queries: c.search(q, args.k) for name, c in contenders.items()},
                args.repeats,
                warmup=1,
            )
            for name, times in samples.items():
                spread = harness.percentiles(times, (50, 10, 90), unit="_ms", scale=1e3, median="median")
                row = {"direction": direction, "gallery": size, "batch": args.batch, "contender": name}
                rows.append({**row, **spread, "n": len(times)})
            per_repeat = np.array(samples.pop("ensemble")) / np.sum(list(samples.values()), axis=0)
            ratios[direction] = harness.percentiles(per_repeat, (50, 10, 90), median="median")
            ensemble.close()
            for m in members:
                m.close()
    return rows, ratios


def _format(result: dict[str, Any]) -> str:
    lines = [
        f"ensemble of {len(result['engines'])}: {result['images']} images, {result['captions']} captions, "
        f"batch {result['batch']}, k {result['k']}, {result['repeats']} repeats; load average "
        f"{result['machine']['load_average_at_start']} -> {result['load_average_at_end']}",
        f"  {'direction':<14} {'contender':<10} {'median ms':>10} {'p10..p90 ms':>20}",
    ]
    for row in result["rows"]:
        spread = f"{row['p10_ms']:.1f}..{row['p90_ms']:.1f}"
        lines.append(f"  {row['direction']:<14} {row['contender']:<10} {row['median_ms']:>10.1f} {spread:>20}")
    for direction, r in result["ratio_to_sum_of_members"].items():
        lines.append(
            f"  {direction}: ensemble / sum of members = {r['median']:.3f} (p10..p90 {r['p10']:.3f}..{r['p90']:.3f})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
