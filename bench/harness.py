"""What every bench script shares: its common arguments, timing, the machine's description, JSON and plots.

* Arguments: ``parser`` adds the common flags (``--json``, ``--plot``/``--plots``, ``--quick``, ``--seed``,
  ``--cache``); ``ints`` and ``positive`` check values; ``run`` runs a script's body with log lines on
  stderr and bad input reported in one line (exit 2).
* Timing: ``time_calls`` (warm-up, then repeats within a budget), ``interleaved`` (contenders timed in
  alternation, so a change of the machine's load hits them alike), summarised by ``stats``,
  ``percentiles`` and ``throughput``.
* The machine: ``describe`` (CPU, cores, memory, load average, library versions, GPUs), best effort:
  a missing ``/proc`` file, library or GPU is recorded as such, never an error.
* Output: ``write_plot`` (PNG through matplotlib, skipped with the reason without it) and ``finish``
  (the text report on stdout, the JSON written atomically).

Nothing here imports the runtime's engine: bench/gpu_check.py runs on GPU images without its tokenizer.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime import atomic
from runtime.install import install_command
from runtime.logs import command_parser, setup_logging

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- arguments


class ArgumentError(ValueError):
    """A bad value of a bench script's flag: reported in one line, exit 2."""


def parser(
    doc: str,
    *,
    quick: str | None = None,
    plot: str | None = None,
    cache: Path | None = None,
    seed: bool = True,
) -> argparse.ArgumentParser:
    """A bench script's parser with the flags they share: ``--json FILE`` always, ``--quick`` (with its
    help), ``--plot FILE`` or ``--plots DIR`` (``plot`` is "file" or "dir"), ``--cache`` (its default),
    ``--seed``."""
    p = command_parser(doc.split("\n\n")[0])
    if quick:
        p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--json", type=Path, help="write every figure to this JSON file (atomically)")
    if plot == "file":
        p.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")
    elif plot == "dir":
        p.add_argument("--plots", type=Path, help="write PNG plots into this folder (needs matplotlib)")
    if cache is not None:
        p.add_argument("--cache", type=Path, default=cache, help="kept between runs")
    if seed:
        p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and models")
    return p


def ints(text: str, flag: str) -> list[int]:
    """Comma-separated positive integers, or ArgumentError naming ``--flag``."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ArgumentError(f"--{flag}: expected comma-separated positive integers, received {text!r}")
    return values


def positive(args: argparse.Namespace, *names: str) -> None:
    """ArgumentError naming the first of ``names`` (flags, ``-`` as ``_``) set to a value below 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            flag = name.replace("_", "-")
            raise ArgumentError(f"--{flag} must be a positive integer, received {value}")


def run(body: Callable[[argparse.Namespace], int], args: argparse.Namespace, level: int = logging.INFO) -> int:
    """``body(args)`` with timestamped log lines on stderr; a bad flag or input file is one line, exit 2."""
    from runtime.cli import run_cli  # not at import: gpu_check runs where the runtime's tokenizer may be missing

    setup_logging(level, getattr(args, "log_format", "text"), "%(asctime)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)

    def checked(a: argparse.Namespace) -> int:
        try:
            return body(a)
        except ArgumentError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run_cli(checked, args)


# ---------------------------------------------------------------------------------------------- timing


def stats(samples: Sequence[float]) -> dict[str, Any]:
    """Count, percentiles (p10..p99, median), mean, min and max of ``samples``."""
    x = np.asarray(samples, dtype=np.float64)
    p = np.percentile(x, [10, 25, 50, 75, 90, 95, 99])
    keys = ("p10", "p25", "median", "p75", "p90", "p95", "p99")
    out: dict[str, Any] = {"n": int(x.size), **{k: float(v) for k, v in zip(keys, p)}}
    out.update(mean=float(x.mean()), min=float(x.min()), max=float(x.max()))
    return out


def percentiles(
    samples: Sequence[float],
    qs: Sequence[float],
    unit: str = "",
    scale: float = 1.0,
    ndigits: int | None = None,
    median: str = "p50",
) -> dict[str, float | None]:
    """``{"p<q><unit>": ...}`` of ``samples`` x ``scale`` (1e3: seconds to ms), the 50th named ``median``
    (``"median"`` gives ``median<unit>``), rounded to ``ndigits``; None each without samples."""
    x = np.asarray(samples, np.float64) * scale
    out: dict[str, float | None] = {}
    for q in qs:
        v = float(np.percentile(x, q)) if x.size else None
        out[f"{median if q == 50 else f'p{q:g}'}{unit}"] = v if v is None or ndigits is None else round(v, ndigits)
    return out


def time_calls(
    fn: Callable[[], Any],
    warmup: int,
    min_repeats: int,
    max_repeats: int,
    budget_s: float,
    sync: Callable[[], None] | None = None,
) -> list[float]:
    """Seconds per call after ``warmup`` calls: at least ``min_repeats``, then until ``budget_s`` or ``max_repeats``.

    ``sync`` waits for asynchronous work (a GPU stream) inside each timed call.
    """
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_repeats and (len(samples) < min_repeats or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append(time.perf_counter() - t0)
    return samples


def interleaved(
    contenders: Mapping[str, Callable[[int], Any]],
    rounds: int,
    warmup: int = 0,
    rotate: bool = False,
    settle: bool = False,
    budget_s: float | None = None,
    check: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each contender, timed in alternation: round ``i`` calls every ``fn(i)`` once.

    ``warmup`` untimed calls ``fn(0..warmup-1)`` each first. ``rotate``: round ``i`` starts with the
    ``i``-th contender, so none always runs right after the same other. ``settle``: each timed call
    follows an untimed one of the same contender (ONNX Runtime's and OpenBLAS's worker threads keep
    spinning a little after a call; on 2 cores that tail would be charged to the next contender).
    ``budget_s``: stop after the round that passes it (at least 3 rounds). ``check(i, answers)``
    sees each round's results.
    """
    names = list(contenders)
    for fn in contenders.values():
        for w in range(warmup):
            fn(w)
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for i in range(rounds):
        answers = {}
        for name in names[i % len(names) :] + names[: i % len(names)] if rotate else names:
            if settle:
                contenders[name](i)
            t0 = time.perf_counter()
            answers[name] = contenders[name](i)
            samples[name].append(time.perf_counter() - t0)
        if check is not None:
            check(i, answers)
        if budget_s is not None and i >= 2 and time.perf_counter() - start > budget_s:
            break
    return samples


def time_each(fn: Callable[[int], Any], n: int, warmup: int = 0) -> tuple[list[float], list[Any]]:
    """Seconds of each call ``fn(i)``, ``i`` in ``range(n)`` (one query each: the latency a user sees), and
    the results, after ``warmup`` untimed calls."""
    results: list[Any] = []
    times = interleaved({"": fn}, n, warmup, check=lambda i, answers: results.append(answers[""]))[""]
    return times, results


def throughput(times: list[float], pairs: int) -> dict[str, Any]:
    """A measured contender: ``pairs`` scored per call, pairs/s at the median and at the p10..p90 spread."""
    s = stats(times)
    return {
        "status": "measured",
        "pairs": pairs,
        "seconds": s,
        "pairs_per_s": pairs / s["median"],
        "pairs_per_s_p10": pairs / s["p90"],
        "pairs_per_s_p90": pairs / s["p10"],
    }


def skipped(reason: str, **extra: Any) -> dict[str, Any]:
    """A figure not measured, and why (never an invented number)."""
    return {"status": "skipped", "reason": reason, **extra}


def overlap_at(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean over rows of |top-k of a and top-k of b| / k: how well two searches agree."""
    return float(np.mean([len(set(x[:k]) & set(y[:k])) / k for x, y in zip(a, b)]))


# ---------------------------------------------------------------------------------------------- the machine


def _proc_bytes(path: str, key: str) -> int | None:
    """A ``key: N kB`` line of a /proc file in bytes, or None where unknown."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def mem_available() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or None where unknown."""
    return _proc_bytes("/proc/meminfo", "MemAvailable:")


def rss_bytes() -> int:
    """This process's resident memory now (0 where unknown)."""
    return _proc_bytes("/proc/self/status", "VmRSS:") or 0


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def optional_torch():
    """The ``torch`` module, or None where it is not installed (the runtime never needs it)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def ort_providers() -> list[str]:
    try:
        import onnxruntime as ort

        return list(ort.get_available_providers())
    except ImportError:
        return []


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:  # not installed, or broken: either way there is no version to report
        return None


def _blas() -> str | None:
    try:
        info = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{info.get('name')} {info.get('version')}"
    except Exception:  # older numpy without mode="dicts"
        return None


def _gpus() -> list[dict[str, Any]]:
    """CUDA devices as PyTorch sees them (empty without torch or without a GPU)."""
    torch = optional_torch()
    if torch is None:
        return []
    try:
        if not torch.cuda.is_available():
            return []
        out = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append(
                {"index": i, "name": p.name, "memory_bytes": int(p.total_memory), "capability": f"{p.major}.{p.minor}"}
            )
        return out
    except Exception as e:  # a broken driver should not stop a CPU benchmark
        logger.warning("cannot query CUDA devices: %s", e)
        return []


def describe(announce: bool = False) -> dict[str, Any]:
    """The machine a benchmark runs on, so its numbers can be read (and compared) later; ``announce``
    prints its summary line on stderr first."""
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = None
    info = {
        "cpu_model": _cpu_model(),
        # The affinity mask, not os.cpu_count(): containers often see more cores than they may use.
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
        "logical_cpus": os.cpu_count(),
        "memory_bytes": mem,
        # Recorded because the benchmark may share the machine: a load above the core count means
        # the timings are slower than the machine can do.
        "load_average_at_start": load_average(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": _version("numpy"),
        "blas": _blas(),
        "onnxruntime": _version("onnxruntime"),
        "onnxruntime_providers": ort_providers(),
        "torch": _version("torch"),
        "onnx": _version("onnx"),
        "gpus": _gpus(),
    }
    if announce:
        print(f"machine: {summary_line(info)}", file=sys.stderr)
    return info


def summary_line(m: dict[str, Any]) -> str:
    gpu = ", ".join(g["name"] for g in m.get("gpus") or []) or "none"
    return (
        f"{m['cpu_model']}, {m['cores']} cores, load {m['load_average_at_start']}; numpy {m['numpy']} "
        f"({m['blas']}), onnxruntime {m['onnxruntime']}, torch {m['torch']}; GPU: {gpu}"
    )


def started() -> str:
    """The local time a run started, as the reports record it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---------------------------------------------------------------------------------------------- output


def write_plot(path: Path | str, draw: Callable[[Any], Any]) -> dict[str, Any]:
    """``draw(pyplot)`` returns a figure, saved as a PNG at ``path`` (atomically); or skipped with the reason."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers and CI
        import matplotlib.pyplot as plt
    except ImportError:
        return skipped(f"matplotlib is not installed ({install_command('bench')})")
    fig = draw(plt)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return {"status": "written", "file": str(path)}


def finish(report: dict[str, Any], text: str | None, json_path: Path | str | None) -> None:
    """Print the text report, then write the JSON (atomically) where asked."""
    if text is not None:
        print(text)
    if json_path:
        atomic.write_json(json_path, report)
        print(f"wrote {json_path}", file=sys.stderr)
