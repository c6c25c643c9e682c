"""What a latency run measures and how big: sizes, repeats and time budgets (the full run and ``--quick``)."""

from __future__ import annotations

from dataclasses import dataclass, replace

SCHEMA = "scan-runtime-bench-latency/1"


@dataclass(frozen=True)
class Plan:
    """Sizes, repeats and budgets of one run (full or quick)."""

    embed_size: int
    img_dim: int
    regions: int
    word_dim: int
    vocab_size: int
    # head throughput: N images x Q captions of head_len ids; the slow loop runs on a slice
    head_images: int
    head_captions: int
    head_len: int
    slow_images: int
    slow_captions: int
    head_warmup: int
    head_min_repeats: int
    head_max_repeats: int
    head_budget_s: float
    # query latency
    image_galleries: tuple[int, ...]
    caption_galleries: tuple[int, ...]
    batches: tuple[int, ...]
    k: int
    cell_warmup: int
    cell_min_repeats: int
    cell_max_repeats: int
    cell_budget_s: float
    cell_cap_s: float
    # gallery build
    build_images: int
    # the whole run; latency cells that would overrun it are skipped
    run_budget_s: float

    def head_timing(self) -> dict[str, float]:
        """``time_calls`` keyword arguments for the head contenders."""
        return dict(
            warmup=self.head_warmup,
            min_repeats=self.head_min_repeats,
            max_repeats=self.head_max_repeats,
            budget_s=self.head_budget_s,
        )


FULL = Plan(
    embed_size=1024,
    img_dim=2048,
    regions=36,
    word_dim=300,
    vocab_size=10000,
    head_images=256,
    head_captions=32,
    head_len=14,
    slow_images=64,
    slow_captions=8,
    head_warmup=2,
    head_min_repeats=5,
    head_max_repeats=60,
    head_budget_s=3.0,
    image_galleries=(1000, 10000, 50000),
    caption_galleries=(5000, 50000),
    batches=(1, 8, 32, 128),
    k=10,
    cell_warmup=1,
    cell_min_repeats=3,
    cell_max_repeats=200,
    cell_budget_s=5.0,
    cell_cap_s=10.0,
    build_images=512,
    run_budget_s=570.0,
)
# The same run scaled down to seconds (CI, --quick): only what differs from FULL.
QUICK = replace(
    FULL,
    embed_size=64,
    img_dim=128,
    word_dim=32,
    vocab_size=200,
    head_images=32,
    head_captions=8,
    slow_images=8,
    slow_captions=4,
    head_warmup=1,
    head_min_repeats=3,
    head_max_repeats=5,
    head_budget_s=0.05,
    image_galleries=(100, 200),
    caption_galleries=(100, 200),
    batches=(1, 8),
    k=5,
    cell_max_repeats=10,
    cell_budget_s=0.05,
    cell_cap_s=5.0,
    build_images=32,
    run_budget_s=120.0,
)
