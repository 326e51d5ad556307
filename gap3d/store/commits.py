"""Per-shard commit records: the one object that makes a shard's rows count.

A shard's record is a zarr group ``commits/shard-NNNNNN`` whose attributes hold the record,
so the record is exactly one object (``commits/shard-NNNNNN/zarr.json``) that zarr tools list
as an ordinary member of the hierarchy. It is written last, after every row, column and
partial moment of the shard; it is deleted first when a shard is rewritten. On a local disk and
on object stores alike a single-object write is atomic, so a reader sees no record or a whole
one, and a killed writer leaves nothing that counts.

A record also carries the shard's compact row index (validity and split of its first
``n_samples`` rows as bit maps, a 32-bit hash of each sample key), so a trainer builds its
index from the records alone: one small object per shard, read concurrently, once.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as _dt
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
import zarr.api.asynchronous as zasync
from zarr.core.sync import sync

from gap3d import __version__
from gap3d.store.manifest import SPLIT_CODES, StoreError

GROUP = "commits"
_PREFIX = "shard-"
# How many records are fetched at once; object stores answer many small GETs in parallel.
_CONCURRENCY = 64


def record_path(shard_id: int) -> str:
    return f"{GROUP}/{_PREFIX}{shard_id:06d}"


def key_hash32(keys: Sequence[str]) -> np.ndarray:
    """A stable 32-bit hash per sample key (BLAKE2b, first 4 bytes, little-endian)."""
    out = np.empty(len(keys), np.uint32)
    for i, k in enumerate(keys):
        out[i] = int.from_bytes(hashlib.blake2b(k.encode(), digest_size=4).digest(), "little")
    return out


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def encode_rows(valid: np.ndarray, split_code: np.ndarray, keys: Sequence[str]) -> dict[str, str]:
    """The record's ``rows`` entry for the first ``n`` rows of a shard."""
    return {
        "valid": _b64(np.packbits(np.asarray(valid, bool))),
        "heldout": _b64(np.packbits(np.asarray(split_code) == SPLIT_CODES["heldout"])),
        "key_hash32": _b64(key_hash32(keys).astype("<u4")),
    }


@dataclass(frozen=True)
class ShardRows:
    """A record's row index decoded: arrays of the shard's first ``n_samples`` rows."""

    valid: np.ndarray  # bool
    split: np.ndarray  # int8 code
    key_hash: np.ndarray  # uint32


def decode_rows(record: dict[str, Any]) -> ShardRows:
    n = int(record["n_samples"])
    rows = record["rows"]

    def bits(name: str) -> np.ndarray:
        raw = np.frombuffer(base64.b64decode(rows[name]), np.uint8)
        return np.unpackbits(raw, count=n).astype(bool)

    hashes = np.frombuffer(base64.b64decode(rows["key_hash32"]), "<u4").astype(np.uint32)
    if len(hashes) != n:
        raise StoreError(f"commit record of shard {record.get('shard')} is damaged (rows)")
    split = np.where(bits("heldout"), SPLIT_CODES["heldout"], SPLIT_CODES["train"]).astype(np.int8)
    return ShardRows(valid=bits("valid"), split=split, key_hash=hashes)


def new_record(shard_id: int, **fields: Any) -> dict[str, Any]:
    return {
        "shard": shard_id,
        **fields,
        "written": time.time(),
        "written_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "gap3d_version": __version__,
    }


def write_record(store: Any, shard_id: int, record: dict[str, Any]) -> None:
    """Write the record as the group ``commits/shard-NNNNNN`` (one object)."""
    zarr.create_group(store=store, path=record_path(shard_id), attributes=record, overwrite=True)


def delete_record(store: Any, shard_id: int) -> None:
    """Uncommit a shard (its rows stop counting at once)."""
    sync(store.delete_dir(record_path(shard_id)))


def read_record(store: Any, shard_id: int) -> dict[str, Any] | None:
    try:
        g = zarr.open_group(store=store, path=record_path(shard_id), mode="r", zarr_format=3)
    except FileNotFoundError:
        return None
    return dict(g.attrs)


def read_records(store: Any, n_shards: int) -> dict[int, dict[str, Any]]:
    """Every commit record ``{shard_id: record}`` with ``0 <= shard_id < n_shards``.

    One listing of ``commits/`` plus one concurrent GET per record (zarr's async API), so
    opening a store of 30 000 shards costs seconds on an object store, not a scan of its rows.
    """

    async def run() -> dict[int, dict[str, Any]]:
        ids = []
        async for name in store.list_dir(GROUP):
            if name.startswith(_PREFIX):
                try:
                    s = int(name[len(_PREFIX) :])
                except ValueError:
                    continue
                if 0 <= s < n_shards:
                    ids.append(s)
        sem = asyncio.Semaphore(_CONCURRENCY)

        async def one(s: int) -> tuple[int, dict[str, Any] | None]:
            async with sem:
                try:
                    g = await zasync.open_group(
                        store=store, path=record_path(s), mode="r", zarr_format=3
                    )
                except FileNotFoundError:  # deleted between the listing and the read
                    return s, None
                return s, dict(g.attrs)

        got = await asyncio.gather(*(one(s) for s in ids))
        return {s: rec for s, rec in sorted(got) if rec is not None}

    try:
        return sync(run())
    except FileNotFoundError:
        return {}
