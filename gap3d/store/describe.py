"""``gap3d inspect``: describe a feature store for people (text) and machines (``--json``).

Everything comes from the manifest, the commit records and the storage's own listing of the
store's objects (sizes), through zarr's storage layer: the same report for a local folder and
for ``s3://``/``gs://`` stores, without reading a token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import numpy as np
from zarr.core.sync import sync

from gap3d.store import FeatureStore, StoreError
from gap3d.store.manifest import ROLES

# Decoded (in-memory, as the trainer sees it) bytes per element of each array.
_DECODED_ITEMSIZE = {
    "image_tokens": 4,
    "prompt_latents": 4,
    "prompt_mask": 1,
    "thumbnail": 1,
    "valid": 1,
}


def prefix_bytes(store: Any, prefix: str) -> int:
    """Total size of the objects below ``prefix`` of a zarr store (one listing; object
    stores report sizes in their listings, local stores answer with a stat per file)."""
    fs = getattr(store, "fs", None)
    if fs is not None:  # FsspecStore: the filesystem's own du() over one listing
        path = f"{store.path.rstrip('/')}/{prefix}"
        if getattr(fs, "async_impl", False) and hasattr(fs, "_du"):
            return int(sync(fs._du(path, total=True)))
        return int(fs.du(path, total=True))

    async def total() -> int:
        sizes = []
        async for key in store.list_prefix(prefix + "/"):
            sizes.append(store.getsize(key))
        return int(sum(await asyncio.gather(*sizes)))

    return int(sync(total()))


def _codecs(meta_codecs: list[dict[str, Any]]) -> list[str]:
    """Zarr v3 codec chain as short names, e.g. ``["sharding[bytes, blosc(zstd,3,shuffle)]"]``."""
    out = []
    for c in meta_codecs:
        name, conf = c["name"], c.get("configuration") or {}
        if name == "sharding_indexed":
            out.append(f"sharding[{', '.join(_codecs(conf.get('codecs', [])))}]")
        elif name == "blosc":
            out.append(f"blosc({conf.get('cname')},{conf.get('clevel')},{conf.get('shuffle')})")
        elif name == "zstd":
            out.append(f"zstd({conf.get('level')})")
        else:
            out.append(name)
    return out


def _ranges(ids: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``."""
    if not ids:
        return "none"
    parts, start, prev = [], ids[0], ids[0]
    for i in [*ids[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)


def describe(store: FeatureStore) -> dict[str, Any]:
    """Everything ``gap3d inspect`` shows, as a JSON-able dict."""
    m = store.manifest
    records = store.commit_records(refresh=True)
    committed = sorted(records)
    markers = [records[s] for s in committed]
    n_samples = sum(k["n_samples"] for k in markers)
    n_valid = sum(k["n_valid"] for k in markers)
    splits: dict[str, int] = {}
    for k in markers:
        for name, c in k.get("splits", {}).items():
            splits[name] = splits.get(name, 0) + c
    arrays: dict[str, Any] = {}
    total_disk = total_decoded = 0
    for name, a in m["arrays"].items():
        arr = store.raw(name)
        disk = prefix_bytes(store.zarr_store, name)
        per_row = int(np.prod(a["shape"][1:])) if len(a["shape"]) > 1 else 1
        decoded = per_row * _DECODED_ITEMSIZE.get(name, 0)
        if name == "image_scale" or name.startswith("moments/"):
            decoded = 0  # folded into the decoded image_tokens / not per sample
        arrays[name] = {
            "shape": list(arr.shape),
            "dtype": str(a["dtype"]),
            "chunks": a["chunks"],
            "shards": a["shards"],
            "codecs": _codecs(arr.metadata.to_dict()["codecs"]),
            "bytes_on_disk": disk,
            "bytes_per_sample_on_disk": disk / n_samples if n_samples else None,
            "bytes_per_sample_decoded": decoded,
        }
        total_disk += disk
        total_decoded += decoded
    counts = {r: sum(k["moments"]["count"][r] for k in markers) for r in ROLES}
    return {
        "path": store.url,
        "manifest": m,
        "arrays": arrays,
        "shards": {
            "n_shards": store.n_shards,
            "samples_per_shard": store.samples_per_shard,
            "n_committed": len(committed),
            "n_missing": store.n_shards - len(committed),
            "committed": committed,
            "missing": store.missing_shards(),
        },
        "samples": {
            "rows": len(store),
            "n_samples": n_samples,
            "n_valid": n_valid,
            "n_invalid": n_samples - n_valid,
            "invalid_reasons": store.invalid_counts(),
            "valid_by_split": splits,
        },
        "bytes_per_sample": {
            "on_disk": total_disk / n_samples if n_samples else None,
            "decoded": total_decoded,
            "note": "on disk: all array bytes / committed samples; decoded: float32 tensors, "
            "bool mask and uint8 thumbnail of one sample (text columns not counted)",
        },
        "sources": {
            "bound": sum(1 for k in markers if k.get("source")),
            "first": [
                (s, records[s]["source"]["url"]) for s in committed[:3] if records[s].get("source")
            ],
        },
        "stats": {
            "partial_moments_shards": len(markers),
            "token_counts": counts,
            "note": "per-shard partial moments of valid train rows; merged on demand by the "
            "trainer when aligner.normalize_targets is on",
        },
    }


def _mb(x: float | None) -> str:
    if not x:
        return "-"
    return f"{x / 1e6:.3f} MB" if x >= 1e5 else f"{x / 1e3:.1f} kB" if x >= 100 else f"{x:.0f} B"


def format_text(r: dict[str, Any]) -> str:
    """The human-readable report."""
    m, sh, sa = r["manifest"], r["shards"], r["samples"]
    lay = m["layout"]
    enc = m["image_tokens_encoding"]
    pe, ie = m.get("prompt_encoder", {}), m.get("image_encoder", {})
    lines = [
        f"feature store  {r['path']}",
        f"  schema v{m['schema_version']} · written by gap3d {m['gap3d_version']} · "
        f"created {m['created']} · config {m.get('config_hash') or '-'}",
        f"  prompt encoder  {pe.get('name', '?')} ({pe.get('model', '?')}, "
        f"revision {pe.get('revision') or '-'}) -> L={m['prompt_max_length']} x "
        f"D={m['prompt_dim']}",
        f"  prompt template {m['prompt_template']!r}",
        f"  image encoder   {ie.get('name', '?')} ({ie.get('model', '?')}, "
        f"revision {ie.get('revision') or '-'})",
        f"  layer           {ie.get('layer', '-')}",
        f"  token layout    {lay['n_cls']} cls + {lay['n_registers']} registers + "
        f"{lay['grid_h']}x{lay['grid_w']} patches = {lay['n_cls'] + lay['n_registers'] + lay['grid_h'] * lay['grid_w']}"
        f" tokens x {lay['channels']} channels",
        f"  encoding        {m['encoding']} ({enc['scheme']}); decode: {enc['decode']}",
        "",
        f"arrays  {'name':<15} {'shape':<22} {'dtype':<8} {'per sample disk':>16} "
        f"{'decoded':>12}  codecs",
    ]
    for name, a in r["arrays"].items():
        lines.append(
            f"        {name:<15} {str(tuple(a['shape'])):<22} {a['dtype']:<8} "
            f"{_mb(a['bytes_per_sample_on_disk']):>16} {_mb(a['bytes_per_sample_decoded']):>12}"
            f"  {' '.join(a['codecs'])}"
        )
    b = r["bytes_per_sample"]
    lines += [
        f"        {'total':<15} {'':<22} {'':<8} {_mb(b['on_disk']):>16} {_mb(b['decoded']):>12}",
        "",
        f"shards  {sh['n_committed']}/{sh['n_shards']} committed ({sh['samples_per_shard']} rows "
        f"each); missing: {_ranges(sh['missing'])}",
        f"samples {sa['n_samples']} written, {sa['n_valid']} valid, {sa['n_invalid']} invalid; "
        "valid by split: "
        + (", ".join(f"{k} {v}" for k, v in sa["valid_by_split"].items()) or "-"),
    ]
    for reason, c in sa["invalid_reasons"].items():
        lines.append(f"        invalid {c:>8}  {reason}")
    src = r["sources"]
    if src["bound"]:
        first = ", ".join(f"{s} <- {u}" for s, u in src["first"])
        lines.append(f"sources {src['bound']} shards bound to their input shard ({first}, ...)")
    st = r["stats"]
    tokens = ", ".join(f"{k} {v}" for k, v in st["token_counts"].items() if v) or "none"
    lines.append(
        f"stats   partial moments in {st['partial_moments_shards']} committed shards "
        f"(train tokens: {tokens}); merged on demand"
    )
    return "\n".join(lines)


def cli_main(cfg: Any, args: argparse.Namespace) -> int:
    """``gap3d inspect [STORE] [--json]``: 0 on success, 1 for a missing or broken store."""
    path = getattr(args, "store", None) or cfg.store_path
    try:
        report = describe(FeatureStore.open(path, "r"))
    except StoreError as e:
        print(f"gap3d inspect: {e}", file=sys.stderr)
        return 1
    if getattr(args, "json", False):
        print(json.dumps(report, indent=1, default=str))
    else:
        print(format_text(report))
    return 0
