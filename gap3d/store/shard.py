"""Rows as a writer hands them over, and how they become stored arrays.

Pure functions (no I/O): :func:`check_rows` checks a :class:`ShardData` against the store's
shapes; :func:`encode_rows` returns what to store for those rows (row arrays in their storage
encoding, column values, validity) and marks samples with non-finite features invalid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from gap3d.layout import TokenLayout
from gap3d.store.codec import encode_tokens, finite_mask
from gap3d.store.manifest import SPLIT_CODES, SPLITS, THUMBNAIL_SIZE, StoreError

NON_FINITE = "non_finite_features"


@dataclass
class ShardData:
    """``n`` consecutive samples of one pipeline shard (a whole shard, or a batch of it).

    Invalid samples keep their row: ``reason`` non-empty (tensors are stored as zeros).
    """

    image_tokens: np.ndarray  # (n, T, C) float
    prompt_latents: np.ndarray  # (n, L, D) float
    prompt_mask: np.ndarray  # (n, L) bool
    caption: list[str]
    key: list[str]
    url: list[str]
    split: list[str]  # "train" | "heldout"
    meta: list[dict[str, Any]]
    reason: list[str]  # "" = valid
    thumbnail: np.ndarray  # (n, 64, 64, 3) uint8

    def __len__(self) -> int:
        return len(self.caption)


def check_rows(
    d: ShardData, layout: TokenLayout, prompt_max_length: int, prompt_dim: int, where: str
) -> int:
    """Raise :class:`StoreError` naming the field when ``d`` does not fit; returns ``n``."""
    n = len(d)
    want = {
        "image_tokens": (n, layout.n_tokens, layout.channels),
        "prompt_latents": (n, prompt_max_length, prompt_dim),
        "prompt_mask": (n, prompt_max_length),
        "thumbnail": (n, THUMBNAIL_SIZE, THUMBNAIL_SIZE, 3),
    }
    for name, shape in want.items():
        got = tuple(np.shape(getattr(d, name)))
        if got != shape:
            raise StoreError(f"{where}: ShardData.{name} has shape {got}, expected {shape}")
    for name in ("key", "url", "split", "meta", "reason"):
        if len(getattr(d, name)) != n:
            raise StoreError(
                f"{where}: ShardData.{name} has {len(getattr(d, name))} entries, caption has {n}"
            )
    bad = sorted(set(d.split) - set(SPLITS))
    if bad:
        raise StoreError(f"{where}: split values {bad} are not in {SPLITS}")
    if np.asarray(d.thumbnail).dtype != np.uint8:
        raise StoreError(f"{where}: ShardData.thumbnail must be uint8")
    return n


@dataclass
class EncodedRows:
    """What the store keeps of ``n`` rows."""

    arrays: dict[str, np.ndarray]  # row arrays in storage dtype, n rows each
    columns: dict[str, list[Any] | np.ndarray]  # column values, n each
    valid: np.ndarray  # (n,) bool, after the finite check
    split_code: np.ndarray  # (n,) int8
    reasons: list[str]
    tokens: np.ndarray  # (n, T, C) float32 as encoded (invalid rows zero): partial moments
    train_rows: np.ndarray  # indices of the valid rows of split "train"


def encode_rows(d: ShardData, encoding: str) -> EncodedRows:
    """Storage form of ``d``'s rows.

    Samples whose features are not finite (or overflow the float16 storage) become invalid
    with reason ``non_finite_features`` instead of poisoning training; invalid rows are stored
    as zeros whatever the writer passed.
    """
    reason = [str(r) for r in d.reason]
    tok = np.asarray(d.image_tokens, dtype=np.float32)
    lat = np.asarray(d.prompt_latents, dtype=np.float32)
    ok = finite_mask(tok, float16=encoding == "float16") & finite_mask(lat, float16=True)
    for i in np.flatnonzero(~ok):
        reason[i] = reason[i] or NON_FINITE
    valid = np.array([r == "" for r in reason], dtype=bool)
    if not valid.all():  # copy only when rows must be zeroed
        tok, lat = tok.copy(), lat.copy()
        tok[~valid] = 0.0
        lat[~valid] = 0.0
    split_code = np.array([SPLIT_CODES[s] for s in d.split], dtype=np.int8)
    arrays = dict(encode_tokens(tok, encoding))
    arrays["prompt_latents"] = lat.astype(np.float16)
    arrays["prompt_mask"] = np.asarray(d.prompt_mask, dtype=bool)
    # Thumbnails are kept for invalid rows too: they are what one looks at when debugging.
    arrays["thumbnail"] = np.asarray(d.thumbnail, dtype=np.uint8)
    columns: dict[str, list[Any] | np.ndarray] = {
        "valid": valid,
        "split": split_code,
        "caption": [str(v) for v in d.caption],
        "key": [str(v) for v in d.key],
        "url": [str(v) for v in d.url],
        "reason": reason,
        "meta": [json.dumps(m, sort_keys=True, default=str) for m in d.meta],
    }
    train = np.flatnonzero(valid & (split_code == SPLIT_CODES["train"]))
    return EncodedRows(arrays, columns, valid, split_code, reason, tok, train)
