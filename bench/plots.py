"""PNG plots of a latency report: latency vs gallery size, throughput vs batch size, head throughput."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench.head import CONTENDERS
from runtime import atomic


def write_plots(report: dict[str, Any], folder: Path) -> dict[str, Any]:
    """PNG plots; returns {"status", "files"} or why none were drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers and CI
        import matplotlib.pyplot as plt
    except ImportError:
        return {
            "status": "skipped",
            "reason": "matplotlib is not installed (pip install 'scan-runtime[bench]')",
            "files": [],
        }
    folder.mkdir(parents=True, exist_ok=True)
    lat = report["latency"]
    files = []
    directions = (("text_to_image", "text -> image"), ("image_to_text", "image -> text"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (key, title) in zip(axes, directions):
        for batch in report["plan"]["batches"]:
            pts = sorted(
                (c["gallery_size"], c["p50_ms"]) for c in lat[key] if c["batch"] == batch and c["status"] == "measured"
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"batch {batch}")
        ax.set(xscale="log", yscale="log", xlabel="gallery size", ylabel="p50 latency per batch (ms)", title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"SCAN query latency ({lat['model']}), {report['machine']['cpu_model']}", fontsize=9)
    fig.tight_layout()
    files.append(_save(fig, folder / "latency_vs_gallery.png", plt))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (key, title) in zip(axes, directions):
        for size in sorted({c["gallery_size"] for c in lat[key]}):
            pts = sorted(
                (c["batch"], c["queries_per_s"])
                for c in lat[key]
                if c["gallery_size"] == size and c["status"] == "measured"
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"gallery {size:,}")
        ax.set(xscale="log", yscale="log", xlabel="query batch size", ylabel="queries/s", title=title)
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    files.append(_save(fig, folder / "throughput_vs_batch.png", plt))

    fig, ax = plt.subplots(figsize=(8, 4.2))
    modes = list(report["head"]["modes"])
    width = 0.8 / len(CONTENDERS)
    for i, name in enumerate(CONTENDERS):
        vals = [report["head"]["modes"][m].get("contenders", {}).get(name, {}).get("pairs_per_s") or 0 for m in modes]
        ax.bar(np.arange(len(modes)) + i * width, vals, width, label=name)
    for j, m in enumerate(modes):
        ceiling = report["head"]["modes"][m].get("ceiling_pairs_per_s")
        if ceiling:
            ax.hlines(
                ceiling,
                j - width / 2,
                j + 0.8,
                colors="k",
                linestyles="--",
                label="CPU GEMM ceiling" if j == 0 else None,
            )
    ax.set_xticks(np.arange(len(modes)) + 0.4 - width / 2, modes)
    ax.set(yscale="log", ylabel="pairs/s", title="similarity head throughput")
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(_save(fig, folder / "head_throughput.png", plt))
    return {"status": "written", "files": files}


def _save(fig, path: Path, plt) -> str:
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return str(path)
