"""Split a gallery folder into shards, or merge shards back (the layout: runtime/gallery/shards.py).

python runtime/shards.py split --gallery gal --out gal-shards --shards 4
python runtime/shards.py merge --shards-dir gal-shards --out gal-merged
"""

from __future__ import annotations

import argparse
import sys

from runtime.cli import run_cli
from runtime.gallery.shards import load_shard, merge, split
from runtime.logs import HelpFormatter, command_parser


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("Split a gallery into shards, or merge shards back.")
    sub = p.add_subparsers(dest="command", required=True, help="split, or merge")
    s = sub.add_parser(
        "split", help="split --gallery into --shards contiguous id ranges at --out", formatter_class=HelpFormatter
    )
    s.add_argument("--gallery", required=True, help="gallery folder (images/ and/or captions/)")
    s.add_argument("--out", required=True, help="new folder for the sharded gallery")
    s.add_argument("--shards", type=int, required=True, help="number of shards S")
    m = sub.add_parser(
        "merge",
        help="merge the sharded gallery --shards-dir into one gallery folder at --out",
        formatter_class=HelpFormatter,
    )
    m.add_argument("--shards-dir", required=True, help="sharded gallery folder (holds shards.json)")
    m.add_argument("--out", required=True, help="new gallery folder")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(_run, build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    if args.command == "split":
        for s in split(args.gallery, args.out, args.shards):
            _, images, captions = load_shard(s.folder)
            print(
                f"{s.folder}: images {_describe(s.images_offset, images)}, "
                f"captions {_describe(s.captions_offset, captions)}",
                file=sys.stderr,
            )
    else:
        print(f"merged into {merge(args.shards_dir, args.out)}", file=sys.stderr)
    return 0


def _describe(offset: int, gallery) -> str:
    return f"ids {offset}..{offset + len(gallery) - 1}" if gallery is not None and len(gallery) else "none"


if __name__ == "__main__":
    sys.exit(main())
