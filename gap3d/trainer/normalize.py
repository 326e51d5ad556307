"""Per-role standardisation of image-encoder tokens with the feature store's statistics.

Flow matching starts from unit Gaussian noise, so targets whose channels have very different
scales (e.g. EfficientNet's pooled token vs. its grid) are easier to learn standardised. The
store merges a channel mean/std per role from its shards' commit records (``cls_mean``, ``cls_std``,
``register_mean``, ``register_std``, ``patch_mean``, ``patch_std``); each array is ``(C,)`` (one
value per channel for the whole role) or ``(n_role_tokens, C)`` (per token). The paper preset
stores layer-normed tokens and turns this off (``aligner.normalize_targets: false``): then the
normaliser is the identity.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gap3d.layout import TokenLayout

# Channels that were (nearly) constant in the training data would blow up under division by
# their std: floor each std at this fraction of the role's mean std.
STD_FLOOR_REL = 1e-3


def _as_tensor(value: Any) -> Tensor:
    return torch.as_tensor(np.asarray(value, dtype=np.float32))


def expand_stats(
    layout: TokenLayout, stats: Mapping[str, Any], scale: str = "channel"
) -> tuple[Tensor, Tensor]:
    """Per-role store statistics -> per-token ``mean, std`` of shape ``(T, C)``.

    ``scale="channel"`` divides each channel by its own std; ``scale="role"`` divides every
    channel of a role by one scalar, the RMS of the role's channel stds (the role's overall
    spread), which keeps sparse channels from turning into huge outliers.
    """
    if scale not in ("channel", "role"):
        raise ValueError(f"normalisation scale must be 'channel' or 'role', got {scale!r}")
    means, stds = [], []
    for role, n in (
        ("cls", layout.n_cls),
        ("register", layout.n_registers),
        ("patch", layout.n_patches),
    ):
        if n == 0:
            continue
        for key in (f"{role}_mean", f"{role}_std"):
            if key not in stats:
                raise KeyError(
                    f"normalisation statistics lack '{key}' (have: {', '.join(sorted(stats))}); "
                    "re-run `gap3d cache` (statistics come from the shards' commit records), or set aligner.normalize_targets=false"
                )
        mean, std = _as_tensor(stats[f"{role}_mean"]), _as_tensor(stats[f"{role}_std"])
        for key, arr in ((f"{role}_mean", mean), (f"{role}_std", std)):
            if arr.shape not in ((layout.channels,), (n, layout.channels)):
                raise ValueError(
                    f"statistic '{key}' has shape {tuple(arr.shape)}; expected "
                    f"({layout.channels},) or ({n}, {layout.channels}) for layout {layout}"
                )
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise ValueError(f"statistics of role '{role}' contain NaN/inf; re-run `gap3d cache`")
        if scale == "role":
            std = torch.full_like(std, max(float(std.pow(2).mean().sqrt()), 1e-8))
        std = std.abs().clamp_min(max(STD_FLOOR_REL * float(std.abs().mean()), 1e-8))
        means.append(mean.expand(n, layout.channels))
        stds.append(std.expand(n, layout.channels))
    return torch.cat(means).contiguous(), torch.cat(stds).contiguous()


class TokenNormalizer(nn.Module):
    """``normalize(x) = (x - mean) / std`` per token and channel; identity without stats.

    The buffers ``mean`` and ``std`` are ``(T, C)`` when enabled and empty when not, so the
    state dict itself says which (:meth:`from_state_dict` rebuilds either).
    """

    def __init__(
        self, layout: TokenLayout, stats: Mapping[str, Any] | None = None, scale: str = "channel"
    ) -> None:
        super().__init__()
        self.layout = layout
        if stats is None:
            mean, std = torch.zeros(0), torch.zeros(0)
        else:
            mean, std = expand_stats(layout, stats, scale)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    @property
    def enabled(self) -> bool:
        return self.mean.numel() > 0

    @classmethod
    def from_state_dict(cls, layout: TokenLayout, state: Mapping[str, Tensor]) -> TokenNormalizer:
        """Rebuild from :meth:`state_dict` output (e.g. read back from an export)."""
        norm = cls(layout, None)
        mean, std = state["mean"], state["std"]
        if mean.numel() and tuple(mean.shape) != (layout.n_tokens, layout.channels):
            raise ValueError(f"normaliser mean {tuple(mean.shape)} does not match layout {layout}")
        norm.mean, norm.std = mean.clone().float(), std.clone().float()
        return norm

    def _check(self, x: Tensor) -> None:
        if x.shape[-2:] != (self.layout.n_tokens, self.layout.channels):
            raise ValueError(
                f"tokens must end in ({self.layout.n_tokens}, {self.layout.channels}), "
                f"got {tuple(x.shape)}"
            )

    def normalize(self, x: Tensor) -> Tensor:
        """Store space -> model space."""
        self._check(x)
        if not self.enabled:
            return x
        # (x - mean) / std as one fused pass over x: x * (1/std) + (-mean/std); the two small
        # (T, C) tables cost nothing next to a (B, T, C) batch.
        inv = self.std.reciprocal()
        return torch.addcmul(-self.mean * inv, x.float(), inv).to(x.dtype)

    def denormalize(self, x: Tensor) -> Tensor:
        """Model space -> store space."""
        self._check(x)
        if not self.enabled:
            return x
        return torch.addcmul(self.mean, x.float(), self.std).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.normalize(x)
