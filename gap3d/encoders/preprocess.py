"""Deterministic image preprocessing: RGB, resize the shorter side, centre crop, normalise.

docs/METHOD.md ("Image preprocessing") fixes it for DINOv2 (TRELLIS's conditioning): shorter side to the image size with
bicubic resampling, centre crop, ImageNet mean/std. EfficientNet-Lite0 uses the same geometry
with its own normalisation. No augmentation ever happens here: these tensors are cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_INTERP = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class Preprocessing:
    """Everything a reader of the store needs to reproduce the encoder input."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "shorter_side"
    crop: str = "center"
    interpolation: str = "bicubic"
    alpha: str = "composite_on_black"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self.one(im) for im in images])

    def one(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> ``(3, S, S)`` float32 normalised tensor."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(image).__name__}")
        img = to_rgb(image)
        s = self.image_size
        w, h = img.size
        scale = s / min(w, h)
        # round() keeps the shorter side at exactly s; the longer one is cropped below.
        new_w, new_h = max(s, round(w * scale)), max(s, round(h * scale))
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), _INTERP[self.interpolation])
        left, top = (new_w - s) // 2, (new_h - s) // 2
        img = img.crop((left, top, left + s, top + s))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return ((x - mean) / std).contiguous()


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of ``image``; transparent pixels become black.

    TRELLIS premultiplies RGBA inputs by alpha (black background) before encoding them, so an
    image with alpha is composited onto black rather than keeping the hidden colour values.
    """
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        rgba = image.convert("RGBA")
        out = Image.new("RGB", rgba.size, (0, 0, 0))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return image.convert("RGB") if image.mode != "RGB" else image
