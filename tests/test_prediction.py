"""x0-parameterised velocity: the head predicts clean tokens, the net still returns v."""

from __future__ import annotations

import torch

from gap3d.config import AlignerConfig
from gap3d.layout import TokenLayout
from gap3d.trainer.model import X0_T_MIN, AlignerNet

LAYOUT = TokenLayout(1, 0, 3, 3, 48)


def _net(prediction: str) -> AlignerNet:
    torch.manual_seed(0)
    cfg = AlignerConfig(preset="tiny", n_queries=4, resampler_depth=1, prediction=prediction)
    return AlignerNet(LAYOUT, 16, cfg).eval()


def test_x0_head_converts_to_the_rectified_flow_velocity() -> None:
    net = _net("x0")
    b = 3
    x0 = torch.randn(b, LAYOUT.n_tokens, LAYOUT.channels)
    eps = torch.randn_like(x0)
    t = torch.tensor([1.0, 0.5, 0.2])
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    cond, mask = torch.randn(b, 5, 16), torch.ones(b, 5, dtype=torch.bool)
    # a head that outputs the true x0 must give exactly the flow target eps - x0
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()
    net.head.register_forward_hook(lambda m, i, o: o + x0)
    v = net(x_t, t, cond, mask)
    torch.testing.assert_close(v, eps - x0, rtol=1e-4, atol=1e-4)


def test_x0_zero_head_means_v_is_x_t_over_t_and_small_t_is_clamped() -> None:
    net = _net("x0")
    x_t = torch.randn(2, LAYOUT.n_tokens, LAYOUT.channels)
    t = torch.tensor([0.5, 0.0])
    cond, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        v = net(x_t, t, cond, mask)
    torch.testing.assert_close(v[0], x_t[0] / 0.5)
    torch.testing.assert_close(v[1], x_t[1] / X0_T_MIN)
    assert torch.isfinite(v).all()


def test_v_head_is_unchanged() -> None:
    net = _net("v")
    x_t = torch.randn(2, LAYOUT.n_tokens, LAYOUT.channels)
    with torch.no_grad():
        v = net(x_t, torch.rand(2), torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool))
    assert torch.count_nonzero(v) == 0  # zero-initialised head, as in DiT


def test_flow_loss_of_an_x0_net_is_the_clean_token_mse() -> None:
    from gap3d.config import LossWeights
    from gap3d.trainer.flow import FlowMatching

    net = _net("x0")
    flow = FlowMatching(net, LAYOUT, LossWeights(), "uniform", 0.0)
    x0 = torch.randn(4, LAYOUT.n_tokens, LAYOUT.channels)
    cond, mask = torch.randn(4, 5, 16), torch.ones(4, 5, dtype=torch.bool)
    # zero-initialised head: x0_hat = 0, so the loss is the mean square of x0 (where t >= t_min)
    # a seed whose times all lie above the clamp, where the identity is exact
    seed = next(
        s
        for s in range(100)
        if (flow.sample_t(4, torch.Generator().manual_seed(s), x0.device) >= X0_T_MIN).all()
    )
    loss, parts = flow.loss(x0, cond, mask, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(parts["patch"], x0[:, 1:].square().mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(parts["cls"], x0[:, :1].square().mean(), rtol=1e-4, atol=1e-5)


def test_x0_loss_on_the_raw_head_equals_the_t2_weighted_velocity_loss() -> None:
    """The loss computed from the head's clean-token output is the t^2-weighted v-MSE it
    replaces, small times (t < X0_T_MIN, the clamp) included."""
    from gap3d.config import LossWeights
    from gap3d.trainer.flow import FlowMatching, stream_mse

    net = _net("x0")
    torch.nn.init.normal_(net.head.weight, std=0.1)
    flow = FlowMatching(net, LAYOUT, LossWeights(), "uniform", 0.0)
    x0 = torch.randn(64, LAYOUT.n_tokens, LAYOUT.channels)
    cond, mask = torch.randn(64, 5, 16), torch.ones(64, 5, dtype=torch.bool)
    g = torch.Generator().manual_seed(3)
    loss, parts = flow.loss(x0, cond, mask, g)
    # the same draws, the old way
    g = torch.Generator().manual_seed(3)
    t = flow.sample_t(64, g, x0.device)
    assert (t < X0_T_MIN).any()  # the clamp is exercised
    eps = torch.randn(x0.shape, generator=g)
    drop = torch.rand(64, generator=g) < 0.0
    tb = t[:, None, None]
    x_t = (1 - tb) * x0 + tb * eps
    with torch.no_grad():
        v = net(x_t, t, cond, mask, drop)
    err = (v - (eps - x0)).square() * t.clamp_min(X0_T_MIN).square()[:, None, None]
    old = stream_mse(err, LAYOUT)
    for k in ("patch", "cls"):
        torch.testing.assert_close(parts[k], old[k], rtol=1e-4, atol=1e-6)
