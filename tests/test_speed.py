"""What the hardware offers the step: fused AdamW, measured bf16 speed, bf16 agreement."""

from __future__ import annotations

import json

import torch

from gap3d.trainer import speed
from gap3d.trainer.train import resolve_precision


def test_adamw_is_fused_where_supported():
    opt = speed.make_adamw(torch.nn.Linear(4, 4).parameters(), 1e-3, 0.0)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults.get("fused") or opt.defaults.get("foreach")


def test_matmul_rates_are_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("GAP3D_CACHE", str(tmp_path))
    a = speed.cpu_matmul_rates(threads=1, n=64, budget_s=0.01)
    assert a["fp32_gflops"] > 0 and a["bf16_gflops"] > 0 and a["threads"] == 1
    assert a["bf16_speedup"] == a["bf16_gflops"] / a["fp32_gflops"]
    cached = json.loads((tmp_path / "cpu_rates.json").read_text())
    assert list(cached.values())[0]["fp32_gflops"] == a["fp32_gflops"]
    monkeypatch.setattr(speed, "_rate", lambda *a, **k: 1 / 0)  # must not measure again
    assert speed.cpu_matmul_rates(threads=1, n=64, budget_s=0.01) == a


def _fake_rates(monkeypatch, speedup: float) -> None:
    rates = {
        "fp32_gflops": 100.0,
        "bf16_gflops": 100.0 * speedup,
        "bf16_speedup": speedup,
        "threads": 2,
        "capability": "TEST",
    }
    monkeypatch.setattr(speed, "cpu_matmul_rates", lambda threads=None: rates)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _tiny_step():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    x, y = torch.randn(32, 64), torch.randn(32, 8)

    def step(bf16: bool):
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = (net(x).float() - y).square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters()]

    return step


def test_auto_stays_fp32_where_bf16_is_not_faster(monkeypatch):
    _fake_rates(monkeypatch, 0.2)
    prec, why = speed.resolve_precision("auto", "cpu", _tiny_step())
    assert prec == "32-true" and "not faster" in why
    assert resolve_precision("auto", "cpu") == "32-true"


def test_auto_picks_bf16_where_faster_and_in_agreement(monkeypatch):
    _fake_rates(monkeypatch, 4.0)
    prec, why = speed.resolve_precision("auto", "cpu", _tiny_step())
    assert prec == "bf16-mixed" and "agrees" in why


def test_auto_refuses_bf16_that_disagrees(monkeypatch):
    _fake_rates(monkeypatch, 4.0)
    good = _tiny_step()

    def bad(bf16: bool):
        loss, grads = good(bf16)
        return (loss * 1.5, [-g for g in grads]) if bf16 else (loss, grads)

    prec, why = speed.resolve_precision("auto", "cpu", bad)
    assert prec == "32-true" and "disagrees" in why


def test_explicit_precision_is_kept(monkeypatch):
    _fake_rates(monkeypatch, 4.0)
    assert speed.resolve_precision("32-true", "cpu")[0] == "32-true"
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"


def test_bf16_agreement_of_the_real_aligner_step():
    """On this CPU's real bf16 kernels (fast or emulated): one aligner step agrees."""
    from gap3d.config import AlignerConfig, LossWeights
    from gap3d.layout import TokenLayout
    from gap3d.trainer.flow import FlowMatching
    from gap3d.trainer.model import AlignerNet

    torch.manual_seed(0)
    layout = TokenLayout(1, 0, 3, 3, 32)
    net = AlignerNet(layout, 16, AlignerConfig(preset="tiny", n_queries=4, prediction="x0"))
    torch.nn.init.normal_(net.head.weight, std=0.02)
    flow = FlowMatching(net, layout, LossWeights(), "uniform", 0.1)
    x0, cond = torch.randn(8, 10, 32), torch.randn(8, 6, 16)
    mask = torch.ones(8, 6, dtype=torch.bool)

    def step(bf16: bool):
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = flow.loss(x0, cond, mask, torch.Generator().manual_seed(0))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]

    res = speed.bf16_agrees(step)
    assert res["agrees"], res
