"""Robust decoding of webdataset samples: raw bytes in, a clean RGB(A) image + caption out.

Web-scale image-text data is dirty: truncated JPEGs, HTML error pages saved as ``.jpg``,
decompression bombs, 16-bit or CMYK files, captions in Latin-1. The cache stage must never stop
on one bad sample, so :func:`decode_sample` turns every failure into an *invalid record* with a
short, stable reason code (:data:`REASONS`) and every fixable oddity into a conversion noted in
the record's ``meta``. Tars are read by :mod:`gap3d.pipeline.tars`.
"""

from __future__ import annotations

import io
import json
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from gap3d.encoders.image_input import PREVIEW_BACKGROUND, flatten_alpha, normalize_mode

# The one place that documents reason codes; they are stored per sample in the feature store
# (``reason``) and counted in its manifest, so they must stay stable across versions.
REASONS: dict[str, str] = {
    "image_missing": "the sample has no image entry (jpg/jpeg/png/webp/...)",
    "image_empty": "the image entry is a zero-byte file",
    "image_unknown_format": "the image bytes are not an image format PIL knows "
    "(e.g. an HTML error page saved as .jpg)",
    "image_corrupt": "the image header or pixel data is corrupt or truncated",
    "image_too_large": "more pixels than data.max_image_pixels (decompression-bomb guard)",
    "caption_missing": "the sample has no txt entry and no 'caption' in its json",
    "caption_empty": "the caption is empty or whitespace only",
    "sample_truncated": "the shard tar ended inside this sample (its entries are incomplete)",
    "member_too_large": "a tar member is larger than data.max_member_bytes (skipped unread)",
    "encode_failed": "the frozen encoder raised on this sample (meta 'encode_error' says why)",
    # set by FeatureStore.write_shard, listed here so that every code has one description
    "non_finite_features": "the encoders returned NaN/inf or values beyond float16's range",
}

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "img")
CAPTION_EXTS = ("txt", "caption", "text")
SPLITS = ("train", "heldout")
# img2dataset's json fields that duplicate a store column or carry nothing useful per sample.
_JSON_SKIP = ("caption", "key", "status", "error_message", "exif")
_EXIF_ORIENTATION = 0x0112


@dataclass
class DecodedSample:
    """One sample after decoding; ``reason == ""`` means valid.

    ``image`` is then 8-bit ``RGB``, or ``RGBA`` when the picture has transparency (see
    :func:`gap3d.encoders.image_input.normalize_mode`): consumers hand it to an encoder, which
    applies its alpha policy, or flatten it themselves with ``flatten_alpha``.
    """

    key: str
    caption: str = ""
    url: str = ""
    split: str = "train"
    meta: dict[str, Any] = field(default_factory=dict)
    image: Image.Image | None = None
    reason: str = ""
    # the picture of a text+image prompt (gap3d.pipeline.prompt_inputs); None = text only
    prompt_image: Image.Image | None = None

    @property
    def valid(self) -> bool:
        return not self.reason

    def invalid(self, reason: str) -> DecodedSample:
        """Mark invalid (drops the image so nothing downstream can use it by accident)."""
        assert reason in REASONS, f"undocumented reason code {reason!r}"
        self.reason, self.image, self.prompt_image = reason, None, None
        return self


def _normalise_keys(sample: Mapping[str, Any]) -> dict[str, Any]:
    # webdataset yields "jpg", hand-made dicts may say ".jpg" or "JPG".
    return {(k if k.startswith("__") else k.lstrip(".").lower()): v for k, v in sample.items()}


def _as_bytes(v: Any) -> bytes:
    if isinstance(v, str):
        return v.encode("utf-8")
    return bytes(v)


def decode_caption(raw: bytes, max_chars: int, meta: dict[str, Any]) -> str:
    """UTF-8 (with replacement characters for bad bytes), stripped, truncated to ``max_chars``."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        meta["caption_non_utf8"] = True
    # NULs and other control characters break tokenizers and text columns; spaces are safe.
    text = "".join(c if c.isprintable() else " " for c in text)
    text = " ".join(text.split())
    if len(text) > max_chars:
        meta["caption_truncated_from"] = len(text)
        text = text[:max_chars].rstrip()
    return text


def _to_rgb(im: Image.Image, meta: dict[str, Any]) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, or RGBA when the image has transparency.

    Alpha is kept, not composited here: the image encoder's alpha policy (recorded in the
    store manifest) decides, through the one conversion path in
    :mod:`gap3d.encoders.image_input`, exactly as it does for ``generate --image``.
    """
    return normalize_mode(im, meta)


def decode_image(raw: bytes, max_pixels: int, meta: dict[str, Any]) -> Image.Image | str:
    """Bytes -> RGB (or RGBA) image, or a reason code. Never raises on bad data."""
    if len(raw) == 0:
        return "image_empty"
    try:
        with warnings.catch_warnings():
            # PIL warns between 1x and 2x its global limit and raises above; treat both as a
            # bomb without touching the process-wide Image.MAX_IMAGE_PIXELS.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(raw))
            # Our own limit, checked from the header before any pixel is decoded.
            w, h = im.size
            if w * h > max_pixels:
                meta["image_size"] = [w, h]
                return "image_too_large"
            im.load()  # truncated data raises here (LOAD_TRUNCATED_IMAGES stays False)
            meta["image_format"] = im.format
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
            if orientation not in (None, 1):
                # Phones store pixels sideways plus a tag; encoders must see the upright view.
                meta["exif_orientation"] = int(orientation)
                im = ImageOps.exif_transpose(im)
            return _to_rgb(im, meta)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "image_too_large"
    except Image.UnidentifiedImageError:
        return "image_unknown_format"
    except (
        OSError,
        ValueError,
        SyntaxError,
        TypeError,
        IndexError,
        KeyError,
        EOFError,
        struct.error,
    ) as e:
        # PIL's plugins raise a zoo of types on corrupt data; record the first words of it.
        meta["decode_error"] = f"{type(e).__name__}: {e}"[:200]
        return "image_corrupt"


def _parse_json(raw: Any, meta: dict[str, Any]) -> dict[str, Any]:
    if raw is None:
        return {}
    try:
        obj = json.loads(_as_bytes(raw).decode("utf-8", errors="replace"))
    except (json.JSONDecodeError, ValueError):
        meta["json_malformed"] = True
        return {}
    if not isinstance(obj, dict):
        meta["json_malformed"] = True
        return {}
    return obj


def decode_sample(
    sample: Mapping[str, Any], max_image_pixels: int, max_caption_chars: int
) -> DecodedSample:
    """One webdataset sample (``__key__`` + raw bytes per extension) -> :class:`DecodedSample`.

    ``split`` and extra columns (``asset_id``, ...) come from the sample's json; a split other
    than ``train``/``heldout`` falls back to ``train`` and is noted in ``meta``.
    """
    s = _normalise_keys(sample)
    meta: dict[str, Any] = {}
    info = _parse_json(s.get("json"), meta)
    out = DecodedSample(key=str(s.get("__key__") or info.get("key") or ""), meta=meta)
    out.url = str(info.get("url") or "")
    for k, v in info.items():
        if k not in _JSON_SKIP and k != "url" and k != "split":
            meta.setdefault(k, v)
    split = info.get("split", "train")
    if split not in SPLITS:
        meta["split_unknown"] = str(split)
        split = "train"
    out.split = split

    cap_raw = next((s[e] for e in CAPTION_EXTS if s.get(e) is not None), None)
    if cap_raw is None and isinstance(info.get("caption"), str):
        cap_raw, meta["caption_from_json"] = info["caption"], True
    if cap_raw is not None:
        out.caption = decode_caption(_as_bytes(cap_raw), max_caption_chars, meta)

    img_ext = next((e for e in IMAGE_EXTS if s.get(e) is not None), None)
    if img_ext is None:
        return out.invalid("image_missing")
    image = decode_image(_as_bytes(s[img_ext]), max_image_pixels, meta)
    if isinstance(image, str):
        return out.invalid(image)
    if cap_raw is None:
        return out.invalid("caption_missing")
    if not out.caption:
        return out.invalid("caption_empty")
    out.image = image
    return out


def thumbnail(image: Image.Image | None, size: int = 64) -> np.ndarray:
    """Centre-cropped ``(size, size, 3)`` uint8 preview; zeros for an invalid sample.

    A preview for people, not encoder input: transparent pixels are shown on white.
    """
    if image is None:
        return np.zeros((size, size, 3), np.uint8)
    rgb = flatten_alpha(image, PREVIEW_BACKGROUND)
    return np.asarray(ImageOps.fit(rgb, (size, size), Image.Resampling.BICUBIC), np.uint8)


def decode_any(
    sample: Mapping[str, Any], max_image_pixels: int, max_caption_chars: int
) -> DecodedSample:
    """:func:`decode_sample`, plus the ``sample_truncated`` and ``__oversize__`` marks left by
    :class:`gap3d.pipeline.tars.TarStream`."""
    if sample.get("__truncated__"):
        return DecodedSample(key=str(sample["__key__"])).invalid("sample_truncated")
    if sample.get("__oversize__"):
        out = DecodedSample(key=str(sample["__key__"]))
        out.meta["oversize_members"] = dict(sample["__oversize__"])
        return out.invalid("member_too_large")
    return decode_sample(sample, max_image_pixels, max_caption_chars)
