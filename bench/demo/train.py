"""Train a small SCAN on the synthetic demo dataset, on CPU, and save an original-layout checkpoint.

The demo needs a checkpoint to export and serve, and pretrained SCAN checkpoints were never published.
This follows the original ``train.py`` (kuanghuei/SCAN) closely enough that its output is
indistinguishable in layout from a real one:

* loss: ``ContrastiveLoss`` with margin 0.2 and ``max_violation`` (hardest negative in the batch) on
  the (B, B) image x caption similarity of a batch of (image, caption) pairs, summed over positives
  for both caption retrieval and image retrieval, the diagonal masked;
* Adam, gradient-norm clipping at 2.0, learning rate divided by 10 every ``lr_update`` epochs;
* the best epoch by dev rsum (``bench.metrics.evaluate``) is written, as the original does, to
  ``runs/demo/model_best.pth.tar`` = ``{'epoch', 'model': [img_enc, txt_enc state dicts],
  'best_rsum', 'opt': argparse.Namespace(every train.py option + vocab_size), 'Eiters'}``.

Differences, all for speed on a 2-core machine: a small model (embed 128, word_dim 64, img_dim 256),
a higher learning rate (1e-3, divided by 10 for the last third of the epochs), the batched similarity
head (``export.model.batched_sims``, exact) instead of the original per-caption loop, batches of
similar caption lengths, denormals flushed to zero (see :func:`cpu_settings`), one thread and freed memory
kept for reuse (:func:`keep_freed_memory`). Batches hold distinct images, each with one of its captions; an
epoch visits every caption once. The default run (2000 images, 3 epochs) takes about 125 s of CPU time.

One thread, because the demo often shares its machine: measured on the 2-core machine, two threads trained
in 100 s idle but 210 s beside one CPU-bound process (the threads wait on each other), while one thread
needs about 125 s of CPU time (measured at load average 5-7), which it gets from the free core.

Training is skipped when the checkpoint is there and the stamp beside it (``demo_stamp.json``) records
the same dataset, configuration and hyper-parameters and the checkpoint's hash.

    python -m bench.demo.train --out demo   # dataset + training + test recall table
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from bench.demo.data import DATA_NAME, data_dir, make_dataset, read_stamp, vocab_file
from bench.metrics import RecallMetrics, evaluate, format_table
from export.checkpoint import load_checkpoint, save_checkpoint
from export.model import SCAN, batched_sims
from runtime.atomic import atomic_path, sha256_file, write_json
from runtime.captions import read_captions
from runtime.config import SCANConfig
from runtime.features import load_regions
from runtime.logs import command_parser, setup_logging
from runtime.tokenizer import Tokenizer
from runtime.vocab import Vocabulary

logger = logging.getLogger(__name__)

RUN_NAME = "demo"
CHECKPOINT_NAME = "model_best.pth.tar"
STAMP_NAME = "demo_stamp.json"
DEFAULT_EPOCHS = 3
# Bound on the (N, R, Q, L) attention tensors when scoring a whole split: ~32 MB each in float32.
_EVAL_ELEMS = 8_000_000
# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# What train_demo(data=...) may pass on to make_dataset.
DATA_OPTIONS = frozenset({"img_dim", "n_train", "n_dev", "n_test"})


class DemoTrainError(ValueError):
    """Invalid training parameters, or a dataset that does not fit them."""


@dataclass(frozen=True)
class HParams:
    """Optimisation settings (the model's own settings are in ``SCANConfig``)."""

    epochs: int = DEFAULT_EPOCHS
    batch_size: int = 128
    learning_rate: float = 1e-3
    lr_update: int = 2
    margin: float = 0.2
    max_violation: bool = True
    grad_clip: float = 2.0
    threads: int = 1


def demo_config(vocab_size: int, img_dim: int = 256, embed_size: int = 128, word_dim: int = 64) -> SCANConfig:
    """The demo model: t2i, LogSumExp, clipped_l2norm, lambda_softmax 9, lambda_lse 6, bi-GRU, 1 layer."""
    return SCANConfig(
        vocab_size=vocab_size,
        img_dim=img_dim,
        embed_size=embed_size,
        word_dim=word_dim,
        num_layers=1,
        bi_gru=True,
        raw_feature_norm="clipped_l2norm",
        agg_func="LogSumExp",
        cross_attn="t2i",
        lambda_lse=6.0,
        lambda_softmax=9.0,
    )


def checkpoint_path(out_dir: str | Path) -> Path:
    """``out_dir/runs/demo/model_best.pth.tar``."""
    return Path(out_dir) / "runs" / RUN_NAME / CHECKPOINT_NAME


def original_opt(cfg: SCANConfig, hp: HParams) -> argparse.Namespace:
    """Every option of the original ``train.py`` (its defaults where the demo has no say) plus vocab_size."""
    opt = {
        "data_path": "./data/",
        "data_name": DATA_NAME,
        "vocab_path": "./vocab/",
        "margin": hp.margin,
        "num_epochs": hp.epochs,
        "batch_size": hp.batch_size,
        "grad_clip": hp.grad_clip,
        "learning_rate": hp.learning_rate,
        "lr_update": hp.lr_update,
        "workers": 10,
        "log_step": 10,
        "val_step": 500,
        "logger_name": f"./runs/{RUN_NAME}/log",
        "model_name": f"./runs/{RUN_NAME}/checkpoint",
        "resume": "",
        "max_violation": hp.max_violation,
    }
    opt.update(cfg.to_dict())  # img_dim, embed_size, word_dim, num_layers, bi_gru, norms, lambdas, vocab_size
    return argparse.Namespace(**opt)


# ----------------------------------------------------------------------------- data


@dataclass
class Split:
    """A split as tensors: region features and <pad>-padded caption ids (image i owns captions 5i..5i+4)."""

    regions: torch.Tensor  # (N, R, img_dim) float32
    ids: torch.Tensor  # (5N, L) int64, <pad>-padded
    lengths: torch.Tensor  # (5N,) int64


def load_demo_split(out_dir: Path, split: str, vocab: Vocabulary, img_dim: int) -> Split:
    folder = data_dir(out_dir)
    regions = np.array(load_regions(folder / f"{split}_ims.npy", img_dim, mmap=False), dtype=np.float32)
    captions = read_captions(folder / f"{split}_caps.txt")
    if len(captions) != 5 * len(regions):
        raise DemoTrainError(
            f"{folder} ({split}): {len(captions)} captions for {len(regions)} images; expected 5 per image"
        )
    ids, lengths = Tokenizer(vocab).encode_batch(captions)
    return Split(torch.from_numpy(regions), torch.from_numpy(ids), torch.from_numpy(lengths))


def _trim(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Drop padding columns beyond the longest caption: the head's cost grows with L."""
    return ids[:, : int(lengths.max())]


# ----------------------------------------------------------------------------- loss and scoring


def contrastive_loss(scores: torch.Tensor, margin: float, max_violation: bool) -> torch.Tensor:
    """The original ``ContrastiveLoss`` on a (B, B) image x caption score matrix, positives on the diagonal."""
    diagonal = scores.diag().view(-1, 1)
    cost_s = (margin + scores - diagonal).clamp(min=0)  # caption retrieval: other captions for image i
    cost_im = (margin + scores - diagonal.t()).clamp(min=0)  # image retrieval: other images for caption j
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    cost_s = cost_s.masked_fill(eye, 0)
    cost_im = cost_im.masked_fill(eye, 0)
    if max_violation:
        cost_s = cost_s.max(dim=1)[0]
        cost_im = cost_im.max(dim=0)[0]
    return cost_s.sum() + cost_im.sum()


@torch.no_grad()
def split_sims(model: SCAN, split: Split, max_elems: int = _EVAL_ELEMS) -> np.ndarray:
    """(n_images, n_captions) similarities of a whole split, captions scored in bounded chunks."""
    was_training = model.training
    model.eval()
    try:
        images = model.img_enc(split.regions)
        n, r, _ = images.shape
        q = len(split.lengths)
        lmax = int(split.lengths.max())
        chunk = max(1, max_elems // (n * r * lmax))
        out = np.empty((n, q), dtype=np.float32)
        for start in range(0, q, chunk):
            lengths = split.lengths[start : start + chunk]
            ids = _trim(split.ids[start : start + chunk], lengths)
            caps = model.txt_enc(ids, lengths)
            out[:, start : start + chunk] = batched_sims(images, None, caps, lengths, None, model.cfg).numpy()
        return out
    finally:
        model.train(was_training)


def _batches(rng: np.random.Generator, lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """One epoch of caption-index batches: every caption once; within a batch, distinct images.

    Five rounds; in each, every image appears once, with a caption not used in an earlier round.
    Distinct images keep the off-diagonal of a batch's score matrix free of false negatives. Within a
    round captions are grouped by length (ties in random order), because a batch costs in proportion to
    its longest caption; the batches of all rounds are then shuffled.
    """
    n_images = len(lengths) // 5
    caption_order = np.argsort(rng.random((n_images, 5)), axis=1)  # per image, a permutation of 0..4
    batches = []
    for rnd in range(5):
        caps = 5 * np.arange(n_images) + caption_order[:, rnd]
        caps = caps[rng.permutation(n_images)]
        caps = caps[np.argsort(lengths[caps], kind="stable")]
        for start in range(0, n_images, batch_size):
            b = caps[start : start + batch_size]
            if len(b) >= 2:  # a lone pair has no negatives and gives no signal
                batches.append(b)
    return [batches[i] for i in rng.permutation(len(batches))]


# ----------------------------------------------------------------------------- training


def keep_freed_memory() -> None:
    """Let glibc's malloc keep freed blocks of up to 32 MiB for reuse instead of returning them to the kernel.

    A training step allocates and frees attention tensors of 10-30 MB; by default each comes fresh from
    mmap and is zeroed page by page on first touch. Measured on the 2-core machine: 80k page faults and 0.17 s
    of system time per step (a third of the step's CPU time), 35k and 0.07 s with this. Process-wide and
    not undone, hence called by the CLIs only; a no-op where the C library has no ``mallopt`` (not glibc).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum on 64-bit
        libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
    except (OSError, AttributeError):
        logger.debug("mallopt unavailable: freed memory goes back to the kernel")


@contextlib.contextmanager
def cpu_settings(threads: int) -> Iterator[None]:
    """Use ``threads`` intra-op threads and flush denormals to zero; restore both afterwards.

    Flushing denormals matters: the attention softmax (lambda 9) and the LogSumExp push many values
    below 1e-38, and on x86 CPUs arithmetic on such values is microcoded; measured on the 2-core
    machine it made training steps 4-8x slower (2-4 s instead of 0.45 s). The effect on the results is
    nil at the precision that matters (values below 1e-38 become 0).
    """
    previous_threads = torch.get_num_threads()
    # torch has no getter for the flag: probe it (a denormal survives a multiply only when not flushed).
    previous_flush = bool((torch.tensor([1e-39]) * 1.0).item() == 0.0)
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(previous_flush)
        torch.set_num_threads(previous_threads)


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DemoTrainError(f"{name} must be a positive integer, got {value!r}")
    return value


def _stamp_key(seed: int, data_stamp: dict[str, Any], cfg: SCANConfig, hp: HParams) -> dict[str, Any]:
    # Threads change float summation order, hence the weights: they belong to the key too.
    return {"seed": seed, "data": data_stamp, "config": cfg.to_dict(), "hparams": asdict(hp)}


def _cached(ckpt: Path, stamp_path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    if not ckpt.is_file() or not stamp_path.is_file():
        return None
    try:
        stamp = json.loads(stamp_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    # JSON round-trip so tuples/ints compare the way the stored stamp does.
    if stamp.get("key") != json.loads(json.dumps(key)) or stamp.get("checkpoint_sha256") != sha256_file(ckpt):
        return None
    return stamp


def train_demo(
    out_dir: str | Path,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    retrain: bool = False,
    log: Callable[[str], None] = print,
    *,
    progress: bool = True,
    data: Mapping[str, Any] | None = None,
    embed_size: int = 128,
    word_dim: int = 64,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    lr_update: int | None = None,
    threads: int = 1,
) -> Path:
    """Make (or reuse) the demo dataset under ``out_dir``, train, and return the checkpoint path.

    ``data``: keyword arguments for :func:`bench.demo.data.make_dataset` (img_dim, n_train, n_dev,
    n_test); the dataset's seed is ``seed``. ``lr_update`` defaults to two thirds of ``epochs``.
    Reuses an existing checkpoint whose stamp matches everything that determines it, unless ``retrain``.
    ``progress``: a progress bar within each epoch (on stderr: captions/s, mean loss, ETA).
    """
    out_dir = Path(out_dir)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DemoTrainError(f"seed must be a non-negative integer, got {seed!r}")
    epochs = _check_positive_int("epochs", epochs)
    if lr_update is None:
        lr_update = max(1, (2 * epochs) // 3)
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not learning_rate > 0:
        raise DemoTrainError(f"learning_rate must be a positive number, got {learning_rate!r}")
    hp = HParams(
        epochs=epochs,
        batch_size=_check_positive_int("batch_size", batch_size),
        learning_rate=float(learning_rate),
        lr_update=_check_positive_int("lr_update", lr_update),
        threads=_check_positive_int("threads", threads),
    )
    data = dict(data or {})
    unknown = sorted(set(data) - DATA_OPTIONS)
    if unknown:
        raise DemoTrainError(
            f"unknown dataset options {unknown}; expected some of {sorted(DATA_OPTIONS)} "
            f"(the dataset's seed is the seed argument)"
        )

    make_dataset(out_dir, seed=seed, **data)
    data_stamp = read_stamp(out_dir)
    if data_stamp is None:
        raise DemoTrainError(f"{data_dir(out_dir)}: the dataset stamp is missing or unreadable")
    img_dim = int(data_stamp["params"]["img_dim"])
    vocab = Vocabulary.from_json(vocab_file(out_dir))
    cfg = demo_config(len(vocab), img_dim=img_dim, embed_size=embed_size, word_dim=word_dim)

    ckpt = checkpoint_path(out_dir)
    stamp_path = ckpt.parent / STAMP_NAME
    key = _stamp_key(seed, data_stamp, cfg, hp)
    if not retrain:
        stamp = _cached(ckpt, stamp_path, key)
        if stamp is not None:
            _vocab_beside(out_dir, ckpt)
            log(
                f"cached: {ckpt} (epoch {stamp['best_epoch']}, dev rsum {stamp['best_rsum']:.1f}) matches "
                f"seed {seed}, dataset and hyper-parameters; not retraining (--retrain trains again)"
            )
            return ckpt

    with cpu_settings(hp.threads):
        result = _train(out_dir, seed, cfg, hp, vocab, ckpt, stamp_path, log, progress)
    _vocab_beside(out_dir, ckpt)
    write_json(stamp_path, {"key": key, "checkpoint_sha256": sha256_file(ckpt), **result})
    return ckpt


def _vocab_beside(out_dir: Path, ckpt: Path) -> None:
    """Copy the vocabulary next to the checkpoint, where ``find_vocab`` looks whatever the working folder.

    The original layout puts it in ``<root>/vocab/`` and relies on being run from ``<root>``; the copy
    lets ``to_onnx.py out/runs/demo/model_best.pth.tar`` work from anywhere without ``--vocab``.
    """
    source = vocab_file(out_dir)
    target = ckpt.parent / source.name
    data = source.read_bytes()
    if not target.is_file() or target.read_bytes() != data:
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)


def _train(
    out_dir: Path,
    seed: int,
    cfg: SCANConfig,
    hp: HParams,
    vocab: Vocabulary,
    ckpt: Path,
    stamp_path: Path,
    log: Callable[[str], None],
    progress: bool,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    # The old stamp must not vouch for a checkpoint this run is about to overwrite.
    stamp_path.unlink(missing_ok=True)
    train = load_demo_split(out_dir, "train", vocab, cfg.img_dim)
    dev = load_demo_split(out_dir, "dev", vocab, cfg.img_dim)
    n_train = len(train.regions)
    train_lengths = train.lengths.numpy()
    log(
        f"training SCAN ({cfg.cross_attn} {cfg.agg_func}, embed {cfg.embed_size}, vocab {cfg.vocab_size}) on "
        f"{n_train} images / {len(train.lengths)} captions, {hp.epochs} epochs, batch {hp.batch_size}, "
        f"{hp.threads} threads"
    )

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SCAN(cfg)
    model.train()
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=hp.learning_rate)
    best_rsum, best_epoch, best_dev, iters = -1.0, 0, None, 0
    history = []
    for epoch in range(hp.epochs):
        lr = hp.learning_rate * 0.1 ** (epoch // hp.lr_update)  # the original adjust_learning_rate
        for group in optimizer.param_groups:
            group["lr"] = lr
        total, steps = 0.0, 0
        batches = _batches(rng, train_lengths, hp.batch_size)
        bar = tqdm(
            total=sum(len(b) for b in batches),
            desc=f"epoch {epoch + 1}/{hp.epochs}",
            unit="cap",
            disable=not progress,
            leave=False,
            dynamic_ncols=True,
        )
        for caps in batches:
            caps_t = torch.from_numpy(caps)
            regions = train.regions[caps_t // 5]
            lengths = train.lengths[caps_t]
            ids = _trim(train.ids[caps_t], lengths)
            scores = batched_sims(model.img_enc(regions), None, model.txt_enc(ids, lengths), lengths, None, cfg)
            loss = contrastive_loss(scores, hp.margin, hp.max_violation)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, hp.grad_clip)
            optimizer.step()
            total += float(loss.detach())
            steps += 1
            iters += 1
            bar.update(len(caps))
            bar.set_postfix(loss=f"{total / steps:.2f}", refresh=False)
        bar.close()
        metrics = evaluate(split_sims(model, dev))
        rsum = metrics.rsum
        is_best = rsum > best_rsum
        if is_best:
            best_rsum, best_epoch, best_dev = rsum, epoch + 1, metrics
            _save(ckpt, model, cfg, hp, epoch + 1, best_rsum, iters)
        history.append({"epoch": epoch + 1, "loss": total / max(steps, 1), "dev_rsum": rsum})
        log(
            f"epoch {epoch + 1:>2}/{hp.epochs}  lr {lr:.0e}  loss {total / max(steps, 1):7.3f}  "
            f"dev rsum {rsum:6.1f}  (R@1 i2t {metrics.i2t.r1:.1f} t2i {metrics.t2i.r1:.1f})"
            f"{'  *best' if is_best else ''}  {time.perf_counter() - t0:6.1f}s"
        )
    elapsed = time.perf_counter() - t0
    log(f"best epoch {best_epoch} (dev rsum {best_rsum:.1f}) saved to {ckpt}; {elapsed:.1f}s")
    return {
        "best_epoch": best_epoch,
        "best_rsum": best_rsum,
        "dev": best_dev.to_dict(),
        "Eiters": iters,
        "train_seconds": round(elapsed, 1),
        "history": history,
    }


def _save(path: Path, model: SCAN, cfg: SCANConfig, hp: HParams, epoch: int, best_rsum: float, iters: int) -> None:
    # Atomic: an interrupted run leaves the previous best checkpoint, never a truncated one.
    save_checkpoint(path, model, original_opt(cfg, hp), epoch=epoch, best_rsum=best_rsum, iters=iters)
    logger.debug("saved %s (epoch %d, rsum %.1f)", path, epoch, best_rsum)


# ----------------------------------------------------------------------------- evaluation / CLI


def evaluate_checkpoint(ckpt: str | Path, out_dir: str | Path, split: str = "test", threads: int = 2) -> RecallMetrics:
    """Recall metrics of a saved checkpoint on a demo split, scored with the PyTorch model."""
    loaded = load_checkpoint(ckpt)
    vocab = Vocabulary.from_json(vocab_file(out_dir))
    with cpu_settings(threads):
        data = load_demo_split(Path(out_dir), split, vocab, loaded.config.img_dim)
        return evaluate(split_sims(loaded.model, data))


def main(argv: list[str] | None = None) -> int:
    p = command_parser(__doc__.split("\n\n")[0], prog="python -m bench.demo.train")
    p.add_argument("--out", default="demo", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the dataset and of the training")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="training epochs")
    p.add_argument("--retrain", action="store_true", help="train again even if a matching checkpoint exists")
    args = p.parse_args(argv)
    setup_logging(logging.WARNING, args.log_format)
    keep_freed_memory()
    t0 = time.perf_counter()
    try:
        ckpt = train_demo(args.out, seed=args.seed, epochs=args.epochs, retrain=args.retrain)
        metrics = evaluate_checkpoint(ckpt, args.out, "test")
    except (DemoTrainError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n_test = int(read_stamp(args.out)["params"]["n_images"]["test"])
    print(
        format_table(
            metrics,
            title=f"test split, {n_test} images / {5 * n_test} captions "
            f"(chance: R@1 {100 / n_test:.2f}%, R@10 {1000 / n_test:.1f}%)",
        )
    )
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
