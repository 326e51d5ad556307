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

SCHEMA_VERSION = 1
FORMAT_NAME = "gap3d-feature-store"
MANIFEST_KEY = "gap3d"
THUMBNAIL_SIZE = 64
SPLITS = ("train", "heldout")
# Lossless compression of the arrays the trainer reads (store_files.FEATURE_ARRAYS).
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
        for name in ("prompt_encoder", "image_encoder", "extra"):
            try:
                json.dumps(getattr(self, name))
            except (TypeError, ValueError) as e:
                raise StoreError(f"StoreSpec.{name} must be JSON-serialisable: {e}") from e

    @property
    def n_rows(self) -> int:
        return self.n_shards * self.samples_per_shard


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
        "caption": (n,),
        "key": (n,),
        "url": (n,),
        "split": (n,),
        "meta": (n,),
        "reason": (n,),
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
        "n_rows": spec.n_rows,
        "rows": "shard s owns rows [s*samples_per_shard, (s+1)*samples_per_shard); only the "
        "first n_samples rows of a committed shard (see its commit marker) are samples",
        "commit_dir": "_commits",
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
    )


def _encoder_identity(info: dict[str, Any]) -> dict[str, Any]:
    return {k: info[k] for k in ENCODER_IDENTITY_KEYS if k in info}


def incompatibilities(existing: StoreSpec, wanted: StoreSpec) -> list[tuple[str, Any, Any]]:
    """``(field, value in store, value asked for)`` for every field that must match.

    ``n_shards`` is not listed when the wanted store is larger: the caller may grow the store.
    ``compression`` is not listed either: it changes no value, and an existing store keeps
    the codecs it was created with (its manifest says which).
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
