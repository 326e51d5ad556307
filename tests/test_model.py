"""Aligner network: shapes, RoPE, zero-init, null condition, masking, presets."""

from __future__ import annotations

import pytest
import torch

from gap3d.config import AlignerConfig
from gap3d.layout import TokenLayout
from gap3d.trainer.layers import apply_rope, rope_2d_tables
from gap3d.trainer.model import (
    ALIGNER_PRESETS,
    AlignerNet,
    count_parameters,
    resolve_aligner_size,
)

LAYOUTS = [
    TokenLayout(1, 4, 3, 3, 16),  # DINOv2-reg-like
    TokenLayout(1, 0, 2, 5, 12),  # demo-like (pooled token, no registers), non-square
    TokenLayout(0, 2, 4, 1, 8),  # no CLS, a single grid column
]


def tiny(depth: int = 1, n_queries: int = 4) -> AlignerConfig:
    return AlignerConfig(preset="tiny", n_queries=n_queries, resampler_depth=depth)


def randomize_zero_init(net: torch.nn.Module, seed: int = 0) -> None:
    """Give the zero-initialised adaLN/head parameters random values (so outputs are non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def batch(layout: TokenLayout, b: int = 3, length: int = 5, dim: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, layout.n_tokens, layout.channels, generator=g)
    t = torch.rand(b, generator=g)
    cond = torch.randn(b, length, dim, generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[:, -2:] = False  # padding
    return x, t, cond, mask


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("depth", [0, 2])
def test_shapes_and_zero_init(layout: TokenLayout, depth: int) -> None:
    net = AlignerNet(layout, 24, tiny(depth))
    x, t, cond, mask = batch(layout)
    v = net(x, t, cond, mask)
    assert v.shape == x.shape
    assert torch.count_nonzero(v) == 0  # zero-init output head (DiT)
    randomize_zero_init(net)
    v = net(x, t, cond, mask, torch.tensor([True, False, True]))
    assert v.shape == x.shape and torch.isfinite(v).all() and v.abs().sum() > 0


def test_bad_shapes_raise() -> None:
    layout = LAYOUTS[0]
    net = AlignerNet(layout, 24, tiny())
    x, t, cond, mask = batch(layout)
    with pytest.raises(ValueError, match="x_t must be"):
        net(x[:, 1:], t, cond, mask)
    with pytest.raises(ValueError, match="prompt hidden states"):
        net(x, t, cond[..., :10], mask)


def test_rope_is_relative_rotation_and_identity_on_prefix() -> None:
    n_prefix, gh, gw, hd = 2, 4, 5, 16
    cos, sin = rope_2d_tables(n_prefix, gh, gw, hd)
    assert cos.shape == (n_prefix + gh * gw, hd // 2)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(n_prefix + gh * gw, hd, generator=g)
    rq = apply_rope(q, cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))  # a rotation
    torch.testing.assert_close(rq[:n_prefix], q[:n_prefix])  # CLS / registers untouched
    assert not torch.allclose(rq[n_prefix + 1 :], q[n_prefix + 1 :])

    def score(a: int, b: int, qv: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """<R(pos a) q, R(pos b) k> with every token carrying the same q / k vectors."""
        rq = apply_rope(qv.expand(len(cos), hd), cos, sin)
        rk = apply_rope(kv.expand(len(cos), hd), cos, sin)
        return rq[n_prefix + a] @ rk[n_prefix + b]

    qv, kv = torch.randn(hd, generator=g), torch.randn(hd, generator=g)
    idx = lambda r, c: r * gw + c  # noqa: E731 - row-major grid index
    # Same (row, col) offset at different absolute positions -> same logit.
    s1 = score(idx(0, 0), idx(1, 2), qv, kv)
    s2 = score(idx(2, 1), idx(3, 3), qv, kv)
    s3 = score(idx(0, 0), idx(2, 1), qv, kv)  # another offset
    torch.testing.assert_close(s1, s2)
    assert not torch.isclose(s1, s3)


def test_rope_needs_head_dim_divisible_by_4() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_2d_tables(1, 2, 2, 6)
    with pytest.raises(ValueError, match="divisible by 4"):
        resolve_aligner_size(AlignerConfig(preset="tiny", width=48, heads=8))


@pytest.mark.parametrize("depth", [0, 1])
def test_drop_cond_gives_the_null_output_regardless_of_cond(depth: int) -> None:
    layout = LAYOUTS[0]
    net = AlignerNet(layout, 24, tiny(depth))
    randomize_zero_init(net)
    x, t, cond, mask = batch(layout, seed=1)
    _, _, cond2, _ = batch(layout, seed=2)
    mask2 = torch.zeros_like(mask)
    mask2[:, :1] = True
    drop = torch.tensor([True, False, True])
    v1 = net(x, t, cond, mask, drop)
    v2 = net(x, t, cond2, mask2, drop)
    torch.testing.assert_close(v1[drop], v2[drop], rtol=0, atol=1e-6)
    assert not torch.allclose(v1[~drop], v2[~drop])  # conditioned samples do see the prompt


@pytest.mark.parametrize("depth", [0, 2])
def test_fully_masked_rows_do_not_nan(depth: int) -> None:
    layout = LAYOUTS[1]
    net = AlignerNet(layout, 24, tiny(depth))
    randomize_zero_init(net)
    x, t, cond, mask = batch(layout)
    mask[0] = False  # an empty prompt
    v = net(x, t, cond, mask)
    assert torch.isfinite(v).all()
    v.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    # An empty prompt means "no context": its padding content must not matter.
    cond_b = cond.clone()
    cond_b[0] = torch.randn_like(cond_b[0])
    torch.testing.assert_close(net(x, t, cond_b, mask)[0], v[0].detach())


def test_gradient_checkpointing_matches() -> None:
    layout = LAYOUTS[0]
    net = AlignerNet(layout, 24, tiny())
    randomize_zero_init(net)
    x, t, cond, mask = batch(layout)
    ref = net(x, t, cond, mask)
    net.grad_checkpointing = True
    torch.testing.assert_close(net(x, t, cond, mask), ref)


def test_resolve_overrides() -> None:
    sizes = resolve_aligner_size(AlignerConfig(preset="small", depth=3, mlp_ratio=2.0))
    assert sizes == dict(
        width=ALIGNER_PRESETS["small"]["width"],
        depth=3,
        heads=ALIGNER_PRESETS["small"]["heads"],
        mlp_ratio=2.0,
    )


def test_preset_parameter_counts() -> None:
    counts = {name: count_parameters(name) for name in ALIGNER_PRESETS}
    # DINOv2-L-reg tokens (1374 x 1024), 2048-d prompt latents, 64 queries, resampler depth 2.
    print("aligner parameters:", {k: f"{v / 1e6:.1f}M" for k, v in counts.items()})
    assert counts["tiny"] < 2e6
    assert 35e6 < counts["small"] < 75e6
    assert 220e6 < counts["base"] < 400e6
    assert abs(counts["paper"] / 1.3e9 - 1) < 0.15
    # The meta-device count equals a real model's count (checked on the tiny preset).
    layout = LAYOUTS[0]
    real = sum(p.numel() for p in AlignerNet(layout, 24, tiny(2)).parameters())
    assert count_parameters(tiny(2), layout, 24) == real
