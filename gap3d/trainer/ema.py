"""Exponential moving average of model weights (the weights that get exported).

``shadow <- d * shadow + (1 - d) * param`` after every optimiser step. With ``warmup=True`` the
decay is ``d_n = min(decay, (1 + n) / (10 + n))`` after ``n`` previous updates (the schedule
of TensorFlow's ``ExponentialMovingAverage(num_updates=...)``), so early, still-random weights are
forgotten quickly in short runs; with ``warmup=False`` (default) ``d = decay`` from the first
update. Buffers (e.g. normaliser statistics) are copied, not averaged. Shadow values are kept in
float32 whatever the training precision.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


class EMA:
    """EMA of ``model``'s floating-point parameters and a copy of its buffers."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = warmup
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {
            name: p.detach().float().clone() for name, p in self._tracked(model)
        }
        self._backup: dict[str, Tensor] | None = None  # the model's own weights while swapped

    @staticmethod
    def _tracked(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
        for name, p in model.named_parameters():
            if p.is_floating_point():
                yield name, p
        for name, b in model.named_buffers():
            yield name, b

    def current_decay(self) -> float:
        """Decay used by the next :meth:`update`."""
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold ``model``'s current weights into the average (call after each optimiser step)."""
        if self._backup is not None:
            raise RuntimeError("EMA.update() while the EMA weights are swapped in (validation)")
        d = self.current_decay()
        params = dict(model.named_parameters())
        avg_shadow: list[Tensor] = []
        avg_value: list[Tensor] = []
        for name, value in self._tracked(model):
            shadow = self.shadow.get(name)
            if shadow is None:
                raise KeyError(f"EMA has no entry for '{name}': was the model changed after EMA()?")
            if shadow.device != value.device:
                shadow = self.shadow[name] = shadow.to(value.device)
            if name in params:
                avg_shadow.append(shadow)
                avg_value.append(value.detach().float())
            else:
                shadow.copy_(value.detach().float())
        if avg_shadow:
            # one multi-tensor kernel instead of a Python loop over ~100 parameters
            torch._foreach_lerp_(avg_shadow, avg_value, 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters and buffers with the EMA values."""
        for name, value in self._tracked(model):
            value.copy_(self.shadow[name].to(device=value.device, dtype=value.dtype))

    @property
    def is_swapped(self) -> bool:
        """True between :meth:`swap_in` and :meth:`swap_out`."""
        return self._backup is not None

    @torch.no_grad()
    def swap_in(self, model: nn.Module) -> None:
        """Put the EMA weights into ``model``, keeping one copy of its own weights.

        Costs one clone of the weights; call it once per validation run, not per batch.
        """
        if self._backup is not None:
            raise RuntimeError("EMA weights are already swapped in; call swap_out() first")
        self._backup = {name: v.detach().clone() for name, v in self._tracked(model)}
        self.copy_to(model)

    @torch.no_grad()
    def swap_out(self, model: nn.Module) -> bool:
        """Restore the weights saved by :meth:`swap_in`; False if nothing was swapped in."""
        if self._backup is None:
            return False
        for name, value in self._tracked(model):
            value.copy_(self._backup[name])
        self._backup = None
        return True

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily run ``model`` with EMA weights; restores them afterwards."""
        self.swap_in(model)
        try:
            yield model
        finally:
            self.swap_out(model)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed for an exact resume (shadow tensors, decay, update count)."""
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": {k: v.clone() for k, v in self.shadow.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        unexpected = set(state["shadow"]) - set(self.shadow)
        if missing or unexpected:
            raise KeyError(
                f"EMA state does not match the model (missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]})"
            )
        self.decay = float(state["decay"])
        self.warmup = bool(state.get("warmup", False))
        self.num_updates = int(state["num_updates"])
        for k, v in state["shadow"].items():
            self.shadow[k] = v.detach().float().clone().to(self.shadow[k].device)

    def to(self, device: torch.device | str) -> EMA:
        """Move the shadow tensors (e.g. to the training device)."""
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self
