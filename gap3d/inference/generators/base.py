"""The generator interface: image-encoder tokens in, 3D result (or files) out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from gap3d.layout import TokenLayout

__all__ = ["Generator", "layout_from_manifest", "check_tokens"]


def layout_from_manifest(manifest: dict[str, Any]) -> TokenLayout:
    """The token layout a store manifest (or an export's copy of it) records."""
    layout = manifest.get("layout")
    if layout is None and isinstance(manifest.get("image_encoder"), dict):
        layout = manifest["image_encoder"].get("layout")
    if not isinstance(layout, dict):
        raise ValueError(
            "the store manifest has no token 'layout'; re-export the aligner from a store "
            "written by this version of gap3d"
        )
    return TokenLayout.from_dict(layout)


def check_tokens(tokens: torch.Tensor, layout: TokenLayout, who: str) -> None:
    """Refuse tokens whose shape does not match the layout the generator was built for."""
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3:
        raise ValueError(
            f"{who}: tokens must be a (B, T, C) tensor, got {type(tokens).__name__} "
            f"{tuple(getattr(tokens, 'shape', ()))}"
        )
    if tuple(tokens.shape[1:]) != (layout.n_tokens, layout.channels):
        raise ValueError(
            f"{who}: tokens have shape {tuple(tokens.shape)} but the image encoder layout "
            f"{layout} needs (B, {layout.n_tokens}, {layout.channels})"
        )
    if not torch.isfinite(tokens).all():
        raise ValueError(f"{who}: tokens contain NaN or inf values")


class Generator(ABC):
    """Consumes ``(B, T, C)`` tokens in the image encoder's own space (no normalisation).

    ``generate`` writes its outputs under ``out_dir`` and returns a JSON-able dict with the
    paths it wrote (relative to ``out_dir``) and anything worth recording (scores, settings).
    """

    name: str = "base"

    def __init__(self, layout: TokenLayout) -> None:
        self.layout = layout

    @abstractmethod
    def generate(self, tokens: torch.Tensor, out_dir: Path, prompt: str) -> dict[str, Any]:
        """Turn ``tokens`` into outputs under ``out_dir``; return paths and scores."""
