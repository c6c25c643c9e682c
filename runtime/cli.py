"""What the CLIs share: engine flags and error reporting (runtime/search.py, bench/recall.py)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from runtime.backends import BACKENDS, BackendError
from runtime.captions import DataError
from runtime.engine import ScanEngine
from runtime.features import FeatureError
from runtime.gallery import GalleryError
from runtime.logs import setup_logging
from runtime.manifest import ManifestError
from runtime.options import GALLERY_DTYPES, EngineOptions, OptionsError, SearchOptions
from runtime.searcher import SearchError
from runtime.tokenizer import TokenizerError
from runtime.vocab import VocabularyError

# Errors caused by the user's input or files: reported in one line, exit code 2, no traceback.
USER_ERRORS = (
    BackendError,
    DataError,
    FeatureError,
    GalleryError,
    ManifestError,
    OptionsError,
    SearchError,
    TokenizerError,
    VocabularyError,
)


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="auto: TensorRT for a .plan when installed, else ONNX Runtime (numpy without it); "
        "numpy / cupy: the export's weights file, no graph runtime; openvino: the similarity head in bf16 "
        "with OpenVINO (approximate, faster on CPUs with bf16; docs/performance.md)",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "fp16"),
        default="fp32",
        help="fp32 (exact) or fp16: the fp16 graphs (ONNX Runtime; TensorRT uses its plans), float16 "
        "storage and GEMM operands (numpy / cupy)",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="ONNX Runtime device; cuda needs onnxruntime-gpu and keeps the image gallery on the GPU",
    )
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_engines_arguments(p: argparse.ArgumentParser, repeat: str) -> None:
    """``--engine`` (repeated ``repeat``: for an ensemble) and the ensemble's ``--weights``."""
    p.add_argument(
        "--engine",
        action="append",
        required=True,
        help=f"scan.json, scan.onnx or scan.plan; repeat {repeat} (similarities averaged)",
    )
    p.add_argument(
        "--weights",
        help="an ensemble's weights, one per --engine, e.g. 0.7,0.3 (normalised to sum to 1; default equal)",
    )


def add_gallery_dtype_argument(p: argparse.ArgumentParser, flag: str, help: str) -> None:
    """The flag choosing how a gallery stores encoded items (float32 by default)."""
    p.add_argument(flag, choices=GALLERY_DTYPES, default="float32", help=help)


def engine_options(args: argparse.Namespace) -> EngineOptions:
    """The flags of ``add_engine_arguments``."""
    return EngineOptions(args.backend, args.precision, args.device, args.threads)


def search_options(args: argparse.Namespace) -> SearchOptions:
    """The search flags a CLI has (``--candidates``, ``--nprobe``, ``--candidate-source``, ``--candidate-plan``);
    the rest default."""
    names = ("candidates", "nprobe", "candidate_source", "candidate_plan")
    flags = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return SearchOptions(**flags)


@contextlib.contextmanager
def open_engines(paths: Sequence[str | Path], args: argparse.Namespace) -> Iterator[list[ScanEngine]]:
    """The engines at ``paths`` opened with the CLI's engine flags; all closed on exit."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(ScanEngine.open(path, engine_options(args))) for path in paths]


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that ``finally`` blocks remove temporary files."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def run_cli(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a CLI body with warnings on stderr (``--log-format``) and user errors as one line (exit 2).

    Ctrl-C exits 130 and SIGTERM 143, quietly, after the body's cleanup ran (an interrupted gallery write
    leaves the previous gallery and no temporary files).
    """
    setup_logging(logging.WARNING, getattr(args, "log_format", "text"))
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return run(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
