"""Batched row reads of the store's arrays, through one of three backends.

A random training batch touches one inner chunk per row in each of three arrays.

* ``tensorstore`` (object stores: ``s3``, ``gcs``; any local store): the ``zarr3`` driver
  reads a whole index array of rows in one call, concurrently, in C++. zarr-python pays a
  fixed cost per read call (event loop round trip, codec pipeline set-up) that dominates such
  small reads; tensorstore does not.
* ``fastread`` (local stores, the default there): ``fastread.py`` gathers rows from the
  memory-mapped shard files. On local disk tensorstore's per-chunk overhead made it several
  times slower than a plain memory map (``benchmarks/store.py`` measures all readers side by
  side), so local stores keep this reader; every other access goes through a library.
* ``zarr``: zarr-python, for ``memory://`` stores (zarr's in-process memory filesystem has no
  tensorstore equivalent) and for a process that will fork DataLoader workers while reading an
  object store: tensorstore runs internal threads and aborts a process that forks after using
  it, so such a parent reads through zarr and leaves tensorstore to its workers.

All read the same Zarr v3 arrays; the store stays plain Zarr.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Literal

import numpy as np
from zarr.core.sync import sync as zarr_sync

from gap3d.store.location import StoreLocation

Backend = Literal["auto", "fastread", "tensorstore", "zarr"]
BACKENDS = ("auto", "fastread", "tensorstore", "zarr")
_TS_USED_PID: int | None = None  # the process that opened tensorstore arrays, if any


def _before_fork() -> None:
    if _TS_USED_PID == os.getpid():
        print(
            "gap3d: this process read the feature store through tensorstore and is now "
            "forking; tensorstore cannot survive a fork. Use train.multiprocessing_context="
            "spawn (or forkserver), or open the store with reader='zarr' in the parent.",
            flush=True,
        )


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork)


def resolve_backend(location: StoreLocation, backend: str) -> str:
    """``auto`` -> fastread for local stores, tensorstore for object stores, zarr for
    ``memory://``; ``GAP3D_STORE_READER`` overrides ``auto`` (benchmarks, debugging)."""
    if backend not in BACKENDS:
        raise ValueError(f"store reader must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("GAP3D_STORE_READER", "auto")
    if location.is_memory:
        return "zarr"
    if backend == "auto":
        return "fastread" if location.is_local else "tensorstore"
    if backend == "fastread" and not location.is_local:
        return "tensorstore"  # the direct reader only knows local files
    return backend


def fork_safe(backend: str) -> str:
    """The backend a process that will fork should use itself (tensorstore cannot fork)."""
    return "zarr" if backend == "tensorstore" else backend


class RowReader:
    """Reads sorted, unique rows of several arrays of one store in one concurrent batch.

    Opened per process (handles never cross a fork); ``arrays`` maps names to zarr array
    objects of this process (for the zarr path and for shapes).
    """

    def __init__(self, location: StoreLocation, backend: str) -> None:
        self.location = location
        self.backend = resolve_backend(location, backend)
        self._ts: dict[tuple[str, str | None], Any] = {}
        self._ts_context: Any = None
        self._plans: dict[str, Any] = {}

    # ------------------------------------------------------------------ fastread
    def _plan(self, name: str) -> Any:
        if name not in self._plans:
            from gap3d.store import fastread

            self._plans[name] = fastread.plan_array(f"{self.location.path}/{name}")
        return self._plans[name]

    # ------------------------------------------------------------------ tensorstore
    def _ts_array(self, name: str, cast: str | None) -> Any:
        global _TS_USED_PID
        key = (name, cast)
        if key not in self._ts:
            import tensorstore as ts

            if self._ts_context is None:
                # Training reads each row about once per epoch, in random order, so caching
                # chunks buys nothing locally; on object stores a small pool keeps the shard
                # indexes (one extra request per row otherwise: ~25 % of a loopback S3's rate).
                limit = 0 if self.location.is_local else 64 * 2**20
                self._ts_context = ts.Context({"cache_pool": {"total_bytes_limit": limit}})
            _quiet_aws_config()
            base = self._ts.get((name, None))
            if base is None:
                spec = {"driver": "zarr3", "kvstore": self.location.tensorstore_kvstore(name)}
                base = ts.open(spec, read=True, context=self._ts_context).result()
                self._ts[(name, None)] = base
            _TS_USED_PID = os.getpid()
            self._ts[key] = base if cast is None else ts.cast(base, cast)
        return self._ts[key]

    def _read_ts(
        self, names: list[str], rows: np.ndarray, cast: dict[str, Any]
    ) -> dict[str, np.ndarray]:
        futures = {}
        for n in names:
            c = cast.get(n)
            t = self._ts_array(n, np.dtype(c).name if c is not None else None)
            futures[n] = t[rows].read()  # all arrays in flight at once
        return {n: f.result() for n, f in futures.items()}

    # ------------------------------------------------------------------ zarr
    @staticmethod
    def _read_zarr(arrays: dict[str, Any], names: list[str], rows: np.ndarray) -> dict:
        """Each run of consecutive rows is one slice request; all requests of all arrays go
        to zarr's event loop together."""
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(rows, breaks)]
        handles = [arrays[n].async_array for n in names]

        async def one(a: Any) -> np.ndarray:
            parts = await asyncio.gather(*(a.getitem(slice(lo, hi)) for lo, hi in runs))
            return np.concatenate([np.asarray(p) for p in parts])

        async def everything() -> list[np.ndarray]:
            return await asyncio.gather(*(one(a) for a in handles))

        return dict(zip(names, zarr_sync(everything()), strict=True))

    # ------------------------------------------------------------------ public
    def read(
        self,
        arrays: dict[str, Any],
        names: list[str],
        rows: np.ndarray,
        cast: dict[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:
        """Rows ``rows`` (sorted, unique int64) of ``names`` ({name: zarr array of this process}
        in ``arrays``). ``cast`` ({name: dtype}) is applied while reading where the backend can
        (tensorstore); callers cast the rest. Text arrays always go through zarr (tensorstore
        has no variable-length string type)."""
        cast = cast or {}
        if rows.size == 0:
            return {
                n: np.zeros((0, *arrays[n].shape[1:]), dtype=cast.get(n, arrays[n].dtype))
                for n in names
            }
        if self.backend == "zarr":
            return self._read_zarr(arrays, names, rows)
        text = [n for n in names if arrays[n].dtype.kind in ("O", "U", "T")]
        numeric = [n for n in names if n not in text]
        out: dict[str, np.ndarray] = {}
        if self.backend == "fastread":
            from gap3d.store import fastread

            for n in list(numeric):
                plan = self._plan(n)
                if plan is not None:
                    try:
                        out[n] = fastread.read_rows(plan, rows, dtype=cast.get(n))
                        numeric.remove(n)
                    except OSError:
                        pass  # a damaged file: zarr reads it and reports it its own way
            text += numeric  # arrays the direct reader does not understand
        else:
            out = self._read_ts(numeric, rows, cast)
        if text:
            out.update(self._read_zarr(arrays, text, rows))
        return out

    def reset(self) -> None:
        """Forget opened arrays (after the store grew: shapes changed)."""
        self._ts, self._plans = {}, {}


def _quiet_aws_config() -> None:
    """tensorstore's AWS SDK logs an error line per process when ~/.aws/config is absent; point
    it at an empty file then (credentials still come from the environment or a profile)."""
    for var, name in (
        ("AWS_CONFIG_FILE", "config"),
        ("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
    ):
        if var not in os.environ and not os.path.exists(os.path.expanduser(f"~/.aws/{name}")):
            os.environ[var] = os.devnull
