"""The one way an image becomes encoder input: mode normalisation and the alpha policy.

Every path that hands a picture to a frozen encoder goes through here: the cache stage
(``pipeline/decode.py`` decodes shard bytes with :func:`normalize_mode`), ``gap3d generate
--image`` and the retrieval library (:func:`load_image`), and the encoders' own preprocessing
(:func:`flatten_alpha` in the ``reference`` mode, the TRELLIS crop in ``trellis``). So the same
RGBA picture gives the same tokens whichever path it took.

* :func:`normalize_mode`: any PIL mode -> 8-bit ``RGB``, or ``RGBA`` when the picture has
  transparency that matters (an alpha channel with a value below 255, a palette with a
  transparent index). The alpha is *kept*: what to do with it is the encoder's policy, recorded
  in the store manifest, not the decoder's.
* :func:`flatten_alpha`: straight-alpha compositing onto one background colour
  (``out = a * rgb + (1 - a) * background``); onto black this is TRELLIS's premultiplication.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

Colour = tuple[int, int, int]
BLACK: Colour = (0, 0, 0)
# Store thumbnails are previews for people (notebooks, `gap3d inspect`), not encoder input:
# transparent pixels are shown on white there, as image viewers do.
PREVIEW_BACKGROUND: Colour = (255, 255, 255)
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


def _eight_bit(im: Image.Image) -> Image.Image:
    """16-bit / int32 / float single-channel images -> ``L`` (``convert`` would clip at 255)."""
    mode = im.mode
    arr = np.asarray(im, dtype=np.float64)
    if mode == "F" and np.nanmax(arr, initial=0.0) <= 1.0:
        arr = arr * 255.0
    elif mode != "F" and (mode.startswith("I;16") or np.nanmax(arr, initial=0.0) > 255):
        # "I"/"F" values above 255 are taken as 16-bit data (PNG/TIFF), else as 8-bit already
        arr = arr / 257.0
    arr = np.nan_to_num(arr, nan=0.0).clip(0, 255).round().astype(np.uint8)
    return Image.fromarray(arr, "L")


def normalize_mode(image: Image.Image, meta: dict[str, Any] | None = None) -> Image.Image:
    """``RGB``, or ``RGBA`` if some pixel is not fully opaque; the original mode goes into
    ``meta["image_mode"]`` (and ``meta["alpha"] = True`` when alpha is kept)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if meta is not None:
        meta["image_mode"] = mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _eight_bit(image).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        lo, _ = rgba.getchannel("A").getextrema()
        if lo == 255:  # an alpha channel that is opaque everywhere carries nothing
            return rgba.convert("RGB")
        if meta is not None:
            meta["alpha"] = True
        return rgba
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def flatten_alpha(image: Image.Image, background: Sequence[int] = BLACK) -> Image.Image:
    """RGB picture: transparent pixels composited onto ``background`` (straight alpha)."""
    image = normalize_mode(image)
    if image.mode == "RGB":
        return image
    arr = np.asarray(image, dtype=np.float32)
    a = arr[..., 3:4] / 255.0
    bg = np.asarray(tuple(background), np.float32).reshape(1, 1, 3)
    out = arr[..., :3] * a + bg * (1.0 - a)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def load_image(source: str | Path | Image.Image) -> Image.Image:
    """A file (upright per its EXIF orientation) or a PIL image, through :func:`normalize_mode`."""
    if isinstance(source, Image.Image):
        return normalize_mode(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"image {path}: no such file")
    with Image.open(path) as im:
        im.load()
        return normalize_mode(ImageOps.exif_transpose(im))
