"""Token layout of an image encoder's output, so no code hard-codes 1374 or 1024."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class TokenLayout:
    """``[CLS (n_cls), registers (n_registers), patches (grid_h * grid_w)] x channels``.

    DINOv2-L/14-reg at 518 px: ``TokenLayout(1, 4, 37, 37, 1024)`` -> 1374 tokens.
    Patches are row-major.
    """

    n_cls: int
    n_registers: int
    grid_h: int
    grid_w: int
    channels: int

    @property
    def n_patches(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def n_tokens(self) -> int:
        return self.n_cls + self.n_registers + self.n_patches

    @property
    def cls_slice(self) -> slice:
        return slice(0, self.n_cls)

    @property
    def register_slice(self) -> slice:
        return slice(self.n_cls, self.n_cls + self.n_registers)

    @property
    def patch_slice(self) -> slice:
        return slice(self.n_cls + self.n_registers, self.n_tokens)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenLayout:
        return cls(
            **{k: int(d[k]) for k in ("n_cls", "n_registers", "grid_h", "grid_w", "channels")}
        )
