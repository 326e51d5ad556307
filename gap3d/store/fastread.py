"""A direct reader for the store's row-sharded arrays: gathers rows without zarr-python.

Why: a random training batch touches ~one inner chunk per row in each of three arrays.
zarr-python 3 pays a fixed cost per array read (event-loop round trip, codec pipeline set-up,
~6-11 ms even for a 32-row bool mask, measured in benchmarks/results/train.json) that
dominates small reads. The on-disk format is simple and documented, so for the arrays the
store writes itself we read it directly:

* Zarr v3 sharding (``sharding_indexed`` codec, zarr-specs "Sharding codec" v1.0): one file
  per shard holds the encoded inner chunks and an index of one ``(offset, nbytes)`` uint64
  pair per inner chunk, C order over the chunks of the shard, placed at the end or the start
  of the file (``index_location``) and encoded with ``index_codecs`` (``bytes`` little-endian,
  optionally followed by a ``crc32c`` checksum of the index bytes). ``(2**64-1, 2**64-1)``
  marks an inner chunk that was never written: it reads as the array's fill value. A shard
  file that does not exist reads as fill value too.
* Our arrays chunk rows only (inner chunk = one row, shard = ``samples_per_shard`` rows), so
  inner chunk ``i`` of shard ``s`` is row ``s*S + i``, and a row's bytes are the row itself
  (``bytes`` codec, little-endian), optionally zstd-compressed.

Shard files are memory-mapped; uncompressed rows are copied straight into the output batch,
zstd rows are decoded into it with the same numcodecs codec zarr uses. Anything else (other
codecs, chunking, dtypes, remote stores) is reported as not supported by :func:`plan_array`
and the caller falls back to zarr, so plain zarr stays the reference reader. Each process
keeps a few recently used shard files mapped with their parsed index (``_OpenShards``),
checked against ``os.stat`` on every use so a shard rewritten by a writer (zarr writes a
temporary file and renames it) is never read through a stale mapping.
"""

from __future__ import annotations

import json
import mmap
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Inner-chunk marker of the sharding codec for "not written" (zarr-specs sharding v1.0).
_EMPTY_INT = 2**64 - 1
_SMALL_ROW = 16384  # bytes; below this the per-row Python loop costs more than the copy
# Data types whose little-endian bytes numpy reads as is (bool is one byte 0/1 in Zarr v3).
_DTYPES = ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "float16", "float32")


@dataclass(frozen=True)
class ArrayPlan:
    """How to read rows of one row-sharded array directly from its shard files."""

    root: Path  # the array's folder (holds zarr.json and the chunk files)
    shape: tuple[int, ...]
    dtype: np.dtype
    fill_value: Any
    rows_per_shard: int
    separator: str  # chunk key separator of the "default" chunk key encoding
    zstd: bool  # inner chunks are zstd-compressed
    index_at_end: bool
    index_crc: bool

    @property
    def row_nbytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def shard_file(self, shard: int) -> str:
        """Path of shard ``shard``'s file ("default" chunk key encoding: c/<shard>/0/...)."""
        # plain strings: pathlib costs more than the stat and the copy of a small row
        tail = self.separator.join(["c", str(shard)] + ["0"] * (len(self.shape) - 1))
        return f"{self.root}{os.sep}{tail}"


def plan_array(array_dir: str | Path) -> ArrayPlan | None:
    """An :class:`ArrayPlan` for a local Zarr v3 array this module can read, else ``None``.

    Supported: one ``sharding_indexed`` codec whose shards span whole rows and whose inner
    chunks are single rows, inner codecs ``bytes`` (+ optional ``zstd``), index codecs
    ``bytes`` little-endian (+ optional ``crc32c``), a plain numeric/bool dtype.
    """
    root = Path(array_dir)
    try:
        meta = json.loads((root / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    try:
        shape = tuple(int(n) for n in meta["shape"])
        if meta.get("zarr_format") != 3 or meta.get("storage_transformers") or not shape:
            return None
        if meta["data_type"] not in _DTYPES or not isinstance(meta["fill_value"], (int, float)):
            return None
        dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        cke = meta["chunk_key_encoding"]
        if cke["name"] != "default":
            return None
        separator = cke.get("configuration", {}).get("separator", "/")
        shard_shape = meta["chunk_grid"]["configuration"]["chunk_shape"]
        (codec,) = meta["codecs"]
        if codec["name"] != "sharding_indexed":
            return None
        conf = codec["configuration"]
        if list(shard_shape[1:]) != list(shape[1:]) or list(conf["chunk_shape"]) != [
            1,
            *shape[1:],
        ]:
            return None
        inner = [c["name"] for c in conf["codecs"]]
        if inner not in (["bytes"], ["bytes", "zstd"]):
            return None
        endian = conf["codecs"][0].get("configuration", {}).get("endian", "little")
        if endian != "little" and dtype.itemsize > 1:
            return None
        index = [c["name"] for c in conf["index_codecs"]]
        index_endian = conf["index_codecs"][0].get("configuration", {}).get("endian", "little")
        if index not in (["bytes"], ["bytes", "crc32c"]) or index_endian != "little":
            return None
        return ArrayPlan(
            root=root,
            shape=shape,
            dtype=dtype,
            fill_value=meta["fill_value"],
            rows_per_shard=int(shard_shape[0]),
            separator=separator,
            zstd=inner[-1] == "zstd",
            index_at_end=conf.get("index_location", "end") == "end",
            index_crc=index[-1] == "crc32c",
        )
    except (KeyError, TypeError, ValueError):
        return None  # metadata we do not understand: zarr reads it


def _read_index(fd: int, size_on_disk: int, plan: ArrayPlan, path: str) -> np.ndarray:
    """The shard's ``(rows_per_shard, 2)`` uint64 index of (offset, nbytes)."""
    n = plan.rows_per_shard
    size = 16 * n + (4 if plan.index_crc else 0)
    start = size_on_disk - size if plan.index_at_end else 0
    raw = os.pread(fd, size, max(start, 0))
    if start < 0 or len(raw) != size:
        raise OSError(f"shard file {path} is shorter than its index ({size} bytes)")
    if plan.index_crc:
        import google_crc32c  # what zarr's crc32c codec uses

        if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise OSError(f"shard index checksum mismatch in {path}")
        raw = raw[:-4]
    return np.frombuffer(raw, dtype="<u8").reshape(n, 2)


class _OpenShards:
    """This process's recently used shard files, memory-mapped, with their parsed indexes.

    A small LRU. An entry is reused only while ``os.stat`` of the path still shows the same
    file (inode, size, mtime): zarr replaces a rewritten shard by renaming a new file over
    it, so a rewrite is noticed and the new file mapped; the old mapping keeps the old inode
    alive and is dropped. After ``fork`` the child drops the parent's entries and starts
    afresh; ``spawn`` starts empty anyway. Mapping instead of ``pread`` turns each row into
    a plain memcpy from the page cache (measured ~2x faster for 128 kB rows).
    """

    def __init__(self, max_open: int = 128) -> None:
        self.max_open = max_open
        self.pid = os.getpid()
        self.files: OrderedDict[str, tuple[tuple[int, int, int], np.ndarray, np.ndarray]] = (
            OrderedDict()
        )

    def get(self, path: str, plan: ArrayPlan) -> tuple[np.ndarray, np.ndarray] | None:
        """``(file bytes, index)`` of the shard file at ``path``; None if it does not exist."""
        if self.pid != os.getpid():
            self.files = OrderedDict()  # mappings inherited through fork: not ours to use
            self.pid = os.getpid()
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        hit = self.files.get(path)
        if hit is not None and hit[0] == key:
            self.files.move_to_end(path)
            return hit[1], hit[2]
        self.files.pop(path, None)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            index = _read_index(fd, size, plan, path)
            data = np.frombuffer(mmap.mmap(fd, size, prot=mmap.PROT_READ), dtype=np.uint8)
        finally:
            os.close(fd)  # the mapping keeps its own reference to the file
        self.files[path] = (key, data, index)
        while len(self.files) > self.max_open:
            self.files.popitem(last=False)  # unmapped once no batch refers to it
        return data, index


_OPEN = _OpenShards()


def _zstd() -> Any:
    from numcodecs.zstd import Zstd  # the decoder zarr's ZstdCodec wraps

    return Zstd()


def cast_into(out: np.ndarray, src: np.ndarray) -> None:
    """``out[...] = src`` with a dtype cast (e.g. float16 -> float32), on this thread.

    torch's vectorised float16 -> float32 conversion runs ~4x faster than numpy's (0.43 vs
    1.78 ms for a 32 x 50 x 1280 batch on this machine's AVX-512 CPU, numpy 2.4.6, torch
    2.14.1). Unless torch is single-threaded already (as in DataLoader workers), it is done
    in pieces below torch's parallel grain size (32768 elements) so it stays on this thread:
    a multi-threaded copy contends with everything else on a busy machine (medians 100x
    slower on the shared 2-core box). numpy is the fallback when torch is missing or lacks
    the dtype.
    """
    try:
        import torch

        dst = torch.from_numpy(out).reshape(-1)
        s = torch.from_numpy(src).reshape(-1)
    except (ImportError, TypeError):
        np.copyto(out, src, casting="safe")
        return
    if torch.get_num_threads() == 1:  # DataLoader workers: one call, no pieces needed
        dst.copy_(s)
        return
    for d, x in zip(dst.split(32768), s.split(32768), strict=True):
        d.copy_(x)


def _gather(
    data: np.ndarray, entries: np.ndarray, group: np.ndarray, flat: np.ndarray, nb: int
) -> bool:
    """Copy small uncompressed rows (e.g. prompt masks) with one fancy-indexing call when the
    shard stores whole rows at multiples of the row size (what zarr writes for a shard of
    uncompressed rows: chunks back to back from offset 0) and ``group`` is a run of
    consecutive output rows (sorted reads); returns False to let the caller go row by row
    (which is as fast for rows of many kB: the copy dominates, not the loop)."""
    offsets, lengths = entries[:, 0], entries[:, 1]
    if nb > _SMALL_ROW or len(group) < 2 or group[-1] - group[0] != len(group) - 1:
        return False
    if (offsets == _EMPTY_INT).any():
        return False
    if (lengths != nb).any() or (offsets % nb).any() or offsets.max() + nb > len(data):
        return False
    rows_view = data[: len(data) // nb * nb].reshape(-1, nb)
    flat[group[0] : group[-1] + 1] = rows_view[(offsets // nb).astype(np.intp)]
    return True


def read_rows(
    plan: ArrayPlan,
    rows: np.ndarray,
    out: np.ndarray | None = None,
    dtype: np.dtype | type | str | None = None,
) -> np.ndarray:
    """Rows ``rows`` (int, any order, repeats allowed) of the array, as ``(len(rows), ...)``.

    ``dtype`` (default: the stored one) casts the batch, for lossless ("safe") casts only,
    e.g. float16 -> float32 (see :func:`cast_into`).
    ``out`` (C-contiguous, ``dtype``, the right shape) is filled in place if given.
    Raises ``OSError`` for a damaged shard (bad index, short read); ``IndexError`` for rows
    outside the array.
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    want = (len(rows), *plan.shape[1:])
    dtype = plan.dtype if dtype is None else np.dtype(dtype)
    if not np.can_cast(plan.dtype, dtype, casting="safe"):
        raise ValueError(f"cannot cast {plan.dtype} rows of {plan.root} to {dtype} losslessly")
    if out is None:
        out = np.empty(want, dtype=dtype)
    elif out.shape != want or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous {dtype} of shape {want}")
    if len(rows) == 0:
        return out
    if dtype != plan.dtype:
        cast_into(out, read_rows(plan, rows))
        return out
    if rows.min() < 0 or rows.max() >= plan.shape[0]:
        raise IndexError(f"rows outside [0, {plan.shape[0]}) of {plan.root}")
    nb = plan.row_nbytes
    flat = out.reshape(len(rows), -1).view(np.uint8)
    S = plan.rows_per_shard
    shard_of = rows // S
    order = np.argsort(shard_of, kind="stable")  # one index lookup per shard file
    bounds = np.flatnonzero(np.diff(shard_of[order])) + 1
    codec = _zstd() if plan.zstd else None
    for group in np.split(order, bounds):
        shard = int(shard_of[group[0]])
        path = plan.shard_file(shard)
        got = _OPEN.get(path, plan)
        if got is None:
            out[group] = plan.fill_value  # shard never written
            continue
        data, index = got
        size = len(data)
        entries = index[rows[group] - shard * S]
        if codec is None and _gather(data, entries, group, flat, nb):
            continue
        # plain ints: numpy scalars in this per-row loop cost more than the reads themselves
        for j, offset, length in zip(group.tolist(), *entries.T.tolist(), strict=True):
            if offset == _EMPTY_INT:
                out[j] = plan.fill_value  # inner chunk never written (all fill value)
                continue
            if offset + length > size or (codec is None and length != nb):
                raise OSError(f"row {rows[j]} of {path} points outside the file or is mis-sized")
            if codec is None:
                flat[j] = data[offset : offset + nb]
            else:
                codec.decode(data[offset : offset + length], out=flat[j])
    return out
