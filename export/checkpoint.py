"""Original SCAN checkpoints: load them (and their vocabulary) safely, and write them.

The original ``train.py`` saves ``{'epoch', 'model': [img_enc.state_dict(), txt_enc.state_dict()],
'best_rsum', 'opt': argparse.Namespace, 'Eiters'}``, either in the legacy (PyTorch 0.3 / Python 2,
non-zip) or the zip serialization. Both load with ``weights_only=True`` and an explicit allow-list;
a pickle that needs any other global is refused (nothing is executed) unless the user opts in.

Before unpickling, the file's size is bounded: a zip checkpoint's declared record sizes must fit the file
(PyTorch stores records uncompressed, so a deflated record that unpacks to far more than the file is a
decompression bomb) and a limit (``MAX_CHECKPOINT_BYTES``, raised with ``max_bytes``). A legacy (non-zip)
checkpoint is read from the file as it is: its size is held to the same limit.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.atomic import atomic_path, sha256_file
from runtime.config import ConfigError, SCANConfig
from runtime.vocab import Vocabulary

if TYPE_CHECKING:
    import torch

    from export.model import SCAN

logger = logging.getLogger(__name__)

# What an original checkpoint legitimately needs beyond tensors and containers (which torch's
# weights-only unpickler already allows, legacy storages included).
ALLOWED_GLOBALS: list[Any] = [argparse.Namespace]
# Unpacked size allowed by default: original SCAN checkpoints hold tens of MB; the largest plausible ones
# (big vocabularies, 2048-d embeddings) a few hundred.
MAX_CHECKPOINT_BYTES = 4 << 30
# A zip of uncompressed records is its records plus headers; allow some slack for a re-zipped file.
_UNPACKED_SLACK = (2, 1 << 20)


class CheckpointError(ValueError):
    """The checkpoint cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    path: Path
    sha256: str
    config: SCANConfig
    model: SCAN
    opt: dict[str, Any]
    epoch: Any = None
    best_rsum: Any = None


def save_checkpoint(
    path: str | Path,
    model: SCAN,
    opt: argparse.Namespace,
    epoch: Any = 0,
    best_rsum: Any = 0.0,
    iters: int = 0,
) -> Path:
    """Write ``model`` to ``path`` in the original ``train.py`` layout, atomically.

    ``opt`` is the training options as ``train.py`` pickles them (an ``argparse.Namespace`` holding every
    model option of ``model.cfg``).
    An interrupted write leaves the previous file, never a truncated one.
    """
    path = Path(path)
    state = {
        "epoch": epoch,
        "model": [model.img_enc.state_dict(), model.txt_enc.state_dict()],
        "best_rsum": best_rsum,
        "opt": opt,
        "Eiters": iters,
    }
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def check_size(path: str | Path, max_bytes: int | None = MAX_CHECKPOINT_BYTES) -> int:
    """The bytes loading ``path`` unpacks, checked against the file and ``max_bytes`` (None: no limit)
    before anything is decompressed or unpickled."""
    path = Path(path)
    size = path.stat().st_size
    unpacked = size
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                records = z.infolist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise CheckpointError(f"checkpoint {path}: corrupted zip archive ({e})") from e
        unpacked = sum(r.file_size for r in records)
        factor, slack = _UNPACKED_SLACK
        if unpacked > factor * size + slack:
            big = max(records, key=lambda r: r.file_size)
            raise CheckpointError(
                f"checkpoint {path}: the archive declares {unpacked:,} bytes unpacked in a file of {size:,} bytes "
                f"({big.filename}: {big.file_size:,} bytes compressed to {big.compress_size:,}); PyTorch stores "
                f"checkpoints uncompressed, so this is refused before loading (a decompression bomb). If you "
                f"trust this file, pass --trust-checkpoint."
            )
    if max_bytes is not None and unpacked > max_bytes:
        raise CheckpointError(
            f"checkpoint {path}: {unpacked:,} bytes to load, more than the limit of {max_bytes:,} bytes "
            f"({max_bytes / 2**30:g} GiB); for a genuinely larger model raise it (--max-checkpoint-gb)"
        )
    return unpacked


def read_checkpoint(
    path: str | Path, trust: bool = False, max_bytes: int | None = MAX_CHECKPOINT_BYTES
) -> dict[str, Any]:
    """Unpickle ``path`` with the allow-list (``trust=True``: full pickle and no size checks, for checkpoints
    you trust); ``max_bytes``: see :func:`check_size`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if not trust:
        check_size(path, max_bytes)
    import torch  # here, not at the top: to_onnx.py --help and the size checks need no torch

    try:
        if trust:
            logger.warning("loading %s with full pickle (--trust-checkpoint): it may run code", path)
            raw = torch.load(path, map_location="cpu", weights_only=False, encoding="latin1")
        else:
            with torch.serialization.safe_globals(ALLOWED_GLOBALS):
                raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if not found and ("Weights only load failed" not in str(e) or "Unsupported operand" in str(e)):
            raise CheckpointError(f"checkpoint {path}: cannot be read as a PyTorch checkpoint ({e})") from e
        what = f"the global {found.group(1)}" if found else "an object outside the allow-list"
        raise CheckpointError(
            f"checkpoint {path}: refused to unpickle {what}, which an original SCAN checkpoint does not "
            f"contain and which could execute code. If you trust this file, pass --trust-checkpoint."
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot be read as a PyTorch checkpoint ({e})") from e
    raw = _text_keys(raw)
    if not isinstance(raw, dict) or "model" not in raw or "opt" not in raw:
        got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(
            f"checkpoint {path}: expected the original layout, a dict with 'model' and 'opt' keys; got {got}"
        )
    return raw


def load_checkpoint(
    path: str | Path, trust: bool = False, max_bytes: int | None = MAX_CHECKPOINT_BYTES
) -> LoadedCheckpoint:
    path = Path(path)
    raw = read_checkpoint(path, trust=trust, max_bytes=max_bytes)
    states = raw["model"]
    if not isinstance(states, (list, tuple)) or len(states) != 2:
        raise CheckpointError(
            f"checkpoint {path}: 'model' must be [img_enc_state_dict, txt_enc_state_dict]; got "
            f"{type(states).__name__} of length {len(states) if hasattr(states, '__len__') else '?'}"
        )
    img_sd, txt_sd = (_text_keys(sd) for sd in states)
    vocab_size = int(txt_sd["embed.weight"].shape[0]) if "embed.weight" in txt_sd else None
    opt = raw["opt"]
    opt_dict = _text_keys(dict(opt) if isinstance(opt, dict) else dict(vars(opt)))
    try:
        cfg = SCANConfig.from_opt(opt_dict, vocab_size=vocab_size)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from e
    from export.model import SCAN

    model = SCAN(cfg)
    _load_strict(model.img_enc, img_sd, "image encoder", path)
    _load_strict(model.txt_enc, txt_sd, "text encoder", path)
    model.eval()
    return LoadedCheckpoint(
        path=path,
        sha256=sha256_file(path),
        config=cfg,
        model=model,
        opt=opt_dict,
        epoch=raw.get("epoch"),
        best_rsum=raw.get("best_rsum"),
    )


def _text_keys(d: Any) -> Any:
    """Python 2 pickles read without an encoding carry ``bytes`` keys; the original names are ASCII."""
    if isinstance(d, dict):
        return {(k.decode("utf-8") if isinstance(k, bytes) else k): v for k, v in d.items()}
    return d


def _load_strict(module: torch.nn.Module, state: Any, what: str, path: Path) -> None:
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: the {what} state dict is a {type(state).__name__}, not a dict")
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if shapes:
            parts.append("mis-shaped " + "; ".join(shapes))
        raise CheckpointError(
            f"checkpoint {path}: the {what} does not match the configuration in its opt: " + ", ".join(parts)
        )
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


def find_vocab(ckpt_path: str | Path, opt: dict[str, Any], explicit: str | Path | None = None) -> Path:
    """``<vocab_path>/<data_name>_vocab.json`` relative to the checkpoint's folder and the working directory."""
    if explicit is not None:
        p = Path(explicit)
        if not p.is_file():
            raise CheckpointError(f"vocabulary {p}: no such file")
        return p
    vocab_path = opt.get("vocab_path", "./vocab/")
    data_name = opt.get("data_name", "")
    vocab_path = vocab_path.decode() if isinstance(vocab_path, bytes) else str(vocab_path)
    data_name = data_name.decode() if isinstance(data_name, bytes) else str(data_name)
    name = f"{data_name}_vocab.json"
    ckpt_dir = Path(ckpt_path).resolve().parent
    # The original layout is runs/<run>/model_best.pth.tar beside ./vocab/, run from the repo root.
    candidates = [
        ckpt_dir / vocab_path / name,
        ckpt_dir / name,
        ckpt_dir.parent / vocab_path / name,
        ckpt_dir.parent.parent / vocab_path / name,
        Path.cwd() / vocab_path / name,
    ]
    for c in candidates:
        if c.is_file():
            return c
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise CheckpointError(f"no vocabulary found for {ckpt_path}: tried {tried}; pass --vocab FILE")


def load_vocab(path: Path, cfg: SCANConfig) -> Vocabulary:
    vocab = Vocabulary.from_json(path)
    if len(vocab) != cfg.vocab_size:
        raise CheckpointError(
            f"vocabulary {path} has {len(vocab)} words but the checkpoint's embedding has {cfg.vocab_size} rows"
        )
    return vocab
