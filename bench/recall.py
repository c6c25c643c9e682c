"""Recall evaluation of exported SCAN models with the original protocol (numpy runtime, never PyTorch).

    python bench/recall.py --engine engines/scan.json --data data/f30k_precomp --split test
    python bench/recall.py --engine t2i/scan.json --engine i2t/scan.json --data ... --fold5   # ensemble

Several engines form an ensemble: their similarity matrices are averaged, as in the paper
("t-i AVG + i-t LSE"), or weighted with ``--weights`` (the mean ``runtime/search.py`` and
``runtime/searcher.py`` searches with). ``--save-sims`` writes the float32 (n_images, n_captions) matrix.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench.evaluation import full_sims, load_split
from bench.metrics import evaluate, evaluate_fold5, format_table
from runtime import atomic
from runtime.captions import DataError
from runtime.cli import (
    add_engine_arguments,
    add_engines_arguments,
    add_gallery_dtype_argument,
    engine_options,
    run_cli,
)
from runtime.engine import ScanEngine
from runtime.logs import command_parser
from runtime.searcher import check_weights


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(__doc__.split("\n\n")[0])
    add_engines_arguments(p, "for an ensemble")
    p.add_argument("--data", required=True, help="folder with {split}_ims.npy and {split}_caps.txt")
    p.add_argument(
        "--split",
        default="test",
        help="the split to evaluate: {split}_ims.npy and {split}_caps.txt of --data (dev, test; COCO: testall)",
    )
    p.add_argument(
        "--fold5",
        action="store_true",
        help="mean over 5 folds of a fifth of the images each (COCO 1K protocol on the 5000-image test set)",
    )
    p.add_argument(
        "--save-sims",
        help="write the float32 (n_images, n_captions) similarity matrix (.npy) to this file; its folder must exist",
    )
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_gallery_dtype_argument(
        p, "--gallery-dtype", "keep encoded images as a gallery cache of this dtype would (float16: half the memory)"
    )
    add_engine_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(_run, build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    if args.save_sims and not Path(args.save_sims).resolve().parent.is_dir():
        raise DataError(f"--save-sims {args.save_sims}: the folder {Path(args.save_sims).parent} does not exist")
    weights = check_weights(args.weights, len(args.engine)).astype(np.float32)
    t0 = time.perf_counter()
    sims = None
    for w, path in zip(weights, args.engine):
        with ScanEngine.open(path, engine_options(args)) as engine:
            regions, captions = load_split(args.data, args.split, engine.config.img_dim)
            print(
                f"{path}: {len(regions)} images x {len(captions)} captions ({engine.options.backend})", file=sys.stderr
            )
            s = full_sims(engine, regions, captions, progress=not args.no_progress, store_dtype=args.gallery_dtype)
        if sims is not None and sims.shape != s.shape:
            raise DataError(f"the engines read different splits: {sims.shape} vs {s.shape} similarities")
        # The weighted mean in float32, accumulated in the members' order as runtime/searcher.py does.
        sims = w * s if sims is None else sims + w * s
    sims = sims.astype(np.float32, copy=False)
    seconds = time.perf_counter() - t0
    if args.save_sims:
        with atomic.atomic_path(args.save_sims) as tmp, open(tmp, "wb") as f:
            np.save(f, sims)
    if args.fold5 and sims.shape[0] % 5:
        raise DataError(f"--fold5: {sims.shape[0]} images do not split into 5 equal folds")
    metrics = evaluate_fold5(sims) if args.fold5 else evaluate(sims)
    fold = sims.shape[0] // 5 if args.fold5 else None
    if args.json:
        print(
            json.dumps(
                {
                    "metrics": metrics.to_dict(),
                    "n_images": int(sims.shape[0]),
                    "n_captions": int(sims.shape[1]),
                    "seconds": round(seconds, 3),
                    "engines": args.engine,
                    "weights": [float(w) for w in weights],
                    "fold5": args.fold5,
                    "fold_images": fold,
                },
                indent=1,
            )
        )
    else:
        protocol = "" if fold is None else " (5-fold 1K)" if fold == 1000 else f" (mean of 5 folds of {fold} images)"
        title = f"{args.split}: {sims.shape[0]} images, {sims.shape[1]} captions{protocol}"
        print(format_table(metrics, title=title))
        print(f"scored {sims.size:,} pairs in {seconds:.1f} s ({sims.size / seconds:,.0f} pairs/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
