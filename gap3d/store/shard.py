"""One pipeline shard as the writer hands it over, and how it becomes a store region.

Pure functions (no I/O): :func:`shard_region` checks a :class:`ShardData` against the store's
shapes and returns the padded arrays to write plus the counts that go into the commit marker.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from gap3d.layout import TokenLayout
from gap3d.store.codec import encode_tokens, finite_mask
from gap3d.store.manifest import SPLITS, THUMBNAIL_SIZE, StoreError

NON_FINITE = "non_finite_features"


@dataclass
class ShardData:
    """``n <= samples_per_shard`` samples of one pipeline shard.

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


def check_shard(
    d: ShardData,
    layout: TokenLayout,
    prompt_max_length: int,
    prompt_dim: int,
    samples_per_shard: int,
    where: str,
) -> int:
    """Raise :class:`StoreError` naming the field when ``d`` does not fit; returns ``n``."""
    n = len(d)
    if n > samples_per_shard:
        raise StoreError(f"{where}: {n} samples exceed samples_per_shard={samples_per_shard}")
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


def shard_region(
    d: ShardData, encoding: str, samples_per_shard: int
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(arrays to write, padded to samples_per_shard rows; marker counts)``.

    Samples whose features are not finite (or overflow the float16 storage) become invalid
    with reason ``non_finite_features`` instead of poisoning training.
    """
    n, S = len(d), samples_per_shard
    reason = [str(r) for r in d.reason]
    tok = np.array(d.image_tokens, dtype=np.float32)  # copies: invalid rows are zeroed below
    lat = np.array(d.prompt_latents, dtype=np.float32)
    ok = finite_mask(tok, float16=encoding == "float16") & finite_mask(lat, float16=True)
    for i in np.flatnonzero(~ok):
        reason[i] = reason[i] or NON_FINITE
    valid = np.array([r == "" for r in reason], dtype=bool)
    tok[~valid] = 0.0  # invalid rows are stored as zeros, whatever the writer passed
    lat[~valid] = 0.0

    def pad(x: np.ndarray, dtype: Any) -> np.ndarray:
        out = np.zeros((S, *x.shape[1:]), dtype=dtype)  # tail rows stay zero (not written)
        out[:n] = x
        return out

    region = {name: pad(a, a.dtype) for name, a in encode_tokens(tok, encoding).items()}
    region["prompt_latents"] = pad(lat, np.float16)
    region["prompt_mask"] = pad(np.asarray(d.prompt_mask, dtype=bool), bool)
    # Thumbnails are kept for invalid rows too: they are what one looks at when debugging.
    region["thumbnail"] = pad(np.asarray(d.thumbnail), np.uint8)
    region["valid"] = pad(valid, bool)
    texts = {
        "caption": d.caption,
        "key": d.key,
        "url": d.url,
        "split": d.split,
        "reason": reason,
        "meta": [json.dumps(m, sort_keys=True, default=str) for m in d.meta],
    }
    for name, values in texts.items():
        col = np.full(S, "", dtype=object)
        col[:n] = [str(v) for v in values]
        region[name] = col
    counts = {
        "n_samples": n,
        "n_valid": int(valid.sum()),
        "reasons": dict(Counter(r for r in reason if r)),
        "splits": dict(Counter(s for s, v in zip(d.split, valid, strict=True) if v)),
    }
    return region, counts
