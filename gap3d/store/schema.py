"""The arrays of a feature store: shapes, dtypes, chunking, codecs, and their creation.

Three kinds of arrays, each written by exactly one task per pipeline shard:

* **row files** (``ROW_ARRAYS``: image tokens, their int8 scales, prompt latents and mask,
  thumbnails): one sample per inner chunk, Zarr v3 sharding with ``rows_per_file`` rows per
  file/object. An encode task streams its samples and writes each file whole, once, as soon as
  its rows are encoded, so its memory does not grow with the shard, and a random training batch
  reads single rows.
* **columns** (``COLUMN_ARRAYS``: validity, split code, captions, keys, URLs, meta, reasons):
  one chunk per pipeline shard, written once before the shard's commit record.
* **per-shard arrays** (``moments/mean``, ``moments/m2``): one row per pipeline shard.
"""

from __future__ import annotations

from typing import Any

from zarr.codecs import ZstdCodec

from gap3d.store.manifest import StoreSpec, array_shapes

COLUMN_ARRAYS = ("valid", "split", "caption", "key", "url", "meta", "reason")
ROW_ARRAYS = ("image_tokens", "image_scale", "prompt_latents", "prompt_mask", "thumbnail")
SHARD_ARRAYS = ("moments/mean", "moments/m2")
# What the trainer reads per batch; ``StoreSpec.compression`` applies to these only.
FEATURE_ARRAYS = ("image_tokens", "image_scale", "prompt_latents", "prompt_mask")
_DTYPES = {
    "image_scale": "float32",
    "prompt_latents": "float16",
    "prompt_mask": "bool",
    "thumbnail": "uint8",
    "valid": "bool",
    "split": "int8",
    "moments/mean": "float64",
    "moments/m2": "float64",
}


def compressors(name: str, compression: str = "zstd") -> list[Any]:
    """Codecs of array ``name``: zstd level 1, or none for feature arrays when asked.

    zstd level 1 was measured on real EfficientNet-Lite0 features and on dense DINOv2-like
    tokens (benchmarks/results/store.md): byte-shuffled blosc was no smaller on float16
    (sparse ReLU6 features even grew 25 %), higher zstd levels gained < 5 %, lz4 lost up to
    2x. Dense layer-normed tokens gain only ~1.1x from it and uncompressed rows decode for
    free, so feature arrays default to none (``store.compression``); thumbnails, columns and
    moments always keep zstd (never read in the training loop; text compresses well).
    """
    if name in FEATURE_ARRAYS and compression == "none":
        return []
    return [ZstdCodec(level=1)]


def array_layout(spec: StoreSpec) -> dict[str, dict[str, Any]]:
    """Shape, dtype, chunking and sharding of every array (recorded in the manifest)."""
    s, f = spec.samples_per_shard, spec.rows_per_file
    out = {}
    for name, shape in array_shapes(spec).items():
        if name in COLUMN_ARRAYS:
            chunks, shards = (s,), None
        elif name in SHARD_ARRAYS:
            chunks, shards = (1, *shape[1:]), None
        else:
            chunks, shards = (1, *shape[1:]), (f, *shape[1:])
        dtype = spec.encoding if name == "image_tokens" else _DTYPES.get(name, "str")
        out[name] = {
            "shape": list(shape),
            "dtype": dtype,
            "chunks": list(chunks),
            "shards": list(shards) if shards else None,
            "compression": "zstd" if compressors(name, spec.compression) else "none",
        }
    return out


def create_arrays(group: Any, spec: StoreSpec) -> dict[str, dict[str, Any]]:
    """Create every array of ``spec`` in the (new, empty) zarr ``group``; returns the layout."""
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
    return layout
