"""Search a cached SCAN gallery from the command line (numpy + ONNX Runtime or TensorRT; never PyTorch).

    # build (or extend) the galleries once
    python runtime/search.py --engine engines/scan.json --gallery gal --images test_ims.npy [--names names.txt]
    python runtime/search.py --engine engines/scan.json --gallery gal --captions test_caps.txt
    # text -> image
    python runtime/search.py --engine engines/scan.json --gallery gal "a dog on the beach" -k 5
    # image -> text
    python runtime/search.py --engine engines/scan.json --gallery gal --query-images query_ims.npy -k 5
    # two-stage search of large galleries: a candidate index proposes M items, only those are scored exactly
    python runtime/search.py --engine engines/scan.json --gallery gal --images test_ims.npy --index auto
    python runtime/search.py --engine engines/scan.json --gallery gal --candidates 500 "a dog on the beach"

``--engine`` takes the similarity graph (``scan.onnx``, ``scan.plan``) or the manifest ``scan.json``.
The gallery folder holds ``images/`` and ``captions/`` caches.

``--explain`` prints, for each hit, why it matched: the model's attention for the pair (runtime/explain.py),
each word's top regions (a t2i model) or each region's top words (an i2t model), with the regions' boxes when
the gallery keeps them (``--boxes boxes.npy`` (N, R, 4), x1 y1 x2 y2 in pixels, with ``--images``).
``--image-dir`` names each hit's picture (``<dir>/<name>``, or with ``.png``/``.jpg``):

    python runtime/search.py --engine engines/scan.json --gallery gal --images test_ims.npy --boxes boxes.npy
    python runtime/search.py --engine engines/scan.json --gallery gal --image-dir pictures --explain "a red dog"

Several ``--engine`` search an ensemble (runtime/searcher.py): scores are the weighted mean of the models'
similarities (``--weights 0.5,0.5``; equal by default). The gallery folder then holds one cache per model,
built and extended together (runtime/gallery/members.py):

    python runtime/search.py --engine t2i/scan.json --engine i2t/scan.json --gallery gal --images test_ims.npy
    python runtime/search.py --engine t2i/scan.json --engine i2t/scan.json --gallery gal "a dog on the beach"
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from runtime.captions import read_captions
from runtime.cli import (
    add_engine_arguments,
    add_engines_arguments,
    add_gallery_dtype_argument,
    open_engines,
    run_cli,
    search_options,
)
from runtime.engine import ScanEngine
from runtime.explain import pair_json
from runtime.features import load_regions
from runtime.gallery import MANIFEST, VERIFY_ON_OPEN_BYTES, GalleryError, GalleryFolder
from runtime.install import install_command
from runtime.logs import command_parser
from runtime.options import CANDIDATE_PLANS, CANDIDATE_SOURCES, DEFAULT_LOCK_TIMEOUT, INDEX_KINDS, WriteOptions
from runtime.pictures import ImageFolder
from runtime.searcher import MAX_K, Searcher, SearchError, check_weights
from runtime.tokenizer import TokenizerError


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("Top-k search with an exported SCAN model.")
    p.add_argument("queries", nargs="*", help="text queries (text -> image search)")
    add_engines_arguments(p, "for an ensemble")
    p.add_argument("--gallery", help="gallery folder (holds images/ and captions/ caches)")
    p.add_argument("--images", help="region features .npy (N, R, img_dim): build or extend the image gallery")
    p.add_argument("--names", help="text file, one name per image of --images")
    p.add_argument(
        "--boxes", help="region boxes .npy (N, R, 4) float32, x1 y1 x2 y2 in pixels, one row per image of --images"
    )
    p.add_argument("--image-dir", help="folder of the images' pictures (<name>, <name>.png or .jpg), for display")
    p.add_argument(
        "--explain",
        action="store_true",
        help="for each hit, each word's top regions (t2i models) or each region's top words (i2t models)",
    )
    p.add_argument("--explain-top", type=int, default=3, metavar="T", help="regions or words shown per row (3)")
    p.add_argument("--captions", help="captions file, one per line: build or extend the caption gallery")
    p.add_argument("--append", action="store_true", help="add --images/--captions to the gallery already there")
    p.add_argument("--rebuild", action="store_true", help="replace the gallery already there")
    add_gallery_dtype_argument(
        p,
        "--dtype",
        "gallery storage (float32 exact; float16 halves memory; int8, image galleries: a quarter, approximate)",
    )
    p.add_argument("--query-images", help="region features .npy of query images (image -> text search)")
    p.add_argument("--queries-file", help="file of text queries, one per line ('-' for stdin)")
    p.add_argument("-k", type=int, default=5, help=f"results per query (at most {MAX_K})")
    p.add_argument(
        "--verify",
        action="store_true",
        help="check the galleries' checksums and values (done on open anyway up to "
        f"{VERIFY_ON_OPEN_BYTES >> 30} GiB); with nothing else to do, verify and exit",
    )
    p.add_argument(
        "--lock-timeout",
        type=float,
        default=DEFAULT_LOCK_TIMEOUT,
        help="seconds to wait for another process writing the same gallery",
    )
    p.add_argument(
        "--candidates",
        type=int,
        default=0,
        metavar="M",
        help="two-stage search: score only the M candidates the gallery's index proposes "
        f"(0: exact search of every item; needs faiss: {install_command('scale')})",
    )
    p.add_argument(
        "--index",
        choices=INDEX_KINDS,
        default=None,
        help="build the galleries' candidate index of this kind with --images/--captions "
        "(auto: exact for small galleries, IVF for large); an existing index is extended anyway",
    )
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists probed per query vector (two-stage search)")
    p.add_argument(
        "--candidate-source",
        choices=CANDIDATE_SOURCES,
        default="union",
        help="an ensemble's two-stage candidates: the union of every member's M or the first member's M",
    )
    p.add_argument(
        "--candidate-plan",
        choices=CANDIDATE_PLANS,
        default="auto",
        help="how two-stage search finds candidates: auto (the cheapest of exact search, a dense MaxSim and the "
        "index, by the measured cost model; docs/two_stage.md), always dense, or always the index",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_engine_arguments(p)
    return p


_NOTHING_TO_DO = (
    "nothing to do: give text queries, --queries-file or --query-images "
    "(and --gallery DIR; build one with --images FEATS.npy or --captions FILE)"
)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_run, build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    if not 1 <= args.k <= MAX_K:
        raise SearchError(f"-k must be a positive integer at most {MAX_K}, received {args.k}")
    if args.gallery and Path(args.gallery).exists() and not Path(args.gallery).is_dir():
        raise SearchError(f"--gallery {args.gallery}: expected a folder (it holds images/ and captions/), found a file")
    if args.verify and not args.gallery:
        raise SearchError("--verify needs --gallery DIR")
    check_weights(args.weights, len(args.engine))  # before anything is opened or built
    if args.boxes and not args.images:
        raise SearchError("--boxes goes with --images (one row of boxes per image)")
    if args.explain_top < 1:
        raise SearchError(f"--explain-top must be a positive integer, received {args.explain_top}")
    args.pictures = ImageFolder(args.image_dir) if args.image_dir else None
    queries = _text_queries(args)
    gallery = Path(args.gallery) if args.gallery else None
    if (args.images or args.captions) and gallery is None:
        raise SearchError("--images/--captions need --gallery DIR to store the gallery in")
    one = len(args.engine) == 1  # a single model: its messages name its caches; an ensemble's, its members
    if not one and not (queries or args.query_images or args.images or args.captions or args.verify):
        raise SearchError(_NOTHING_TO_DO)
    if not one and gallery is None:
        raise GalleryError(
            "no --gallery given: build one with --gallery DIR --images FEATS.npy (text -> image) or "
            "--captions CAPTIONS.txt (image -> text)"
        )
    results = []
    with open_engines(args.engine, args) as engines:
        folder = GalleryFolder(gallery, engines) if gallery is not None else None
        images = captions = None
        models = "" if one else f", {len(engines)} models"
        if args.images:
            written = folder.write_images(args.images, _names(args), _writing(args, folder, "images"), boxes=args.boxes)
            images = written.images
            where = gallery / "images" if one else gallery
            print(f"image gallery {where}: {len(images[0])} images{models}", file=sys.stderr)
        if args.captions:
            written = folder.write_captions(read_captions(args.captions), _writing(args, folder, "captions"))
            captions = written.captions
            where = gallery / "captions" if one else gallery
            print(f"caption gallery {where}: {len(captions[0])} captions{models}", file=sys.stderr)
        if args.verify and not (queries or args.query_images):
            _verify(folder)
        if not (queries or args.query_images):
            if one and not (args.verify or args.images or args.captions):
                raise SearchError(_NOTHING_TO_DO)
            return 0
        if one and (gallery is None or not any((gallery / sub / MANIFEST).is_file() for sub in ("images", "captions"))):
            raise GalleryError(
                f"no gallery at {gallery if gallery else '(no --gallery given)'}. Build one first: runtime/search.py "
                f"--engine {args.engine[0]} --gallery DIR --images FEATS.npy (text -> image) or --captions "
                f"CAPTIONS.txt (image -> text)"
            )
        if queries:
            images = images or _load(folder, "images", args.verify)
            for engine in engines:
                _log_unknown_words(engine, queries, "" if one else f" ({engine.manifest.path})")
            with Searcher(engines, images=images, weights=args.weights, options=search_options(args)) as searcher:
                scores, ids = searcher.search(queries, args.k)
                results += _results(queries, scores, ids, "name", images[0].names, args.pictures)
                _explain(args, searcher, queries, results[-len(queries) :])
        if args.query_images:
            captions = captions or _load(folder, "captions", args.verify)
            regions = load_regions(args.query_images, engines[0].config.img_dim)
            with Searcher(engines, captions=captions, weights=args.weights, options=search_options(args)) as searcher:
                scores, ids = searcher.search(np.asarray(regions), args.k)
                results += _results(_image_queries(args, len(scores)), scores, ids, "text", captions[0].texts)
                _explain(args, searcher, list(np.asarray(regions)), results[-len(scores) :])
    _print(results, args.json, args.explain_top)
    return 0


def _verify(folder: GalleryFolder) -> None:
    """Every check on every cache of the gallery folder; one line each on stderr."""
    for cache, kind, n in folder.verify():
        print(f"verified {cache}: {n} {kind} (checksums, finite values, ids)", file=sys.stderr)


def _load(folder: GalleryFolder, kind: str, verify: bool) -> tuple:
    """Every member's ``kind`` cache (checked whole with ``--verify``), or the error naming what is missing."""
    galleries = getattr(folder.load(True if verify else None, [kind]), kind)
    if galleries is None:
        raise GalleryError(folder.missing(kind))
    return galleries


def _writing(args: argparse.Namespace, folder: GalleryFolder, kind: str) -> WriteOptions:
    """How the CLI's options build or extend the ``kind`` gallery of ``folder``. Building where a gallery is
    already needs a word on what to do with it: running the same build twice must not add every item again."""
    if args.append and args.rebuild:
        raise SearchError("--append adds to the gallery, --rebuild replaces it: give one of them")
    there = folder.generation(kind) is not None or (folder.path / kind / MANIFEST).is_file()  # a single model's too
    if not (args.append or args.rebuild) and there:
        source, what = ("--images", "an image") if kind == "images" else ("--captions", "a caption")
        raise GalleryError(
            f"{folder.path}: already holds {what} gallery; pass --append to add the {source} items to it, "
            f"or --rebuild to replace it"
        )
    return WriteOptions(
        dtype=args.dtype,
        append=args.append,
        progress=not args.no_progress,
        lock_timeout=args.lock_timeout,
        index=args.index or ("auto" if args.candidates else None),
    )


def _names(args: argparse.Namespace) -> list[str] | None:
    return _read_lines(args.names, "names") if args.names else None


def _log_unknown_words(engine: ScanEngine, queries: list[str], where: str) -> None:
    for q in queries:
        for word in engine.tokenizer.unknown_words(q):
            logging.getLogger(__name__).info("unknown word %r in %r%s", word, q, where)


def _image_queries(args: argparse.Namespace, n: int) -> list[str]:
    """How results name the query images: ``FILE[row]``."""
    return [f"{args.query_images}[{row}]" for row in range(n)]


def _results(
    queries: list[str],
    scores: np.ndarray,
    ids: np.ndarray,
    key: str,
    labels: list[str] | None,
    pictures: ImageFolder | None = None,
) -> list:
    """One result record per query: its hits (past the gallery's end left out), labelled by ``labels`` (and
    with their picture's path, from ``pictures``)."""
    return [
        {"query": q, "results": [_item(key, labels, j, v, pictures) for j, v in zip(i, s) if j >= 0]}
        for q, s, i in zip(queries, scores, ids)
    ]


def _item(key: str, labels: list[str] | None, idx: int, score: float, pictures: ImageFolder | None) -> dict:
    item = {"id": int(idx), "score": round(float(score), 6)}
    if labels is not None:
        item[key] = labels[int(idx)]
    if pictures is not None:
        path = pictures.find(item.get(key))
        item["picture"] = None if path is None else str(path)
    return item


def _explain(args: argparse.Namespace, searcher: Searcher, queries: list, results: list[dict]) -> None:
    """With ``--explain``: each hit's explanation (``pair_json``, as ``POST /v1/explain`` answers it)."""
    if not args.explain:
        return
    for query, record in zip(queries, results):
        for item in record["results"]:
            text = isinstance(query, str)
            image_id = item["id"] if text else None
            item["explanation"] = pair_json(
                searcher.explain(query, item["id"]),
                id=item["id"],
                image_id=image_id,
                boxes=searcher.boxes(image_id) if text else None,
                picture=item.get("picture"),
            )


def _print_explanation(ex: dict, top: int) -> None:
    """Each attention row's ``top`` most attended items: a word's regions (t2i) or a region's words (i2t)."""
    blocks = ex.get("members", [ex])
    for m, block in enumerate(blocks):
        attention = np.asarray(block["attention"])
        words, t2i = block["words"], block["cross_attn"] == "t2i"
        member = f"member {m} (weight {ex['weights'][m]:.3g}), " if "members" in ex else ""
        rows = "each word's top regions" if t2i else "each region's top words"
        print(f"{'':17}{member}{block['cross_attn']}, score {block['score']:.4f}: {rows}")

        def region(r: int) -> str:
            box = "" if ex["boxes"] is None else "[" + ",".join(f"{v:.0f}" for v in ex["boxes"][r]) + "]"
            return f"r{r}{box}"

        for row, weights in enumerate(attention):
            best = np.argsort(-weights, kind="stable")[:top]
            label = words[row] if t2i else region(row)
            items = [f"{region(c) if t2i else words[c]} {weights[c]:.2f}" for c in best]
            print(f"{'':19}{label:<14} {'  '.join(items)}")


def _print(results: list[dict], as_json: bool, top: int = 3) -> None:
    if as_json:
        print(json.dumps(results, ensure_ascii=False, indent=1))
        return
    for r in results:
        print(f"\n{r['query']}")
        print(f"  {'rank':>4}  {'score':>9}  {'id':>7}  item")
        for rank, item in enumerate(r["results"], 1):
            label = item.get("text", item.get("name", ""))
            picture = f"  ({item['picture']})" if item.get("picture") else ""
            print(f"  {rank:>4}  {item['score']:>9.4f}  {item['id']:>7}  {label}{picture}")
            if "explanation" in item:
                _print_explanation(item["explanation"], top)


def _text_queries(args: argparse.Namespace) -> list[str]:
    queries = list(args.queries)
    if args.queries_file:
        queries += _read_lines(args.queries_file, "queries file")
    elif not (queries or args.query_images or args.images or args.captions or args.verify) and not sys.stdin.isatty():
        data = sys.stdin.buffer.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerError(f"stdin: queries must be UTF-8 text (invalid byte at {e.start})") from e
        queries += [line.strip() for line in text.splitlines() if line.strip()]
    return queries


def _read_lines(path: str, what: str) -> list[str]:
    if path == "-":
        data = sys.stdin.buffer.read()
        name = "stdin"
    else:
        p = Path(path)
        if not p.is_file():
            raise SearchError(f"{what} {p}: no such file")
        data, name = p.read_bytes(), str(p)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{what} {name}: not UTF-8 text (invalid byte at {e.start})") from e
    return [line.strip() for line in text.splitlines() if line.strip()]


if __name__ == "__main__":
    sys.exit(main())
