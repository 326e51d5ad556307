"""Streaming writes of one pipeline shard: rows go out in whole files, the record goes last.

:class:`ShardWriter` is what an encode task holds while it works through a shard:

1. ``begin`` deletes the shard's commit record (the shard stops counting at once);
2. ``add`` takes batches of rows in order, encodes them for storage, updates the shard's
   partial moments, and writes every full block of ``rows_per_file`` rows straight into its
   own file of each row array (a whole Zarr shard object: no read-modify-write), so at most one
   block of encoded rows is held;
3. ``commit`` writes the last (partial) block, zero-fills blocks a previous attempt may have
   left beyond the new end, writes the per-shard columns and moments, and then the commit
   record.

A task killed anywhere before step 3's last write leaves no record, so none of its rows count
and a re-run rewrites the shard from the start.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from gap3d.store import commits
from gap3d.store.manifest import SPLITS, StoreError
from gap3d.store.schema import COLUMN_ARRAYS, ROW_ARRAYS
from gap3d.store.shard import ShardData, check_rows, encode_rows
from gap3d.store.stats import RoleMoments

if TYPE_CHECKING:
    from gap3d.store.feature_store import FeatureStore


class ShardWriter:
    """Writes shard ``shard_id`` of ``store`` batch by batch (see the module docstring)."""

    def __init__(
        self, store: FeatureStore, shard_id: int, source: dict[str, Any] | None = None
    ) -> None:
        if store.mode != "r+":
            raise StoreError(f"{store.url} is open read-only; open it with mode='r+' to write")
        self.store = store
        self.shard_id = store._check_shard(shard_id)
        self.source = source
        self.S = store.samples_per_shard
        self.F = store.rows_per_file
        self.lo = self.shard_id * self.S
        self.n = 0  # rows added so far
        self.next_block = 0  # index of the block the pending rows belong to
        self.blocks_written: set[int] = set()
        self.pending: list[dict[str, np.ndarray]] = []  # encoded rows of the current block
        self.pending_rows = 0
        self.columns: dict[str, list[Any]] = {name: [] for name in COLUMN_ARRAYS}
        self.reasons: Counter[str] = Counter()
        self.splits: Counter[str] = Counter()
        self.moments = RoleMoments(store.layout)
        self.row_names = [n for n in store.manifest["arrays"] if n in ROW_ARRAYS]
        self._begun = False
        self._done = False

    def begin(self) -> ShardWriter:
        commits.delete_record(self.store.zarr_store, self.shard_id)
        self._begun = True
        return self

    def add(self, d: ShardData) -> None:
        """Append ``d``'s rows after the rows added so far."""
        if not self._begun:
            self.begin()
        where = f"shard {self.shard_id} of {self.store.url}"
        n = check_rows(
            d, self.store.layout, self.store.prompt_max_length, self.store.prompt_dim, where
        )
        if self.n + n > self.S:
            raise StoreError(f"{where}: {self.n + n} samples exceed samples_per_shard={self.S}")
        enc = encode_rows(d, self.store.encoding)
        self.moments.update(enc.tokens, enc.train_rows)
        for name, values in enc.columns.items():
            self.columns[name].extend(list(values))
        self.reasons.update(r for r in enc.reasons if r)
        self.splits.update(SPLITS[c] for c, v in zip(enc.split_code, enc.valid, strict=True) if v)
        self.n += n
        start = 0
        while start < n:  # fill the current block, flush it when full
            take = min(self.F - self.pending_rows, n - start)
            self.pending.append({k: v[start : start + take] for k, v in enc.arrays.items()})
            self.pending_rows += take
            start += take
            if self.pending_rows == self.F:
                self._flush()

    def _flush(self) -> None:
        """Write the pending rows as block ``b`` (one whole file per row array), zero-padded."""
        if not self.pending_rows:
            return
        b = self.next_block
        lo = self.lo + b * self.F
        for name in self.row_names:
            parts = [p[name] for p in self.pending]
            block = np.zeros((self.F, *parts[0].shape[1:]), dtype=parts[0].dtype)
            block[: self.pending_rows] = np.concatenate(parts)
            self.store.raw(name)[lo : lo + self.F] = block
        self.blocks_written.add(b)
        self.next_block += 1
        self.pending, self.pending_rows = [], 0

    def commit(self) -> dict[str, Any]:
        """Finish the shard and write its commit record; returns the record."""
        if self._done:
            raise StoreError(f"shard {self.shard_id}: commit() called twice")
        if not self._begun:
            self.begin()
        self._flush()
        # Blocks past the new end may hold rows of an earlier, longer attempt: zero them so
        # the region reads back exactly as this shard (zarr stores no file for all-zero data).
        for b in range(self.S // self.F):
            if b not in self.blocks_written:
                lo = self.lo + b * self.F
                for name in self.row_names:
                    arr = self.store.raw(name)
                    arr[lo : lo + self.F] = np.zeros((self.F, *arr.shape[1:]), arr.dtype)
        self._write_columns()
        mean, m2, counts = self.moments.arrays()
        self.store.raw("moments/mean")[self.shard_id] = mean
        self.store.raw("moments/m2")[self.shard_id] = m2
        valid = np.asarray(self.columns["valid"], bool)
        record = commits.new_record(
            self.shard_id,
            n_samples=self.n,
            n_valid=int(valid.sum()),
            reasons=dict(self.reasons),
            splits=dict(self.splits),
            rows=commits.encode_rows(valid, np.asarray(self.columns["split"]), self.columns["key"]),
            moments={"count": counts},
            source=self.source,
        )
        commits.write_record(self.store.zarr_store, self.shard_id, record)  # last
        self._done = True
        self.store._forget_records()
        return record

    def _write_columns(self) -> None:
        S, n = self.S, self.n
        for name in COLUMN_ARRAYS:
            arr = self.store.raw(name)
            if name in ("valid", "split"):
                col = np.zeros(S, dtype=arr.dtype)
                col[:n] = np.asarray(self.columns[name], dtype=arr.dtype)
            else:
                col = np.full(S, "", dtype=object)
                col[:n] = self.columns[name]
            arr[self.lo : self.lo + S] = col
