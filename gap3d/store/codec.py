"""How image tokens are stored in the feature store, and how to get them back.

Two encodings, recorded in the store manifest so a reader never guesses:

* ``float16``: tokens cast to half precision (DINOv2 tokens after TRELLIS's affine-free layer
  norm are O(1), well inside float16's range).
* ``int8``: symmetric per-token absmax quantisation. Each token ``x`` (a C-vector) gets one
  scale ``s = max|x| / 127`` and is stored as ``q = round(x / s)`` in ``[-127, 127]``; decoding
  is ``q * s``. This is the "vector-wise" absmax scheme of LLM.int8() (Dettmers et al. 2022,
  arXiv 2208.07339, Sec. 3.1) applied per token. The worst-case error per element is ``s / 2``
  and the scale factor itself does not change a token's direction, so per-token cosine only
  sees the rounding noise (~``0.29 s`` per element RMS). Scales are float32: 4 bytes per token
  is <0.5 % of a token's C bytes for C >= 1024 (measured in benchmarks/results/store.md), and
  float32 keeps tiny tokens and large activations exact where float16 would flush or overflow.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ENCODINGS = ("float16", "int8")
INT8_SCHEME = "absmax_int8_per_token"
FLOAT16_SCHEME = "float16"
_QMAX = 127.0
_MAX_F16 = float(np.finfo(np.float16).max)


def encoding_manifest(encoding: str) -> dict[str, Any]:
    """The manifest entry that tells any reader how ``image_tokens`` decode to float32."""
    if encoding == "float16":
        return {
            "scheme": FLOAT16_SCHEME,
            "storage_dtype": "float16",
            "arrays": ["image_tokens"],
            "decode": "image_tokens.astype('float32')",
        }
    if encoding == "int8":
        return {
            "scheme": INT8_SCHEME,
            "storage_dtype": "int8",
            "scale_dtype": "float32",
            "arrays": ["image_tokens", "image_scale"],
            "decode": "image_tokens.astype('float32') * image_scale[..., None].astype('float32')",
            "reference": "LLM.int8() vector-wise absmax quantisation, arXiv 2208.07339",
        }
    raise ValueError(f"unknown image token encoding {encoding!r}; use one of {ENCODINGS}")


def finite_mask(x: np.ndarray, float16: bool) -> np.ndarray:
    """Boolean per sample (first axis): all values finite (and inside float16's range)."""
    flat = x.reshape(x.shape[0], -1)
    ok = np.isfinite(flat).all(axis=1)
    if float16 and flat.size:
        ok[ok] = np.abs(flat[ok]).max(axis=1, initial=0.0) <= _MAX_F16
    return ok


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x (..., C)`` float -> ``(q int8 (..., C), scale float32 (...))``; see module docstring."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.abs(x).max(axis=-1) / np.float32(_QMAX)
    safe = np.where(scale > 0, scale, np.float32(1.0))[..., None]  # all-zero token -> q = 0
    # |x| / scale <= 127 up to float rounding; clip so a rounding hair never wraps around.
    q = np.clip(np.rint(x / safe), -_QMAX, _QMAX).astype(np.int8)
    return q, scale.astype(np.float32)


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantize_int8`, as float32."""
    return q.astype(np.float32) * scale.astype(np.float32)[..., None]


def encode_tokens(x: np.ndarray, encoding: str) -> dict[str, np.ndarray]:
    """Float tokens -> the arrays to store for ``encoding``."""
    if encoding == "float16":
        return {"image_tokens": np.asarray(x).astype(np.float16)}
    if encoding == "int8":
        q, s = quantize_int8(x)
        return {"image_tokens": q, "image_scale": s}
    raise ValueError(f"unknown image token encoding {encoding!r}; use one of {ENCODINGS}")


def decode_tokens(stored: dict[str, np.ndarray], encoding_info: dict[str, Any]) -> np.ndarray:
    """Stored arrays -> float32 tokens, following the manifest's ``encoding`` entry only."""
    scheme = encoding_info.get("scheme")
    if scheme == FLOAT16_SCHEME:
        return stored["image_tokens"].astype(np.float32, copy=False)  # read may have cast
    if scheme == INT8_SCHEME:
        return dequantize_int8(stored["image_tokens"], stored["image_scale"])
    raise ValueError(
        f"image token scheme {scheme!r} is unknown to this gap3d version; "
        "upgrade gap3d to read this store"
    )
