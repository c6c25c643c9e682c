"""Export an original SCAN checkpoint to verified ONNX graphs.

    python export/to_onnx.py runs/f30k_scan/model_best.pth.tar [--vocab V] [--out engines] [--name scan]

Writes ``<name>.image.onnx``, ``<name>.text.onnx``, ``<name>.onnx`` (similarity head),
``<name>.vocab.json`` and the manifest ``<name>.json``; exits non-zero, naming the graph, if any graph
disagrees with the PyTorch reference.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from export.checkpoint import MAX_CHECKPOINT_BYTES, CheckpointError, find_vocab, load_checkpoint, load_vocab
from export.progress import timed_progress
from runtime.logs import command_parser, setup_logging
from runtime.manifest import DEFAULT_MAX_WORDS
from runtime.vocab import VocabularyError


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="original SCAN checkpoint (model_best.pth.tar)")
    p.add_argument("--vocab", help="vocabulary JSON (default: <vocab_path>/<data_name>_vocab.json from the opt)")
    p.add_argument("--out", default="engines", help="output folder")
    p.add_argument("--name", default="scan", help="file name stem")
    p.add_argument(
        "--max-words",
        type=int,
        default=DEFAULT_MAX_WORDS,
        help="longest caption served, in tokens incl. <start>/<end>",
    )
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle the checkpoint without the allow-list or size checks (may execute code; only for "
        "files you trust)",
    )
    p.add_argument(
        "--max-checkpoint-gb",
        type=float,
        default=MAX_CHECKPOINT_BYTES / 2**30,
        help="refuse a checkpoint that unpacks to more than this many GiB",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(logging.WARNING, args.log_format)
    from export.exporter import ParityError, export_all  # torch: imported after --help has been answered

    progress = timed_progress()
    try:
        progress(f"loading {args.checkpoint}")
        ckpt = load_checkpoint(
            args.checkpoint, trust=args.trust_checkpoint, max_bytes=int(args.max_checkpoint_gb * 2**30)
        )
        vocab_path = find_vocab(args.checkpoint, ckpt.opt, args.vocab)
        vocab = load_vocab(vocab_path, ckpt.config)
        progress(f"config: {_describe(ckpt.config)}; vocabulary {vocab_path} ({len(vocab)} words)")
        out = Path(args.out)
        manifest = export_all(ckpt, vocab.to_json_dict(), out, args.name, args.max_words, progress)
    except (CheckpointError, VocabularyError, ParityError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    progress("done")
    for key, g in manifest["graphs"].items():
        print(f"  {out / g['file']}  ({key}, parity max err {g['parity']['max_abs_err']:.1e})")
    print(f"  {out / (args.name + '.json')}  (manifest)")
    return 0


def _describe(cfg) -> str:
    return (
        f"{cfg.cross_attn} {cfg.agg_func} {cfg.raw_feature_norm}, embed {cfg.embed_size}, "
        f"{'bi-' if cfg.bi_gru else ''}GRU x{cfg.num_layers}, img_dim {cfg.img_dim}, vocab {cfg.vocab_size}"
    )


if __name__ == "__main__":
    sys.exit(main())
