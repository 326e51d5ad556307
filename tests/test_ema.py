"""EMA of weights: update math, warm-up, swapping, exact resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gap3d.trainer.ema import EMA


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("stat", torch.zeros(2))


def set_weights(m: Small, value: float) -> None:
    with torch.no_grad():
        m.lin.weight.fill_(value)
        m.lin.bias.fill_(-value)
        m.stat.fill_(10 * value)


def test_update_math() -> None:
    m = Small()
    set_weights(m, 1.0)
    ema = EMA(m, decay=0.9)
    expect = 1.0
    for value in (2.0, 5.0, -1.0):
        set_weights(m, value)
        ema.update(m)
        expect = 0.9 * expect + 0.1 * value
    torch.testing.assert_close(ema.shadow["lin.weight"], torch.full((2, 3), expect))
    torch.testing.assert_close(ema.shadow["lin.bias"], torch.full((2,), -expect))
    torch.testing.assert_close(ema.shadow["stat"], torch.full((2,), -10.0))  # buffers copied
    assert ema.num_updates == 3


def test_warmup_decay() -> None:
    m = Small()
    ema = EMA(m, decay=0.99, warmup=True)
    decays = []
    for _ in range(3):
        decays.append(ema.current_decay())
        ema.update(m)
    assert decays == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    ema.num_updates = 10_000
    assert ema.current_decay() == 0.99
    assert EMA(m, decay=0.99).current_decay() == 0.99


def test_copy_to_and_swapped() -> None:
    m = Small()
    set_weights(m, 1.0)
    ema = EMA(m, decay=0.5)
    set_weights(m, 3.0)
    ema.update(m)  # shadow weight = 2
    with ema.swapped(m) as swapped:
        assert swapped is m
        torch.testing.assert_close(m.lin.weight, torch.full((2, 3), 2.0))
    torch.testing.assert_close(m.lin.weight, torch.full((2, 3), 3.0))  # restored
    ema.copy_to(m)
    torch.testing.assert_close(m.lin.weight, torch.full((2, 3), 2.0))


def test_state_dict_resume_is_exact() -> None:
    torch.manual_seed(0)
    m = Small()
    a = EMA(m, decay=0.95, warmup=True)
    for _ in range(3):
        with torch.no_grad():
            m.lin.weight.add_(torch.randn(2, 3))
        a.update(m)
    b = EMA(Small(), decay=0.5)
    b.load_state_dict(a.state_dict())
    for _ in range(2):
        with torch.no_grad():
            m.lin.weight.add_(torch.randn(2, 3))
        a.update(m)
        b.update(m)
    assert b.num_updates == 5 and b.decay == 0.95 and b.warmup
    for k in a.shadow:
        assert torch.equal(a.shadow[k], b.shadow[k])
    with pytest.raises(KeyError, match="does not match"):
        EMA(nn.Linear(2, 2), 0.9).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="decay"):
        EMA(m, decay=1.0)
