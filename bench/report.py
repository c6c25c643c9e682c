"""The latency report for reading: every figure as text, and measured vs target (informational, never failing)."""

from __future__ import annotations

from typing import Any

from bench import machine

TARGETS = {"head_speedup": 10.0, "head_fraction_of_ceiling": 0.8, "text_1k_p50_ms": 20.0, "text_50k_p50_ms": 1000.0}


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Measured vs target, for reading; nothing here fails a run."""
    rows = []
    for mode, h in report["head"]["modes"].items():
        c = h["contenders"]["ort_cpu"]
        rows.append(
            {
                "name": f"head_speedup_vs_slow_{mode}",
                "op": ">=",
                "target": TARGETS["head_speedup"],
                "what": f"ONNX Runtime CPU head vs the original loop ({mode})",
                "measured": c.get("speedup_vs_slow"),
                "unit": "x",
            }
        )
        rows.append(
            {
                "name": f"head_fraction_of_ceiling_{mode}",
                "op": ">=",
                "target": TARGETS["head_fraction_of_ceiling"],
                "what": f"ONNX Runtime CPU head vs GEMM ceiling ({mode})",
                "measured": c.get("fraction_of_ceiling"),
                "unit": "fraction",
            }
        )
    cells = {(c["gallery_size"], c["batch"]): c for c in report["latency"]["text_to_image"]}
    for size, key, label in ((1000, "text_1k_p50_ms", "1K"), (50000, "text_50k_p50_ms", "50K")):
        c = cells.get((size, 1))
        row = {
            "name": f"text_query_{label.lower()}_p50_ms",
            "what": f"one text query vs {label} images, p50",
            "op": "<=",
            "target": TARGETS[key],
            "unit": "ms",
            "measured": None,
        }
        if c is None:
            row["note"] = f"no {label}-image gallery in this run" + (" (--quick)" if report["quick"] else "")
        elif c["status"] != "measured":
            row["note"] = f"skipped: {c['reason']}"
        else:
            row["measured"] = c["p50_ms"]
        rows.append(row)
    for row in rows:
        m = row["measured"]
        row["met"] = None if m is None else (m >= row["target"] if row["op"] == ">=" else m <= row["target"])
    return rows


def _fmt(x: Any, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"SCAN runtime benchmark{' (--quick)' if report['quick'] else ''}: seed {report['seed']}, "
        f"threads {report['threads'] or 'all'}, {report['wall_seconds']:.0f} s",
        "machine: " + machine.summary_line(report["machine"]),
        f"sizes: embed {report['plan']['embed_size']}, {report['plan']['regions']} regions x "
        f"{report['plan']['img_dim']}, word_dim {report['plan']['word_dim']}, "
        f"vocab {report['plan']['vocab_size']}",
    ]
    for mode, ex in report["export"].items():
        how = "cached" if ex["cached"] else f"exported in {ex['export_seconds']:.0f} s"
        lines.append(f"model {mode}: {how} ({ex['manifest']})")
    for mode, h in report["head"]["modes"].items():
        g = report["head"]["gemm_ceiling"]
        m, k, n = g["shape"]
        gem = ", ".join(
            f"{b} {g[b]['gflops']:.1f} GFLOP/s" for b in ("numpy", "onnxruntime") if g[b]["status"] == "measured"
        )
        lines += [
            "",
            f"head {mode} ({h['config']['agg_func']}, lambda_softmax {h['config']['lambda_softmax']:g}): "
            f"GEMM ({m} x {k}) @ ({k} x {n}): {gem}; ceiling {h['ceiling_pairs_per_s']:,.0f} pairs/s",
            f"  {'contender':<18} {'pairs/s':>12} {'p10..p90':>21} {'x slow':>8} {'of ceiling':>10} "
            f"{'GFLOP/s':>8}  shape N x Q x L",
        ]
        for name, c in h["contenders"].items():
            if c["status"] != "measured":
                lines.append(f"  {name:<18} {c['status']}: {c['reason']}")
                continue
            frac = c.get("fraction_of_ceiling")
            lines.append(
                f"  {name:<18} {c['pairs_per_s']:>12,.0f} "
                f"{c['pairs_per_s_p10']:>10,.0f}..{c['pairs_per_s_p90']:<10,.0f}"
                f" {_fmt(c.get('speedup_vs_slow'), '.1f'):>8} {'-' if frac is None else f'{frac:.0%}':>10} "
                f"{c['gflops']:>8.1f}  {' x '.join(map(str, c['shape']))}"
            )
    lat = report["latency"]
    lines += [
        "",
        f"query latency ({lat['model']} model, k={lat['k']}, image_block {lat['searcher']['image_block']}, "
        f"caption_block {lat['searcher']['caption_block']}, query_batch {lat['searcher']['query_batch']})",
        f"  {'direction':<14} {'gallery':>8} {'batch':>5} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} "
        f"{'queries/s':>10} {'n':>4}",
    ]
    for c in lat["text_to_image"] + lat["image_to_text"]:
        head = f"  {c['direction']:<14} {c['gallery_size']:>8,} {c['batch']:>5}"
        if c["status"] != "measured":
            lines.append(f"{head}   skipped: {c['reason']}")
        else:
            lines.append(
                f"{head} {c['p50_ms']:>9.1f} {c['p95_ms']:>9.1f} {c['p99_ms']:>9.1f} "
                f"{c['queries_per_s']:>10.1f} {c['n']:>4}"
            )
    b = report["gallery_build"]
    lines += [
        "",
        f"gallery build ({b['images']} images through build_image_gallery): "
        + "; ".join(
            f"{dt} {b[dt]['images_per_s']:,.0f} images/s, {b[dt]['bytes_per_image'] / 1024:,.1f} KiB/image"
            for dt in ("float32", "float16")
        ),
        f"peak resident memory: {report['memory']['peak_rss_bytes'] / 2**20:,.0f} MiB",
        "",
        "targets (measured vs target; informational):",
    ]
    for t in report["targets"]:
        met = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        spec = ".1%" if t["unit"] == "fraction" else ".1f"
        lines.append(
            f"  {t['what']:<52} {t['op']} {format(t['target'], spec):>8}: measured "
            f"{_fmt(t['measured'], spec):>8}  {met}{'  (' + t['note'] + ')' if t.get('note') else ''}"
        )
    return "\n".join(lines)
