"""Deterministic image preprocessing in two modes (``image_encoder.preprocessing``).

* ``reference`` (docs/METHOD.md, "Image preprocessing"; the paper's stage-1 targets): alpha
  composited onto ``image_encoder.alpha_background`` (default black), shorter side resized to
  the image size with bicubic resampling, centre crop, then the encoder's mean/std.
* ``trellis``: what TRELLIS's ``TrellisImageTo3DPipeline.preprocess_image`` + ``encode_image``
  do before its DINOv2 conditioning: for an image with alpha, crop a square around the pixels
  with alpha > 0.8 (side 1.2x the box's longer side, centred on it), resize to the image size
  with LANCZOS, premultiply by alpha (black background, 8-bit truncation as TRELLIS does),
  then mean/std. An image without alpha first goes through rembg's background removal when
  it is installed (``image_encoder.background_removal``: auto | rembg | none); without it the
  whole picture is the object (alpha 1 everywhere) and the manifest says so.

No augmentation ever happens here: these tensors are cached. Both modes start from
:mod:`gap3d.encoders.image_input`, the one conversion path for every caller.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from gap3d.encoders.image_input import BLACK, Colour, flatten_alpha, normalize_mode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TRELLIS's crop (trellis/pipelines/trellis_image_to_3d.py, preprocess_image): alpha > 0.8
# counts as object, the square crop is 1.2x the object's longer side, and images without alpha
# are downscaled to at most 1024 px before background removal.
TRELLIS_ALPHA_THRESHOLD = 0.8
TRELLIS_MARGIN = 1.2
TRELLIS_REMBG_MAX_SIDE = 1024

_INTERP = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def _normalise(rgb: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
    m = torch.tensor(tuple(mean), dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(tuple(std), dtype=torch.float32).view(3, 1, 1)
    return ((x - m) / s).contiguous()


@dataclass(frozen=True)
class Preprocessing:
    """The ``reference`` mode; everything a reader of the store needs to reproduce it."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "shorter_side"
    crop: str = "center"
    interpolation: str = "bicubic"
    alpha_background: Colour = BLACK

    mode = "reference"

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
            "crop": self.crop,
            "interpolation": self.interpolation,
            "alpha": "composite onto alpha_background (straight alpha)",
            "alpha_background": list(self.alpha_background),
        }

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self.one(im) for im in images])

    def rgb(self, image: Image.Image) -> Image.Image:
        """The ``S x S`` RGB picture the encoder sees (before mean/std)."""
        img = flatten_alpha(image, self.alpha_background)
        s = self.image_size
        w, h = img.size
        scale = s / min(w, h)
        # round() keeps the shorter side at exactly s; the longer one is cropped below.
        new_w, new_h = max(s, round(w * scale)), max(s, round(h * scale))
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), _INTERP[self.interpolation])
        left, top = (new_w - s) // 2, (new_h - s) // 2
        return img.crop((left, top, left + s, top + s))

    def flatten(self, image: Image.Image) -> Image.Image:
        """Only the alpha step (for encoders whose own transform does the geometry)."""
        return flatten_alpha(image, self.alpha_background)

    def one(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> ``(3, S, S)`` float32 normalised tensor."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(image).__name__}")
        return _normalise(self.rgb(image), self.mean, self.std)


@dataclass(frozen=True)
class TrellisPreprocessing:
    """The ``trellis`` mode (see the module docstring)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    background_removal: str = "none"  # resolved: "rembg" or "none"
    background_removal_detail: str = "none"
    remover: Callable[[Image.Image], Image.Image] | None = field(
        default=None, compare=False, repr=False
    )

    mode = "trellis"

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop": f"square around alpha > {TRELLIS_ALPHA_THRESHOLD}, side x{TRELLIS_MARGIN}",
            "interpolation": "lanczos",
            "alpha": "premultiplied (black background), 8-bit truncation",
            "alpha_background": list(BLACK),
            "background_removal": self.background_removal,
            "background_removal_detail": self.background_removal_detail,
        }

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self.one(im) for im in images])

    def rgba(self, image: Image.Image) -> Image.Image:
        """RGBA input for the crop: the image's own alpha, rembg's, or opaque everywhere."""
        img = normalize_mode(image)
        if img.mode == "RGBA":
            return img
        if self.remover is None:
            return img.convert("RGBA")  # no alpha and no remover: the whole picture
        longest = max(img.size)
        if longest > TRELLIS_REMBG_MAX_SIDE:
            k = TRELLIS_REMBG_MAX_SIDE / longest
            img = img.resize((int(img.width * k), int(img.height * k)), Image.Resampling.LANCZOS)
        out = self.remover(img)
        if not isinstance(out, Image.Image):
            raise TypeError(f"background removal returned {type(out).__name__}, not an image")
        return out.convert("RGBA")

    def rgb(self, image: Image.Image) -> Image.Image:
        """The ``S x S`` premultiplied RGB picture the encoder sees (before mean/std)."""
        rgba = self.rgba(image)
        alpha = np.asarray(rgba.getchannel("A"))
        ys, xs = np.nonzero(alpha > TRELLIS_ALPHA_THRESHOLD * 255)
        if len(xs) == 0:  # nothing counts as object: keep the whole frame
            ys, xs = np.array([0, rgba.height - 1]), np.array([0, rgba.width - 1])
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        side = int(max(x1 - x0, y1 - y0) * TRELLIS_MARGIN)
        # PIL pads a box beyond the image with transparent black, as it does for TRELLIS.
        box = (cx - side // 2, cy - side // 2, cx + side // 2, cy + side // 2)
        s = self.image_size
        crop = rgba.crop(box).resize((s, s), Image.Resampling.LANCZOS)  # type: ignore[arg-type]
        arr = np.asarray(crop).astype(np.float32) / 255
        premultiplied = arr[:, :, :3] * arr[:, :, 3:4]
        return Image.fromarray((premultiplied * 255).astype(np.uint8), "RGB")

    def flatten(self, image: Image.Image) -> Image.Image:
        return self.rgb(image)

    def one(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(image).__name__}")
        return _normalise(self.rgb(image), self.mean, self.std)


def background_remover(
    mode: str, model: str = "u2net"
) -> tuple[Callable[[Image.Image], Image.Image] | None, str]:
    """``(remover or None, description)`` for ``image_encoder.background_removal``.

    ``auto`` uses rembg when it is installed; ``rembg`` requires it; ``none`` never removes.
    rembg fetches its model weights on first use (the user's choice by installing it).
    """
    if mode not in ("auto", "rembg", "none"):
        raise ValueError(f"background_removal must be auto, rembg or none, got {mode!r}")
    if mode == "none":
        return None, "none (configured): images without alpha are used whole, as opaque"
    try:
        import rembg
    except ImportError:
        if mode == "rembg":
            raise ImportError(
                "image_encoder.background_removal=rembg, but rembg is not installed: "
                "`pip install rembg` (or set background_removal=none)"
            ) from None
        return None, "none (rembg not installed): images without alpha are used whole, as opaque"
    session = rembg.new_session(model)
    version = importlib.metadata.version("rembg")

    def remove(image: Image.Image) -> Image.Image:
        return rembg.remove(image, session=session)

    return remove, f"rembg {version}, model {model}"


PreprocessingMode = Preprocessing | TrellisPreprocessing


def build_preprocessing(cfg: Any, mean: Sequence[float], std: Sequence[float]) -> PreprocessingMode:
    """The preprocessing an ``ImageEncoderConfig`` names, with the encoder's mean/std."""
    mean3 = (float(mean[0]), float(mean[1]), float(mean[2]))
    std3 = (float(std[0]), float(std[1]), float(std[2]))
    mode = getattr(cfg, "preprocessing", "reference")
    if mode == "reference":
        bg = tuple(getattr(cfg, "alpha_background", BLACK))
        return Preprocessing(cfg.image_size, mean3, std3, alpha_background=bg)  # type: ignore[arg-type]
    if mode == "trellis":
        remover, detail = background_remover(
            getattr(cfg, "background_removal", "auto"), getattr(cfg, "rembg_model", "u2net")
        )
        return TrellisPreprocessing(
            cfg.image_size,
            mean3,
            std3,
            background_removal="rembg" if remover is not None else "none",
            background_removal_detail=detail,
            remover=remover,
        )
    raise ValueError(f"image_encoder.preprocessing must be reference or trellis, got {mode!r}")
