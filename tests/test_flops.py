"""The analytic FLOP count of the aligner equals what torch's FLOP counter sees."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from gap3d.config import AlignerConfig
from gap3d.layout import TokenLayout
from gap3d.trainer.flops import aligner_flops
from gap3d.trainer.model import AlignerNet, resolve_aligner_size


@pytest.mark.parametrize(
    "layout, depth",
    [(TokenLayout(1, 0, 7, 7, 96), 1), (TokenLayout(1, 4, 4, 4, 64), 0)],
)
def test_analytic_flops_match_the_flop_counter(layout: TokenLayout, depth: int) -> None:
    cfg = AlignerConfig(preset="tiny", n_queries=6, resampler_depth=depth, prediction="x0")
    torch.manual_seed(0)
    net = AlignerNet(layout, 24, cfg)
    b, length = 3, 9
    x = torch.randn(b, layout.n_tokens, layout.channels)
    cond = torch.randn(b, length, 24)
    mask = torch.ones(b, length, dtype=torch.bool)
    t = torch.rand(b)
    want = aligner_flops(layout, length, 24, resolve_aligner_size(cfg), 6, depth)
    # the math backend spells attention out as matmuls, which the counter sees
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        out = net(x, t, cond, mask, raw=True)
    fwd = fc.get_total_flops()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        out = net(x, t, cond, mask, raw=True)
        out.square().mean().backward()
    total = fc.get_total_flops()
    assert fwd == pytest.approx(b * want.forward, rel=1e-6)
    assert total - fwd == pytest.approx(b * want.backward, rel=1e-6)
    assert want.per_step(b) == b * (want.forward + want.backward)
