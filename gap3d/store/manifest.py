"""The feature store's self-description: the spec a writer starts from and the manifest.

The manifest lives in the root group's attributes under ``"gap3d"``. It records everything a
reader needs to decode the store without the code that wrote it (encoders, token layout,
storage encoding and its decode rule, shapes) and everything needed to refuse mixing
incompatible features into one store.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from typing import Any

from gap3d import __version__
from gap3d.layout import TokenLayout
from gap3d.store.codec import ENCODINGS, encoding_manifest

# 2: store addressed by URL; commit records are zarr groups under commits/; split is an int8
# code; big arrays are written in files of ``rows_per_file`` rows; per-shard partial moments.
SCHEMA_VERSION = 2
FORMAT_NAME = "gap3d-feature-store"
MANIFEST_KEY = "gap3d"
THUMBNAIL_SIZE = 64
# Split codes stored per row (int8) and in commit records; the position is the code.
SPLITS = ("train", "heldout")
SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}
# Token roles in the order of the partial-moment arrays (moments/mean, moments/m2).
ROLES = ("cls", "register", "patch")
# Default size of one file/object of the big arrays (image tokens, prompt latents, ...): large
# enough that object stores see few, big objects, small enough that an encode task holds one
# in memory (paper layout, float16: 64 rows x 2.8 MB = 180 MB).
TARGET_FILE_BYTES = 256 * 2**20
# Lossless compression of the arrays the trainer reads (schema.FEATURE_ARRAYS).
COMPRESSIONS = ("none", "zstd")
# Encoder ``info()`` keys that change what the features *are*; runtime keys such as device,
# batch size or compute dtype may differ between runs that write one store.
ENCODER_IDENTITY_KEYS = (
    "name",
    "model",
    "model_id",
    "revision",
    "layer",
    "preprocessing",
    "image_size",
    "hidden_size",
    "max_length",
)


class StoreError(RuntimeError):
    """A store that cannot be opened, created or written as asked; the message says why."""


@dataclass
class StoreSpec:
    """What a writer promises about every sample of a store."""

    layout: TokenLayout
    prompt_dim: int
    prompt_max_length: int
    n_shards: int
    samples_per_shard: int
    encoding: str = "float16"
    prompt_encoder: dict[str, Any] = field(default_factory=dict)
    image_encoder: dict[str, Any] = field(default_factory=dict)
    prompt_template: str = "{caption}"
    config_hash: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # "zstd" keeps stores made by callers that predate the choice as they were;
    # the cache stage passes ``store.compression`` of the config (default "none").
    compression: str = "zstd"
    # rows per file of the row-sharded arrays; must divide samples_per_shard; None = about
    # TARGET_FILE_BYTES of image tokens per file (see :func:`default_rows_per_file`)
    rows_per_file: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.layout, dict):
            self.layout = TokenLayout.from_dict(self.layout)
        for name in ("prompt_dim", "prompt_max_length", "n_shards", "samples_per_shard"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise StoreError(f"StoreSpec.{name} must be a positive integer, got {v!r}")
        if self.encoding not in ENCODINGS:
            raise StoreError(
                f"StoreSpec.encoding must be one of {ENCODINGS}, got {self.encoding!r}"
            )
        if self.compression not in COMPRESSIONS:
            raise StoreError(
                f"StoreSpec.compression must be one of {COMPRESSIONS}, got {self.compression!r}"
            )
        if self.rows_per_file is None:
            self.rows_per_file = default_rows_per_file(self)
        r = self.rows_per_file
        if not isinstance(r, int) or isinstance(r, bool) or r < 1 or self.samples_per_shard % r:
            raise StoreError(
                f"StoreSpec.rows_per_file must be a positive divisor of samples_per_shard="
                f"{self.samples_per_shard}, got {r!r}"
            )
        for name in ("prompt_encoder", "image_encoder", "extra"):
            try:
                json.dumps(getattr(self, name))
            except (TypeError, ValueError) as e:
                raise StoreError(f"StoreSpec.{name} must be JSON-serialisable: {e}") from e

    @property
    def n_rows(self) -> int:
        return self.n_shards * self.samples_per_shard


def default_rows_per_file(spec: StoreSpec) -> int:
    """The largest divisor of ``samples_per_shard`` whose image tokens fit TARGET_FILE_BYTES."""
    row = spec.layout.n_tokens * spec.layout.channels * (1 if spec.encoding == "int8" else 2)
    cap = max(1, TARGET_FILE_BYTES // max(row, 1))
    S = spec.samples_per_shard
    return max(d for d in range(1, min(S, cap) + 1) if S % d == 0)


def array_shapes(spec: StoreSpec) -> dict[str, tuple[int, ...]]:
    """Every array of a store with this spec and its shape (rows first)."""
    n, lay = spec.n_rows, spec.layout
    shapes: dict[str, tuple[int, ...]] = {"image_tokens": (n, lay.n_tokens, lay.channels)}
    if spec.encoding == "int8":
        shapes["image_scale"] = (n, lay.n_tokens)
    shapes |= {
        "prompt_latents": (n, spec.prompt_max_length, spec.prompt_dim),
        "prompt_mask": (n, spec.prompt_max_length),
        "thumbnail": (n, THUMBNAIL_SIZE, THUMBNAIL_SIZE, 3),
        "valid": (n,),
        "split": (n,),
        "caption": (n,),
        "key": (n,),
        "url": (n,),
        "meta": (n,),
        "reason": (n,),
        # per pipeline shard: partial moments of its valid train rows (stats.py)
        "moments/mean": (spec.n_shards, len(ROLES), lay.channels),
        "moments/m2": (spec.n_shards, len(ROLES), lay.channels),
    }
    return shapes


def build_manifest(spec: StoreSpec, arrays: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The manifest for a new store; ``arrays`` describes each array (shape/dtype/chunks)."""
    lay = spec.layout
    return {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "gap3d_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "layout": lay.to_dict(),
        "token_roles": {
            "order": "cls, registers, patches (row-major)",
            "cls": [lay.cls_slice.start, lay.cls_slice.stop],
            "register": [lay.register_slice.start, lay.register_slice.stop],
            "patch": [lay.patch_slice.start, lay.patch_slice.stop],
        },
        "prompt_dim": spec.prompt_dim,
        "prompt_max_length": spec.prompt_max_length,
        "prompt_template": spec.prompt_template,
        "prompt_encoder": spec.prompt_encoder,
        "image_encoder": spec.image_encoder,
        "encoding": spec.encoding,
        "compression": spec.compression,
        "image_tokens_encoding": encoding_manifest(spec.encoding),
        "prompt_latents_encoding": {
            "storage_dtype": "float16",
            "decode": "prompt_latents.astype('float32'); padded positions have prompt_mask False",
        },
        "n_shards": spec.n_shards,
        "samples_per_shard": spec.samples_per_shard,
        "rows_per_file": spec.rows_per_file,
        "n_rows": spec.n_rows,
        "rows": "shard s owns rows [s*samples_per_shard, (s+1)*samples_per_shard); only the "
        "first n_samples rows of a committed shard (see its commit record) are samples",
        "split_codes": dict(SPLIT_CODES),
        "commits": {
            "where": "group commits/, one subgroup per committed shard: commits/shard-NNNNNN",
            "record": "the subgroup's attributes: n_samples, n_valid, reasons, splits, "
            "rows (base64: valid and heldout bitmaps of the first n_samples rows, "
            "numpy.packbits order; key_hash32 little-endian uint32), moments (token counts per "
            "role), source (url + fingerprint of the input shard)",
            "rule": "a shard counts only when its record exists; the record is written last",
        },
        "moments": {
            "arrays": ["moments/mean", "moments/m2"],
            "roles": list(ROLES),
            "rows": "valid rows of split 'train', float32 tokens before storage encoding",
            "merge": "Chan, Golub & LeVeque (1979) pairwise combination; counts in the records",
        },
        "arrays": arrays,
        "config_hash": spec.config_hash,
        "extra": spec.extra,
    }


def build_manifest_keys() -> frozenset[str]:
    """The manifest keys gap3d itself writes (others may add keys, not change these)."""
    spec = StoreSpec(TokenLayout(1, 0, 1, 1, 1), 1, 1, 1, 1)
    return frozenset(build_manifest(spec, {}))


def spec_from_manifest(m: dict[str, Any]) -> StoreSpec:
    """Rebuild the writer's spec from a manifest (used for compatibility checks)."""
    return StoreSpec(
        layout=TokenLayout.from_dict(m["layout"]),
        prompt_dim=int(m["prompt_dim"]),
        prompt_max_length=int(m["prompt_max_length"]),
        n_shards=int(m["n_shards"]),
        samples_per_shard=int(m["samples_per_shard"]),
        encoding=str(m["encoding"]),
        prompt_encoder=dict(m.get("prompt_encoder") or {}),
        image_encoder=dict(m.get("image_encoder") or {}),
        prompt_template=str(m.get("prompt_template", "")),
        config_hash=str(m.get("config_hash", "")),
        extra=dict(m.get("extra") or {}),
        compression=str(m.get("compression", "zstd")),  # stores before the field: zstd
        rows_per_file=int(m["rows_per_file"]),
    )


def _encoder_identity(info: dict[str, Any]) -> dict[str, Any]:
    return {k: info[k] for k in ENCODER_IDENTITY_KEYS if k in info}


def incompatibilities(existing: StoreSpec, wanted: StoreSpec) -> list[tuple[str, Any, Any]]:
    """``(field, value in store, value asked for)`` for every field that must match.

    ``n_shards`` is not listed when the wanted store is larger: the caller may grow the store.
    ``compression`` and ``rows_per_file`` are not listed either: they change no value, and an
    existing store keeps the codecs and file layout it was created with (its manifest says).
    """
    out: list[tuple[str, Any, Any]] = []
    for role in ("prompt_encoder", "image_encoder"):
        a = _encoder_identity(getattr(existing, role))
        b = _encoder_identity(getattr(wanted, role))
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                out.append((f"{role}.{k}", a.get(k), b.get(k)))
    if existing.layout != wanted.layout:
        out.append(("layout", existing.layout.to_dict(), wanted.layout.to_dict()))
    for name in (
        "prompt_dim",
        "prompt_max_length",
        "encoding",
        "samples_per_shard",
        "prompt_template",
    ):
        if getattr(existing, name) != getattr(wanted, name):
            out.append((name, getattr(existing, name), getattr(wanted, name)))
    if wanted.n_shards < existing.n_shards:
        out.append(("n_shards", existing.n_shards, wanted.n_shards))
    return out
