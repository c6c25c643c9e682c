"""Describe the machine a benchmark ran on, so its numbers can be read (and compared) later.

Everything here is best effort: a missing ``/proc/cpuinfo``, library or GPU is recorded as such,
never an error. PyTorch is imported only if it is installed (the runtime itself never needs it).
"""

from __future__ import annotations

import importlib
import logging
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    # The affinity mask, not os.cpu_count(): containers often see more cores than they may use.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:  # not installed, or broken: either way there is no version to report
        return None


def blas() -> str | None:
    try:
        import numpy as np

        info = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{info.get('name')} {info.get('version')}"
    except Exception:  # older numpy without mode="dicts"
        return None


def optional_torch():
    """The ``torch`` module, or None where it is not installed (the runtime never needs it)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def mem_available() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def gpus() -> list[dict[str, Any]]:
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


def ort_providers() -> list[str]:
    try:
        import onnxruntime as ort

        return list(ort.get_available_providers())
    except ImportError:
        return []


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def describe() -> dict[str, Any]:
    load = load_average()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = None
    return {
        "cpu_model": cpu_model(),
        "cores": usable_cores(),
        "logical_cpus": os.cpu_count(),
        "memory_bytes": mem,
        # Recorded because the benchmark may share the machine: a load above the core count means
        # the timings are slower than the machine can do.
        "load_average_at_start": load,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": _version("numpy"),
        "blas": blas(),
        "onnxruntime": _version("onnxruntime"),
        "onnxruntime_providers": ort_providers(),
        "torch": _version("torch"),
        "onnx": _version("onnx"),
        "gpus": gpus(),
    }


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def announce() -> dict[str, Any]:
    """``describe()``, after its summary line on stderr (benchmarks print it before measuring)."""
    info = describe()
    print(f"machine: {summary_line(info)}", file=sys.stderr)
    return info


def summary_line(m: dict[str, Any]) -> str:
    gpu = ", ".join(g["name"] for g in m.get("gpus") or []) or "none"
    return (
        f"{m['cpu_model']}, {m['cores']} cores, load {m['load_average_at_start']}; numpy {m['numpy']} "
        f"({m['blas']}), onnxruntime {m['onnxruntime']}, torch {m['torch']}; GPU: {gpu}"
    )
