"""The Zarr v3 feature store: the contract between the cache pipeline and the trainer.

A store is addressed by a URL (local path, ``file://``, ``s3://``, ``gs://``, ``memory://``;
see ``location.py``) and is one Zarr v3 group::

    features.zarr/
      zarr.json                  root group; attributes["gap3d"] = manifest (manifest.py)
      image_tokens/              (N, T, C) float16 | int8, files of rows_per_file rows
      image_scale/               (N, T) float32, int8 stores only (codec.py)
      prompt_latents/            (N, L, D) float16;  prompt_mask/ (N, L) bool
      thumbnail/                 (N, 64, 64, 3) uint8
      valid/ split/              (N,) bool / int8 code; one chunk per pipeline shard
      caption/ key/ url/ meta/ reason/   (N,) text; one chunk per pipeline shard
      moments/mean, moments/m2   (n_shards, 3 roles, C) float64: partial moments (stats.py)
      commits/shard-000012/      commit record of shard 12 (commits.py), written last

Rows ``[s*S, (s+1)*S)`` belong to pipeline shard ``s``. Every file belongs to exactly one
pipeline shard, so one writer (one Dask task per shard) owns its files outright; a shard
counts only once its commit record exists, and the record is written last (``writer.py``).
Reads of the big arrays go through tensorstore or zarr-python (``reader.py``); everything else
goes through zarr's storage layer. Other Zarr v3 readers open the store as a plain hierarchy.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from gap3d.layout import TokenLayout
from gap3d.store import commits
from gap3d.store.codec import FLOAT16_SCHEME, decode_tokens
from gap3d.store.index import StoreIndex
from gap3d.store.lifecycle import broken, create_store, load_manifest, unfinished
from gap3d.store.location import StoreLocation
from gap3d.store.manifest import (
    MANIFEST_KEY,
    SPLITS,
    StoreError,
    StoreSpec,
    build_manifest_keys,
    incompatibilities,
    spec_from_manifest,
)
from gap3d.store.reader import RowReader, resolve_backend
from gap3d.store.shard import ShardData
from gap3d.store.stats import Moments, merge_shards
from gap3d.store.writer import ShardWriter

__all__ = ["FeatureStore", "ShardData", "StoreError", "StoreSpec"]

_TEXT_ARRAYS = ("caption", "key", "url", "meta", "reason")
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


class FeatureStore:
    """Reader and writer of one feature store; safe to pickle into DataLoader workers.

    ``reader``: ``auto`` (tensorstore; zarr for ``memory://``), ``tensorstore`` or ``zarr``
    (for a process that will fork DataLoader workers: see ``reader.py``).
    """

    def __init__(self, url: str | os.PathLike[str], mode: str = "r", reader: str = "auto") -> None:
        if mode not in ("r", "r+"):
            raise StoreError(f"FeatureStore mode must be 'r' or 'r+', got {mode!r}")
        self.location = StoreLocation.parse(url)
        self.mode = mode
        self.reader_backend = resolve_backend(self.location, reader)
        self._reset_handles()
        self.manifest: dict[str, Any] = load_manifest(self.location, self.zarr_store)
        self._validate_arrays()

    def _reset_handles(self) -> None:
        self._pid: int | None = None
        self._zstore: Any = None
        self._group: Any = None
        self._arrays: dict[str, Any] = {}
        self._reader: RowReader | None = None
        self._records: dict[int, dict[str, Any]] | None = None
        self._index: StoreIndex | None = None

    # ---------------------------------------------------------------- opening and creating
    @classmethod
    def open(
        cls, url: str | os.PathLike[str], mode: str = "r", reader: str = "auto"
    ) -> FeatureStore:
        """Open an existing store; refuses non-stores, half-created stores, other schemas."""
        return cls(url, mode, reader)

    @classmethod
    def create(cls, url: str | os.PathLike[str], spec: StoreSpec) -> FeatureStore:
        """Create an empty store (manifest written last: see ``lifecycle.create_store``)."""
        location = StoreLocation.parse(url)
        create_store(location, spec)
        return cls(location.url, "r+")

    @classmethod
    def open_or_create(cls, url: str | os.PathLike[str], spec: StoreSpec) -> FeatureStore:
        """Open ``url`` for writing if it holds a compatible store, else create it.

        Refuses (``StoreError``) a store whose encoders, layout, prompt shape, encoding,
        template or shard size differ; grows the store when ``spec`` has more shards. A store
        whose creation was interrupted (no manifest, so nothing committed) is created anew.
        """
        location = StoreLocation.parse(url)
        if not location.exists():
            return cls.create(location.url, spec)
        if unfinished(location, location.open_zarr_store()):
            create_store(location, spec, overwrite=True)
            return cls(location.url, "r+")
        store = cls.open(location.url, "r+")
        problems = incompatibilities(spec_from_manifest(store.manifest), spec)
        if problems:
            lines = "; ".join(f"{f}: store has {a!r}, asked for {b!r}" for f, a, b in problems)
            raise StoreError(
                f"{location} holds features that cannot be mixed with the requested ones "
                f"({lines}). Use a new store path (store.path=...) or delete the old store."
            )
        if spec.n_shards > store.n_shards:
            store.grow(spec.n_shards)
        return store

    def _validate_arrays(self) -> None:
        for name, a in self.manifest["arrays"].items():
            try:
                arr = self.raw(name)
            except Exception as e:
                raise broken(self.location, f"array '{name}' is missing or unreadable ({e})") from e
            # More rows than the manifest says is what an interrupted grow() leaves behind:
            # harmless (rows past n_rows are never read) and repaired by growing again.
            if list(arr.shape[1:]) != list(a["shape"][1:]) or arr.shape[0] < a["shape"][0]:
                raise broken(
                    self.location,
                    f"array '{name}' has shape {arr.shape}, manifest says {a['shape']}",
                )

    # ---------------------------------------------------------------- per-process handles
    def _own(self) -> None:
        # zarr v3 and fsspec drive I/O from event loops; tensorstore from threads. Handles are
        # reopened in each new process (fork or spawn) instead of being shared with the parent.
        if self._pid != os.getpid():
            records, index = self._records, self._index  # plain data: fine to keep
            self._reset_handles()
            self._records, self._index = records, index
            self._pid = os.getpid()

    @property
    def zarr_store(self) -> Any:
        """zarr's store object for this location, opened in this process."""
        self._own()
        if self._zstore is None:
            self._zstore = self.location.open_zarr_store(read_only=self.mode == "r")
        return self._zstore

    @property
    def group(self) -> Any:
        import zarr

        store = self.zarr_store
        if self._group is None:
            self._group = zarr.open_group(store=store, mode=self.mode, zarr_format=3)
        return self._group

    def raw(self, name: str) -> Any:
        """The underlying Zarr array ``name`` (stored encoding), opened in this process."""
        group = self.group
        if name not in self._arrays:
            self._arrays[name] = group[name]
        return self._arrays[name]

    def __getstate__(self) -> dict[str, Any]:
        return {
            "url": self.location.url,
            "mode": self.mode,
            "reader": self.reader_backend,
            "manifest": self.manifest,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.location = StoreLocation.parse(state["url"])
        self.mode = state["mode"]
        self.reader_backend = state["reader"]
        self.manifest = state["manifest"]
        self._reset_handles()

    # ---------------------------------------------------------------- properties
    @property
    def url(self) -> str:
        return self.location.url

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
    def rows_per_file(self) -> int:
        return int(self.manifest["rows_per_file"])

    @property
    def encoding(self) -> str:
        return str(self.manifest["encoding"])

    def __len__(self) -> int:
        """Number of rows (``n_shards * samples_per_shard``); use :meth:`indices` for samples."""
        return int(self.manifest["n_rows"])

    def __repr__(self) -> str:
        return (
            f"FeatureStore({self.url!r}, rows={len(self)}, shards={self.n_shards}, "
            f"encoding={self.encoding}, committed={len(self.committed_shards())})"
        )

    # ---------------------------------------------------------------- commits
    def _check_shard(self, shard_id: int) -> int:
        if not isinstance(shard_id, (int, np.integer)) or not 0 <= shard_id < self.n_shards:
            raise StoreError(f"shard id {shard_id!r} is outside [0, {self.n_shards}) of {self.url}")
        return int(shard_id)

    def commit_records(self, refresh: bool = False) -> dict[int, dict[str, Any]]:
        """``{shard_id: record}`` of every committed shard, read once per handle (concurrently);
        ``refresh=True`` reads them again (e.g. while another process is writing)."""
        self._own()
        if self._records is None or refresh:
            self._records = commits.read_records(self.zarr_store, self.n_shards)
            self._index = None
        return self._records

    def _forget_records(self) -> None:
        self._records, self._index = None, None

    def is_committed(self, shard_id: int) -> bool:
        """Whether shard ``shard_id`` has a commit record now (always asks the storage)."""
        return commits.read_record(self.zarr_store, self._check_shard(shard_id)) is not None

    def committed_shards(self) -> list[int]:
        return sorted(self.commit_records())

    def missing_shards(self) -> list[int]:
        done = self.commit_records()
        return [s for s in range(self.n_shards) if s not in done]

    def commit_info(self, shard_id: int) -> dict[str, Any]:
        """The commit record of a shard (n_samples, n_valid, reasons, splits, source, ...)."""
        rec = self.commit_records().get(self._check_shard(shard_id))
        if rec is None:
            rec = commits.read_record(self.zarr_store, shard_id)
        if rec is None:
            raise StoreError(f"shard {shard_id} of {self.url} is not committed")
        return rec

    def invalid_counts(self) -> dict[str, int]:
        """``{reason: count}`` over all committed shards."""
        total: Counter[str] = Counter()
        for rec in self.commit_records().values():
            total.update(rec["reasons"])
        return dict(sorted(total.items(), key=lambda kv: (-kv[1], kv[0])))

    # ---------------------------------------------------------------- writing
    def shard_writer(self, shard_id: int, source: dict[str, Any] | None = None) -> ShardWriter:
        """A streaming writer for shard ``shard_id`` (``writer.py``); the shard is uncommitted
        as soon as the first rows arrive and committed by ``commit()``."""
        return ShardWriter(self, shard_id, source)

    def write_shard(
        self, shard_id: int, data: ShardData, source: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Write shard ``shard_id``'s rows in one go, then its commit record; returns it.

        Idempotent: re-writing a shard replaces its region and record. Samples with
        non-finite features are stored as invalid (see ``shard.encode_rows``).
        """
        writer = self.shard_writer(shard_id, source)
        writer.begin()
        writer.add(data)
        return writer.commit()

    def uncommit(self, shard_id: int) -> None:
        """Delete a shard's commit record (its rows stop counting; the data stays)."""
        self._require_write("uncommit shards")
        commits.delete_record(self.zarr_store, self._check_shard(shard_id))
        self._forget_records()

    def _require_write(self, what: str) -> None:
        if self.mode != "r+":
            raise StoreError(f"{self.url} is open read-only; open it with mode='r+' to {what}")

    def grow(self, n_shards: int) -> None:
        """Make room for more shards (existing rows and records are untouched).

        Arrays are resized first and the manifest last, so an interrupted grow leaves a
        readable store of the old size; growing again finishes the job.
        """
        self._require_write("grow it")
        if n_shards <= self.n_shards:
            return
        rows = n_shards * self.samples_per_shard
        arrays = dict(self.manifest["arrays"])
        for name, a in arrays.items():
            arr = self.raw(name)
            n = n_shards if name.startswith("moments/") else rows
            arr.resize((n, *arr.shape[1:]))
            arrays[name] = {**a, "shape": [n, *a["shape"][1:]]}
        m = {**self.manifest, "n_shards": n_shards, "n_rows": rows, "arrays": arrays}
        self.group.update_attributes({MANIFEST_KEY: m})
        self.manifest = m
        if self._reader is not None:
            self._reader.reset()  # shapes changed

    def annotate(self, key: str, value: Any) -> None:
        """Record ``value`` (JSON-able) under ``manifest[key]``, e.g. a run summary.

        Keys that describe how to read the store cannot be changed this way.
        """
        self._require_write("annotate")
        if key in build_manifest_keys():
            raise StoreError(f"manifest key {key!r} describes the store and cannot be overwritten")
        json.dumps(value)  # fail here, not inside zarr, for values JSON cannot hold
        m = {**load_manifest(self.location, self.zarr_store), key: value}
        self.group.update_attributes({MANIFEST_KEY: m})
        self.manifest = m

    # ---------------------------------------------------------------- index
    def index(self) -> StoreIndex:
        """The sample index (rows, validity, split, key hash) of committed shards."""
        self._own()
        if self._index is None:
            self._index = StoreIndex.from_records(self.commit_records(), self.samples_per_shard)
        return self._index

    def indices(
        self, valid_only: bool = True, committed_only: bool = True, split: str | None = None
    ) -> np.ndarray:
        """Row indices (int64, sorted) of samples: rows ``< n_samples`` of committed shards.

        ``committed_only=False`` also lists the rows of uncommitted shards (read from the
        per-row arrays; for debugging a half-written store).
        """
        if committed_only:
            return self.index().select(valid_only, split)
        if split is not None and split not in SPLITS:
            raise StoreError(f"split must be one of {SPLITS} or None, got {split!r}")
        rows = np.arange(len(self), dtype=np.int64)
        if valid_only:
            rows = rows[np.asarray(self.raw("valid")[:], dtype=bool)]
        if split is not None:
            rows = rows[np.asarray(self.raw("split")[:])[rows] == SPLITS.index(split)]
        return rows

    # ---------------------------------------------------------------- reading
    @property
    def reader(self) -> RowReader:
        self._own()
        if self._reader is None:
            self._reader = RowReader(self.location, self.reader_backend)
        return self._reader

    def read(
        self,
        idx: int | Sequence[int] | np.ndarray,
        fields: Sequence[str] | None = None,
        floats: str = "float32",
    ) -> dict[str, Any]:
        """Read and decode rows.

        ``idx`` an int gives one sample without a batch axis (numpy semantics); a list or
        array gives a batch in the order asked. Tensors come back as ``floats`` (float32, or
        float16 to halve what moves between processes; tokens decoded with the manifest's
        rule), ``prompt_mask`` bool, ``split`` as names, ``meta`` as dicts, plus ``index``.
        ``fields`` limits what is read (default: everything in READ_FIELDS).
        """
        if floats not in ("float32", "float16"):
            raise StoreError(f"floats must be 'float32' or 'float16', got {floats!r}")
        fdt = np.dtype(floats)
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
        # Where the manifest's decode rule is a plain float16 -> float32 cast, the reader may
        # cast while reading (one pass over the batch instead of two).
        f16_tokens = self.manifest["image_tokens_encoding"].get("scheme") == FLOAT16_SCHEME
        cast: dict[str, Any] = {}
        if fdt != np.float16:
            cast["prompt_latents"] = fdt
            if f16_tokens:
                cast["image_tokens"] = fdt
        raw = self.reader.read({n: self.raw(n) for n in names}, names, uniq, cast)
        in_order = len(uniq) == len(flat) and bool(np.all(uniq == flat))

        def fetch(name: str) -> np.ndarray:
            # the trainer asks for sorted unique rows: skip a gather copy of the batch
            return raw[name] if in_order else raw[name][inverse]

        out: dict[str, Any] = {}
        for name in fields:
            if name == "image_tokens":
                stored = {k: fetch(k) for k in ("image_tokens", "image_scale") if k in raw}
                if f16_tokens and fdt == np.float16:
                    out[name] = stored["image_tokens"]
                else:
                    tok = decode_tokens(stored, self.manifest["image_tokens_encoding"])
                    out[name] = tok.astype(fdt, copy=False)
            elif name == "prompt_latents":
                out[name] = fetch(name).astype(fdt, copy=False)
            elif name in ("prompt_mask", "valid"):
                out[name] = fetch(name).astype(bool, copy=False)
            elif name == "split":
                out[name] = [SPLITS[int(c)] for c in fetch(name).tolist()]
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

    # ---------------------------------------------------------------- statistics
    def moments(self, shards: Sequence[int] | None = None) -> dict[str, Moments]:
        """Per-role moments of the valid ``train`` rows of ``shards`` (default: all committed),
        merged from the partial moments each encode task stored; no token is read."""
        records = self.commit_records()
        ids = sorted(records if shards is None else shards)
        missing = [s for s in ids if s not in records]
        if missing:
            raise StoreError(f"shards {missing[:10]} of {self.url} are not committed")
        C = self.layout.channels
        if not ids:
            return merge_shards(np.zeros((0, 3, C)), np.zeros((0, 3, C)), [])
        sel = np.asarray(ids)
        means = np.asarray(self.raw("moments/mean").oindex[sel])
        m2s = np.asarray(self.raw("moments/m2").oindex[sel])
        return merge_shards(means, m2s, [records[s]["moments"]["count"] for s in ids])

    def token_moments(self, rows: np.ndarray) -> dict[str, Moments]:
        """Per-role moments of the stored (decoded) tokens of ``rows`` (e.g. a trainer's
        validation rows, to take them out of :meth:`moments`)."""
        from gap3d.store.stats import RoleMoments

        acc = RoleMoments(self.layout)
        rows = np.sort(np.asarray(rows, np.int64))
        for lo in range(0, len(rows), 64):
            acc.update(self.read(rows[lo : lo + 64], fields=["image_tokens"])["image_tokens"])
        return acc.parts
