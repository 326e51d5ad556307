"""Sampler and memory details (issue 10, item 6): the last Euler step of an x0-net lands on its
prediction, validation swaps the EMA weights once per run, and gradient checkpointing gives the
same gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_datamodule import make_synthetic_store, tiny_cfg

from gap3d.config import AlignerConfig
from gap3d.layout import TokenLayout
from gap3d.trainer.ema import EMA
from gap3d.trainer.flow import FlowMatching
from gap3d.trainer.model import X0_T_MIN, AlignerNet

LAYOUT = TokenLayout(1, 2, 3, 3, 8)


class FixedX0Net(torch.nn.Module):
    """An x0-net whose head always predicts ``target`` (conditional) or ``null`` (dropped),
    converted to a velocity exactly like AlignerNet does (clamped t)."""

    prediction = "x0"

    def __init__(self, target: torch.Tensor, null: torch.Tensor) -> None:
        super().__init__()
        self.target, self.null = target, null

    def forward(self, x_t, t, cond, mask, drop):  # noqa: ANN001
        reps = x_t.shape[0] // self.target.shape[0]  # CFG runs [conditional, null] in one batch
        target, null = self.target.repeat(reps, 1, 1), self.null.repeat(reps, 1, 1)
        x0 = torch.where(drop[:, None, None], null, target)
        return (x_t - x0) / t.clamp_min(X0_T_MIN)[:, None, None]


@pytest.mark.parametrize("steps", [1, 7, 30, 50])
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_last_euler_step_of_an_x0_net_returns_its_prediction(steps: int, cfg_scale: float) -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, LAYOUT.n_tokens, LAYOUT.channels, generator=g)
    null = torch.randn(2, LAYOUT.n_tokens, LAYOUT.channels, generator=g)
    flow = FlowMatching(FixedX0Net(target, null), LAYOUT)
    cond, mask = torch.randn(2, 4, 6), torch.ones(2, 4, dtype=torch.bool)
    out = flow.sample(cond, mask, steps=steps, cfg_scale=cfg_scale, seed=3)
    # the guided prediction: null + s (target - null), whatever the step count
    torch.testing.assert_close(out, null + cfg_scale * (target - null), rtol=1e-4, atol=1e-4)


def test_one_step_of_the_real_x0_aligner_is_its_head_output() -> None:
    torch.manual_seed(0)
    cfg = AlignerConfig(preset="tiny", n_queries=4, resampler_depth=1, prediction="x0")
    net = AlignerNet(LAYOUT, 6, cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # a non-zero head
    cond, mask = torch.randn(2, 4, 6), torch.ones(2, 4, dtype=torch.bool)
    x1 = torch.randn(2, LAYOUT.n_tokens, LAYOUT.channels)
    heads: list[torch.Tensor] = []
    net.head.register_forward_hook(lambda m, i, o: heads.append(o.detach()))
    out = FlowMatching(net, LAYOUT).sample(cond, mask, steps=40, cfg_scale=1.0, x1=x1)
    torch.testing.assert_close(out, heads[-1], rtol=1e-4, atol=1e-5)


def test_v_net_sampling_is_plain_euler() -> None:
    class Lin(torch.nn.Module):
        def forward(self, x_t, t, cond, mask, drop):  # noqa: ANN001
            return 0.5 * x_t + t[:, None, None]

    flow = FlowMatching(Lin(), LAYOUT)
    cond, mask = torch.randn(1, 4, 6), torch.ones(1, 4, dtype=torch.bool)
    x1 = torch.randn(1, LAYOUT.n_tokens, LAYOUT.channels)
    x, ts = x1.clone(), torch.linspace(1.0, 0.0, 4)
    for i in range(3):
        x = x + (ts[i + 1] - ts[i]) * (0.5 * x + ts[i])
    torch.testing.assert_close(flow.sample(cond, mask, steps=3, cfg_scale=1.0, x1=x1), x)


def test_ema_swap_in_out_restores_and_refuses_updates() -> None:
    net = torch.nn.Linear(3, 3)
    ema = EMA(net, 0.5)
    with torch.no_grad():
        net.weight.add_(1.0)
    live = net.weight.detach().clone()
    ema.swap_in(net)
    torch.testing.assert_close(net.weight, ema.shadow["weight"])
    with pytest.raises(RuntimeError, match="swapped"):
        ema.update(net)
    with pytest.raises(RuntimeError, match="already swapped"):
        ema.swap_in(net)
    assert ema.swap_out(net) and not ema.swap_out(net)
    torch.testing.assert_close(net.weight, live)


def test_validation_swaps_the_ema_weights_once_per_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gap3d.trainer.train import train

    make_synthetic_store(tmp_path / "s.zarr", n_shards=2, per_shard=16)
    cfg = tiny_cfg(
        tmp_path,
        tmp_path / "s.zarr",
        "train.max_steps=4",
        "train.val_every_n_steps=2",
        "train.checkpoint_every_n_steps=2",
        "train.val_samples=12",  # 3 validation batches of 4 per run
        "train.batch_size=4",
        "train.warmup_steps=1",
        "eval.steps=2",
    )
    copies: list[int] = []
    real_copy_to = EMA.copy_to
    monkeypatch.setattr(EMA, "copy_to", lambda self, m: (copies.append(1), real_copy_to(self, m)))
    result = train(cfg)
    assert result["step"] == 4
    # 2 validation runs x 3 batches: one swap per run (plus the export's own copy)
    n_val_runs = 2
    assert len(copies) == n_val_runs + 1, f"EMA copied into the model {len(copies)} times"


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        cfg = AlignerConfig(
            preset="tiny", n_queries=4, resampler_depth=1, grad_checkpointing=checkpointing
        )
        net = AlignerNet(LAYOUT, 6, cfg).train()
        assert net.grad_checkpointing is checkpointing
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        g = torch.Generator().manual_seed(1)
        x0 = torch.randn(3, LAYOUT.n_tokens, LAYOUT.channels, generator=g)
        cond, mask = torch.randn(3, 5, 6, generator=g), torch.ones(3, 5, dtype=torch.bool)
        calls = [0]
        for block in net.blocks:
            block.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        loss, _ = FlowMatching(net, LAYOUT).loss(x0, cond, mask, generator=g)
        loss.backward()
        # checkpointed blocks run their forward again during backward
        assert calls[0] == len(net.blocks) * (2 if checkpointing else 1)
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and plain
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_grad_checkpointing_is_a_config_key_that_resume_ignores() -> None:
    from gap3d.config import load_config
    from gap3d.trainer.module import resume_fingerprint

    on = load_config("tiny", ["aligner.grad_checkpointing=true"])
    off = load_config("tiny")
    assert on.aligner.grad_checkpointing and not off.aligner.grad_checkpointing
    assert resume_fingerprint(on.to_dict()) == resume_fingerprint(off.to_dict())
