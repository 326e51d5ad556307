"""The Zarr v3 feature store: the contract between the cache pipeline and the trainer.

Layout on disk (one directory)::

    features.zarr/
      zarr.json                 root group; attributes["gap3d"] = manifest (store_manifest.py)
      image_tokens/ ...         (N, T, C) float16 | int8, one Zarr shard per pipeline shard
      image_scale/ ...          (N, T) float32, int8 stores only (store_codec.py)
      prompt_latents/ ...       (N, L, D) float16
      prompt_mask/, thumbnail/, valid/, caption/, key/, url/, split/, meta/, reason/
      stats/                    per-role channel mean/std written by finalize() (store_stats.py)
      _commits/shard-000012.json  commit markers, written last

Rows ``[s*S, (s+1)*S)`` belong to pipeline shard ``s``; big arrays use Zarr v3 sharding with
one sample per inner chunk and exactly one Zarr shard per pipeline shard, small per-sample
columns use one chunk per pipeline shard. So each writer (one Dask task per shard) owns its
files outright and readers can fetch single samples. A shard counts only once its marker
exists; ``write_shard`` removes the marker, rewrites the region, then writes the marker.

The arrays the trainer reads are uncompressed by default (``StoreSpec.compression``, recorded
in the manifest and in each array's Zarr metadata) and :meth:`FeatureStore.read` gathers
their rows straight from the shard files (``store_fastread.py``); everything else, and any
array that reader does not understand, is read through zarr-python. The store stays a plain
Zarr v3 group either way. ``GAP3D_STORE_FASTREAD=0`` reads everything through zarr.
"""

from __future__ import annotations

import asyncio
import json
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

# zarr's own runner for its background event loop (what every sync zarr call uses).
from zarr.core.sync import sync as zarr_sync

from gap3d.layout import TokenLayout
from gap3d.store import fastread as store_fastread
from gap3d.store import stats as store_stats
from gap3d.store.codec import FLOAT16_SCHEME, decode_tokens
from gap3d.store.files import (
    COMMIT_DIR,
    broken,
    create_store,
    list_markers,
    load_manifest,
    marker_path,
    write_marker,
)
from gap3d.store.manifest import (
    MANIFEST_KEY,
    SPLITS,
    StoreError,
    StoreSpec,
    build_manifest_keys,
    incompatibilities,
    spec_from_manifest,
)
from gap3d.store.shard import ShardData, check_shard, shard_region

__all__ = ["FeatureStore", "ShardData", "StoreError", "StoreSpec", "StaleStatsWarning"]

_TEXT_ARRAYS = ("caption", "key", "url", "split", "meta", "reason")
READ_FIELDS = (
    "image_tokens",
    "prompt_latents",
    "prompt_mask",
    "thumbnail",
    "valid",
    "caption",
    "key",
    "url",
    "split",
    "meta",
    "reason",
)


class StaleStatsWarning(UserWarning):
    """The store's statistics do not cover every committed shard (run ``finalize()``)."""


class FeatureStore:
    """Reader and writer of one feature store; safe to pickle into DataLoader workers."""

    def __init__(self, path: str | Path, mode: str = "r") -> None:
        if mode not in ("r", "r+"):
            raise StoreError(f"FeatureStore mode must be 'r' or 'r+', got {mode!r}")
        self.path = Path(path)
        self.mode = mode
        self._pid: int | None = None
        self._group: Any = None
        self._arrays: dict[str, Any] = {}
        self._plans: dict[str, store_fastread.ArrayPlan | None] = {}
        self.manifest: dict[str, Any] = load_manifest(self.path)
        self._validate_arrays()

    # ---------------------------------------------------------------- opening and creating
    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> FeatureStore:
        """Open an existing store; refuses non-stores, half-created stores, other schemas."""
        return cls(path, mode)

    @classmethod
    def create(cls, path: str | Path, spec: StoreSpec) -> FeatureStore:
        """Create an empty store (atomically: see ``store_files.create_store``)."""
        path = Path(path)
        create_store(path, spec)
        return cls(path, "r+")

    @classmethod
    def open_or_create(cls, path: str | Path, spec: StoreSpec) -> FeatureStore:
        """Open ``path`` for writing if it holds a compatible store, else create it.

        Refuses (``StoreError``) a store whose encoders, layout, prompt shape, encoding,
        template or shard size differ; grows the store when ``spec`` has more shards.
        """
        path = Path(path)
        if not path.exists() or (path.is_dir() and not any(path.iterdir())):
            try:
                return cls.create(path, spec)
            except FileExistsError:
                pass  # lost a creation race; fall through and check the winner's store
        store = cls.open(path, "r+")
        problems = incompatibilities(spec_from_manifest(store.manifest), spec)
        if problems:
            lines = "; ".join(f"{f}: store has {a!r}, asked for {b!r}" for f, a, b in problems)
            raise StoreError(
                f"{path} holds features that cannot be mixed with the requested ones ({lines}). "
                "Use a new store path (store.path=...) or delete the old store."
            )
        if spec.n_shards > store.n_shards:
            store.grow(spec.n_shards)
        return store

    def _validate_arrays(self) -> None:
        for name, a in self.manifest["arrays"].items():
            try:
                arr = self.raw(name)
            except Exception as e:
                raise broken(self.path, f"array '{name}' is missing or unreadable ({e})") from e
            # More rows than the manifest says is what an interrupted grow() leaves behind:
            # harmless (rows past n_rows are never read) and repaired by growing again.
            if list(arr.shape[1:]) != list(a["shape"][1:]) or arr.shape[0] < a["shape"][0]:
                raise broken(
                    self.path, f"array '{name}' has shape {arr.shape}, manifest says {a['shape']}"
                )
        if not (self.path / COMMIT_DIR).is_dir():
            raise broken(self.path, f"the commit folder {COMMIT_DIR}/ is missing")

    # ---------------------------------------------------------------- per-process handles
    def raw(self, name: str) -> Any:
        """The underlying Zarr array ``name`` (stored encoding), opened in this process."""
        # zarr v3 drives I/O from a background event loop; handles are reopened in each new
        # process (fork or spawn) instead of being shared with the parent.
        if self._pid != os.getpid():
            self._group = zarr.open_group(str(self.path), mode=self.mode, zarr_format=3)
            self._arrays = {}
            self._pid = os.getpid()
        if name not in self._arrays:
            self._arrays[name] = self._group[name]
        return self._arrays[name]

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "mode": self.mode, "manifest": self.manifest}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = Path(state["path"])
        self.mode = state["mode"]
        self.manifest = state["manifest"]
        self._pid, self._group, self._arrays, self._plans = None, None, {}, {}

    # ---------------------------------------------------------------- properties
    @property
    def layout(self) -> TokenLayout:
        return TokenLayout.from_dict(self.manifest["layout"])

    @property
    def prompt_dim(self) -> int:
        return int(self.manifest["prompt_dim"])

    @property
    def prompt_max_length(self) -> int:
        return int(self.manifest["prompt_max_length"])

    @property
    def n_shards(self) -> int:
        return int(self.manifest["n_shards"])

    @property
    def samples_per_shard(self) -> int:
        return int(self.manifest["samples_per_shard"])

    @property
    def encoding(self) -> str:
        return str(self.manifest["encoding"])

    def __len__(self) -> int:
        """Number of rows (``n_shards * samples_per_shard``); use :meth:`indices` for samples."""
        return int(self.manifest["n_rows"])

    def __repr__(self) -> str:
        return (
            f"FeatureStore({str(self.path)!r}, rows={len(self)}, shards={self.n_shards}, "
            f"encoding={self.encoding}, committed={len(self.committed_shards())})"
        )

    # ---------------------------------------------------------------- commits
    def _marker_path(self, shard_id: int) -> Path:
        return marker_path(self.path, shard_id)

    def _check_shard(self, shard_id: int) -> int:
        if not isinstance(shard_id, (int, np.integer)) or not 0 <= shard_id < self.n_shards:
            raise StoreError(
                f"shard id {shard_id!r} is outside [0, {self.n_shards}) of {self.path}"
            )
        return int(shard_id)

    def is_committed(self, shard_id: int) -> bool:
        return self._marker_path(self._check_shard(shard_id)).is_file()

    def committed_shards(self) -> list[int]:
        return list_markers(self.path, self.n_shards)

    def missing_shards(self) -> list[int]:
        done = set(self.committed_shards())
        return [s for s in range(self.n_shards) if s not in done]

    def commit_info(self, shard_id: int) -> dict[str, Any]:
        """The commit marker of a shard (n_samples, n_valid, reasons, splits, written)."""
        p = self._marker_path(self._check_shard(shard_id))
        try:
            return json.loads(p.read_text())
        except FileNotFoundError:
            raise StoreError(f"shard {shard_id} of {self.path} is not committed") from None

    def invalid_counts(self) -> dict[str, int]:
        """``{reason: count}`` over all committed shards."""
        total: Counter[str] = Counter()
        for s in self.committed_shards():
            total.update(self.commit_info(s)["reasons"])
        return dict(sorted(total.items(), key=lambda kv: (-kv[1], kv[0])))

    # ---------------------------------------------------------------- writing
    def write_shard(self, shard_id: int, data: ShardData) -> dict[str, Any]:
        """Write shard ``shard_id``'s region, then its commit marker; returns the marker.

        Idempotent: re-writing a shard replaces its region and marker. Samples with
        non-finite features are stored as invalid (see ``store_shard.shard_region``).
        """
        if self.mode != "r+":
            raise StoreError(f"{self.path} is open read-only; open it with mode='r+' to write")
        shard_id = self._check_shard(shard_id)
        S = self.samples_per_shard
        check_shard(
            data,
            self.layout,
            self.prompt_max_length,
            self.prompt_dim,
            S,
            where=f"shard {shard_id} of {self.path}",
        )
        region, counts = shard_region(data, self.encoding, S)
        marker = self._marker_path(shard_id)
        marker.unlink(missing_ok=True)  # uncommitted while the region is being replaced
        lo = shard_id * S
        for name, values in region.items():
            self.raw(name)[lo : lo + S] = values
        info = write_marker(self.path, shard_id, counts)
        return info

    def grow(self, n_shards: int) -> None:
        """Make room for more shards (existing rows and markers are untouched).

        Arrays are resized first and the manifest last, so an interrupted grow leaves a
        readable store of the old size; growing again finishes the job.
        """
        if self.mode != "r+":
            raise StoreError(f"{self.path} is open read-only; open it with mode='r+' to grow it")
        if n_shards <= self.n_shards:
            return
        rows = n_shards * self.samples_per_shard
        arrays = dict(self.manifest["arrays"])
        for name, a in arrays.items():
            arr = self.raw(name)
            arr.resize((rows, *arr.shape[1:]))
            arrays[name] = {**a, "shape": [rows, *a["shape"][1:]]}
        m = {**self.manifest, "n_shards": n_shards, "n_rows": rows, "arrays": arrays}
        self._group.update_attributes({MANIFEST_KEY: m})
        self.manifest = m
        self._plans = {}  # shapes changed

    def annotate(self, key: str, value: Any) -> None:
        """Record ``value`` (JSON-able) under ``manifest[key]``, e.g. a run summary.

        Keys that describe how to read the store cannot be changed this way.
        """
        if self.mode != "r+":
            raise StoreError(f"{self.path} is open read-only; open it with mode='r+' to annotate")
        if key in build_manifest_keys():
            raise StoreError(f"manifest key {key!r} describes the store and cannot be overwritten")
        json.dumps(value)  # fail here, not inside zarr, for values JSON cannot hold
        self.raw("valid")  # opens the group in this process
        m = {**load_manifest(self.path), key: value}
        self._group.update_attributes({MANIFEST_KEY: m})
        self.manifest = m

    # ---------------------------------------------------------------- reading
    def indices(
        self, valid_only: bool = True, committed_only: bool = True, split: str | None = None
    ) -> np.ndarray:
        """Row indices (int64, sorted) of samples: rows ``< n_samples`` of committed shards."""
        if split is not None and split not in SPLITS:
            raise StoreError(f"split must be one of {SPLITS} or None, got {split!r}")
        S = self.samples_per_shard
        if committed_only:
            parts = [
                np.arange(s * S, s * S + self.commit_info(s)["n_samples"])
                for s in self.committed_shards()
            ]
            rows = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        else:
            rows = np.arange(len(self))
        rows = rows.astype(np.int64)
        if valid_only and len(rows):
            rows = rows[np.asarray(self.raw("valid")[:], dtype=bool)[rows]]
        if split is not None and len(rows):
            rows = rows[np.asarray(self.raw("split")[:])[rows] == split]
        return rows

    def read(
        self, idx: int | Sequence[int] | np.ndarray, fields: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """Read and decode rows.

        ``idx`` an int gives one sample without a batch axis (numpy semantics); a list or
        array gives a batch in the order asked. Tensors come back as float32 (tokens decoded
        with the manifest's rule), ``prompt_mask`` bool, ``meta`` as dicts, plus ``index``.
        ``fields`` limits what is read (default: everything in ``READ_FIELDS``).
        """
        arr_idx = np.asarray(idx)
        scalar = arr_idx.ndim == 0
        flat = arr_idx.reshape(-1)
        if flat.size and not np.issubdtype(flat.dtype, np.integer):
            raise StoreError(f"read() needs integer row indices, got dtype {flat.dtype}")
        flat = flat.astype(np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise StoreError(f"row index out of range [0, {len(self)}) in read({idx!r})")
        fields = tuple(fields) if fields is not None else READ_FIELDS
        unknown = sorted(set(fields) - set(READ_FIELDS))
        if unknown:
            raise StoreError(f"unknown fields {unknown}; available: {READ_FIELDS}")
        names = [n for n in fields if n in self.manifest["arrays"]]
        if "image_tokens" in fields and "image_scale" in self.manifest["arrays"]:
            names.append("image_scale")
        # Read each row once, sorted, then restore the order asked for.
        uniq, inverse = np.unique(flat, return_inverse=True)
        # Where the manifest's decode rule is a plain float16 -> float32 cast, the direct
        # reader casts row by row as it reads (one pass over the batch instead of two).
        cast = {"prompt_latents": np.float32}
        if self.manifest["image_tokens_encoding"].get("scheme") == FLOAT16_SCHEME:
            cast["image_tokens"] = np.float32
        raw = self._fetch(names, uniq, cast)
        in_order = len(uniq) == len(flat) and bool(np.all(uniq == flat))

        def fetch(name: str) -> np.ndarray:
            # the trainer asks for sorted unique rows: skip a gather copy of the batch
            return raw[name] if in_order else raw[name][inverse]

        out: dict[str, Any] = {}
        for name in fields:
            if name == "image_tokens":
                stored = {k: fetch(k) for k in ("image_tokens", "image_scale") if k in raw}
                out[name] = decode_tokens(stored, self.manifest["image_tokens_encoding"])
            elif name == "prompt_latents":
                out[name] = fetch(name).astype(np.float32, copy=False)
            elif name in ("prompt_mask", "valid"):
                out[name] = fetch(name).astype(bool, copy=False)
            elif name == "meta":
                out[name] = [json.loads(t) if t else {} for t in map(str, fetch(name).tolist())]
            elif name in _TEXT_ARRAYS:
                out[name] = [str(t) for t in fetch(name).tolist()]
            else:
                out[name] = fetch(name)
        out["index"] = flat
        if scalar:
            out = {k: v[0] for k, v in out.items()}
        return out

    def _plan(self, name: str) -> store_fastread.ArrayPlan | None:
        """The direct-read plan of array ``name`` (None: read it through zarr)."""
        if name not in self._plans:
            off = os.environ.get("GAP3D_STORE_FASTREAD", "1") == "0"  # for A/B benchmarks
            self._plans[name] = None if off else store_fastread.plan_array(self.path / name)
        return self._plans[name]

    def _fetch(
        self, names: list[str], rows: np.ndarray, cast: dict[str, Any] | None = None
    ) -> dict[str, np.ndarray]:
        """Rows (sorted, unique) of several arrays; ``cast``: {name: dtype} the direct reader
        may cast rows to while reading (zarr-read arrays come back as stored).

        Row-sharded arrays the direct reader understands (``store_fastread``: uncompressed or
        zstd inner chunks) are gathered from their shard files without zarr-python; the rest
        go to zarr as one batch of concurrent reads (each run of consecutive rows is one
        slice request, all requests of all arrays go to zarr's event loop together; on demo
        features this took ~40 ms per random batch of 32 rows where ``Array.oindex`` took
        ~130 ms). A damaged shard file is left to zarr, which reports it its own way.
        """
        out: dict[str, np.ndarray] = {}
        for n in names:
            plan = self._plan(n)
            if plan is not None and rows.size:
                try:
                    out[n] = store_fastread.read_rows(plan, rows, dtype=(cast or {}).get(n))
                except OSError:
                    pass
        rest = [n for n in names if n not in out]
        if rows.size == 0:
            for n in rest:
                out[n] = np.zeros((0, *self.raw(n).shape[1:]), dtype=self.raw(n).dtype)
            return out
        if rest:
            out.update(self._fetch_zarr(rest, rows))
        return out

    def _fetch_zarr(self, names: list[str], rows: np.ndarray) -> dict[str, np.ndarray]:
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(rows, breaks)]
        arrays = [self.raw(n).async_array for n in names]

        async def one(a: Any) -> np.ndarray:
            parts = await asyncio.gather(*(a.getitem(slice(lo, hi)) for lo, hi in runs))
            return np.concatenate([np.asarray(p) for p in parts])

        async def everything() -> list[np.ndarray]:
            return await asyncio.gather(*(one(a) for a in arrays))

        return dict(zip(names, zarr_sync(everything()), strict=True))

    # ---------------------------------------------------------------- statistics
    def finalize(self, progress: bool = True) -> dict[str, np.ndarray]:
        """Compute per-role channel mean/std over valid committed samples and store them."""
        if self.mode != "r+":
            raise StoreError(f"{self.path} is open read-only; open it with mode='r+' to finalize")
        stats, info = store_stats.compute(self, progress=progress)
        store_stats.save(self.path, stats, info)
        return stats

    def stats_info(self) -> dict[str, Any] | None:
        """What the stored statistics cover (shards, samples, time) and whether they are stale."""
        info = store_stats.load_info(self.path)
        if info is None:
            return None
        committed = self.committed_shards()
        newest = max((self.commit_info(s)["written"] for s in committed), default=0.0)
        info["stale"] = sorted(info["shards"]) != committed or newest > info["computed"]
        return info

    @property
    def stats(self) -> dict[str, np.ndarray]:
        """``{cls,register,patch}_{mean,std}`` (C,) float64; roles without tokens are omitted."""
        info = self.stats_info()
        if info is None:
            raise StoreError(
                f"{self.path} has no statistics yet; run store.finalize() "
                "(`gap3d cache` does it at the end)"
            )
        if info["stale"]:
            warnings.warn(
                f"{self.path}: statistics cover shards {info['shards']} but the committed "
                "shards changed since; run finalize() again",
                StaleStatsWarning,
                stacklevel=2,
            )
        return store_stats.load(self.path)
