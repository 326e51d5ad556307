"""The feature store's files: atomic creation, manifest loading, commit markers.

No store object here, only paths: :mod:`gap3d.store.feature_store` builds on these.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import zarr
from zarr.codecs import ZstdCodec

from gap3d import __version__
from gap3d.store.manifest import (
    FORMAT_NAME,
    MANIFEST_KEY,
    SCHEMA_VERSION,
    StoreError,
    StoreSpec,
    array_shapes,
    build_manifest,
)

COMMIT_DIR = "_commits"
CREATING_KEY = "gap3d_creating"
# Per-sample columns small enough to keep one chunk per pipeline shard.
COLUMN_ARRAYS = ("valid", "caption", "key", "url", "split", "meta", "reason")
# What the trainer reads per batch; ``StoreSpec.compression`` applies to these only.
FEATURE_ARRAYS = ("image_tokens", "image_scale", "prompt_latents", "prompt_mask")


def compressors(name: str, compression: str = "zstd") -> list[Any]:
    """Codecs of array ``name``: zstd level 1, or none for feature arrays when asked.

    zstd level 1 was measured on real EfficientNet-Lite0 features and on dense DINOv2-like
    tokens (benchmarks/results/store.md): byte-shuffled blosc was no smaller on float16
    (sparse ReLU6 features even grew 25 %), higher zstd levels gained < 5 %, lz4 lost up to
    2x. Dense layer-normed tokens gain only ~1.1x from it, while uncompressed rows can be read
    straight into the batch (store_fastread.py), so feature arrays default to none
    (``store.compression``); thumbnails and text columns always keep zstd (never read in
    the training loop, and text compresses well).
    """
    if name in FEATURE_ARRAYS and compression == "none":
        return []
    return [ZstdCodec(level=1)]


def array_layout(spec: StoreSpec) -> dict[str, dict[str, Any]]:
    """Shape, dtype, chunking and sharding of every array (recorded in the manifest).

    Big arrays: one sample per inner chunk, one Zarr shard (= one file) per pipeline shard.
    Per-sample columns: one chunk (= one file) per pipeline shard.
    """
    s = spec.samples_per_shard
    dtypes = {
        "image_tokens": spec.encoding,
        "image_scale": "float32",
        "prompt_latents": "float16",
        "prompt_mask": "bool",
        "thumbnail": "uint8",
        "valid": "bool",
    }
    out = {}
    for name, shape in array_shapes(spec).items():
        if name in COLUMN_ARRAYS:
            chunks, shards = (s,), None
        else:
            chunks, shards = (1, *shape[1:]), (s, *shape[1:])
        out[name] = {
            "shape": list(shape),
            "dtype": dtypes.get(name, "str"),
            "chunks": list(chunks),
            "shards": list(shards) if shards else None,
            "compression": "zstd" if compressors(name, spec.compression) else "none",
        }
    return out


def broken(path: Path, what: str) -> StoreError:
    return StoreError(
        f"{path}: {what}. If a run was interrupted while creating it, delete the folder and "
        "re-run; otherwise point the command at a different store path."
    )


def create_store(path: Path, spec: StoreSpec) -> None:
    """Create an empty store at ``path``.

    Built in a temporary sibling folder and renamed into place, so a crash never leaves a
    half-created store at ``path`` and concurrent creators cannot interleave. Raises
    ``FileExistsError`` when another process won the race.
    """
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise StoreError(
            f"{path} already exists; open it with FeatureStore.open / "
            "open_or_create, or choose a new store path"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.creating-{uuid.uuid4().hex[:8]}"
    try:
        group = zarr.open_group(str(tmp), mode="w-", zarr_format=3, attributes={CREATING_KEY: True})
        layout = array_layout(spec)
        for name, a in layout.items():
            group.create_array(
                name,
                shape=tuple(a["shape"]),
                dtype=str if a["dtype"] == "str" else a["dtype"],
                chunks=tuple(a["chunks"]),
                shards=tuple(a["shards"]) if a["shards"] else None,
                compressors=compressors(name, spec.compression) or None,
                fill_value="" if a["dtype"] == "str" else 0,
            )
        (tmp / COMMIT_DIR).mkdir()
        # The manifest goes in last: a store without it was never finished.
        group.update_attributes({MANIFEST_KEY: build_manifest(spec, layout), CREATING_KEY: False})
        os.rename(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if path.exists():
            raise FileExistsError(str(path)) from e
        raise


def load_manifest(p: Path) -> dict[str, Any]:
    """The manifest of the store at ``p``; a clear ``StoreError`` for anything else."""
    if not p.exists():
        raise StoreError(f"{p}: no such feature store (run `gap3d cache` to create it)")
    if not (p / "zarr.json").is_file():
        raise StoreError(f"{p} is not a gap3d feature store (no zarr.json in it)")
    try:
        attrs = zarr.open_group(str(p), mode="r", zarr_format=3).attrs.asdict()
    except Exception as e:  # zarr raises many types for damaged metadata
        raise broken(p, f"cannot read the Zarr group metadata ({type(e).__name__}: {e})") from e
    m = attrs.get(MANIFEST_KEY)
    if m is None:
        if attrs.get(CREATING_KEY):
            raise broken(p, "the store was never finished (creation was interrupted)")
        raise StoreError(f"{p} is a Zarr group but not a gap3d feature store (no manifest)")
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise StoreError(f"{p} is not a gap3d feature store (manifest format mismatch)")
    if m.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(
            f"{p} has store schema_version {m.get('schema_version')!r}, this gap3d "
            f"{__version__} reads schema_version {SCHEMA_VERSION}. Re-create the store "
            "with this version (`gap3d cache` to a new store.path) or use a matching gap3d."
        )
    return m


def marker_path(root: Path, shard_id: int) -> Path:
    return root / COMMIT_DIR / f"shard-{shard_id:06d}.json"


def write_marker(root: Path, shard_id: int, counts: dict[str, Any]) -> dict[str, Any]:
    """Write a shard's commit marker atomically (temp file + ``os.replace``)."""
    info = {
        "shard": shard_id,
        **counts,
        "written": time.time(),
        "written_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "gap3d_version": __version__,
    }
    marker = marker_path(root, shard_id)
    tmp = marker.with_name(f".{marker.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, marker)  # readers see no marker or a whole one
    return info


def list_markers(root: Path, n_shards: int) -> list[int]:
    """Shard ids with a commit marker, sorted."""
    out = []
    for p in (root / COMMIT_DIR).glob("shard-*.json"):
        try:
            s = int(p.stem.split("-", 1)[1])
        except ValueError:
            continue
        if 0 <= s < n_shards:
            out.append(s)
    return sorted(out)
