"""Every option combination of SCAN: the exact batched head equals the original per-caption algorithm.

Seeded random models over cross_attn x agg_func x raw_feature_norm x bi/uni GRU x 1/2 layers x
imgnorm/txtnorm x basic/weight_norm encoders; random caption lengths including 1; galleries of one
and of several images. Tolerance 2e-5 absolute (+2e-5 relative, for Sum over long captions): both are
float32 with different summation orders; errors seen are ~1e-7.
"""

from __future__ import annotations

import pytest
import torch

from export.model import SCAN, batched_sims, slow_sims
from runtime.config import AGG_FUNCS, CROSS_ATTNS, RAW_FEATURE_NORMS
from tests.helpers import ENCODER_OPTIONS, option_config


@pytest.mark.parametrize("cross_attn", CROSS_ATTNS)
@pytest.mark.parametrize("agg_func", AGG_FUNCS)
@pytest.mark.parametrize("norm", RAW_FEATURE_NORMS)
def test_batched_equals_slow_for_every_option(cross_attn, agg_func, norm):
    for case in range(len(ENCODER_OPTIONS)):
        cfg = option_config(cross_attn, agg_func, norm, case)
        gen = torch.Generator().manual_seed(case)
        torch.manual_seed(case)
        model = SCAN(cfg).eval()
        lengths = torch.tensor([1, 7, 3, 1, 5][: 2 + case % 4])
        lengths[0] = 7 if case % 2 else lengths[0]
        ids = torch.randint(0, 20, (len(lengths), int(lengths.max())), generator=gen)
        for n_images in (1, 4):
            regions = torch.randn(n_images, 6, 10, generator=gen)
            regions[:, -1] = 0  # all-zero regions exist in real data
            with torch.no_grad():
                images = model.img_enc(regions)
                captions = model.txt_enc(ids, lengths)
            slow = slow_sims(images, captions, lengths, cfg)
            fast = batched_sims(images, None, captions, lengths, None, cfg)
            assert fast.shape == (n_images, len(lengths))
            torch.testing.assert_close(
                fast, slow, atol=2e-5, rtol=2e-5, msg=lambda m, cfg=cfg, n=n_images: f"{cfg} with {n} image(s): {m}"
            )
