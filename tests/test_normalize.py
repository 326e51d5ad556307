from __future__ import annotations

import numpy as np
import pytest
import torch

from gap3d.layout import TokenLayout
from gap3d.trainer.normalize import TokenNormalizer

LAYOUT = TokenLayout(1, 0, 2, 2, 8)


def _stats() -> dict[str, np.ndarray]:
    std = np.array([0.001, 0.5, 1.0, 2.0, 0.0, 0.3, 0.7, 1.5])
    return {
        "cls_mean": np.linspace(0, 1, 8),
        "cls_std": std,
        "patch_mean": np.linspace(1, 2, 8),
        "patch_std": std * 2,
    }


@pytest.mark.parametrize("scale", ["channel", "role"])
def test_round_trip(scale: str) -> None:
    norm = TokenNormalizer(LAYOUT, _stats(), scale)
    x = torch.randn(3, LAYOUT.n_tokens, LAYOUT.channels)
    torch.testing.assert_close(norm.denormalize(norm.normalize(x)), x, rtol=1e-5, atol=1e-5)


def test_role_scale_is_one_scalar_per_role_and_tames_sparse_channels() -> None:
    stats = _stats()
    role = TokenNormalizer(LAYOUT, stats, "role")
    chan = TokenNormalizer(LAYOUT, stats, "channel")
    rms = float(np.sqrt(np.mean(stats["cls_std"] ** 2)))
    torch.testing.assert_close(role.std[0], torch.full((8,), rms))
    torch.testing.assert_close(role.std[1], torch.full((8,), 2 * rms))
    # a rare activation of 3.0 on the near-constant channel 0
    x = torch.zeros(1, LAYOUT.n_tokens, LAYOUT.channels)
    x[0, 0, 0] = 3.0
    assert chan.normalize(x)[0, 0, 0] > 100 * role.normalize(x)[0, 0, 0]


def test_bad_scale_is_refused() -> None:
    with pytest.raises(ValueError, match="'channel' or 'role'"):
        TokenNormalizer(LAYOUT, _stats(), "global")
