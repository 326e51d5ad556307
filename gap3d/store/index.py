"""The index of a store's samples, built from commit records alone.

One entry per sample row (the first ``n_samples`` rows of every committed shard): its row
number, validity, split code and 32-bit key hash. Built once per store handle from the
records (one small object per shard), never from per-row arrays or text columns, so opening a
store of millions of rows costs O(shards) small reads and a few bytes per row of memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gap3d.store.commits import decode_rows
from gap3d.store.manifest import SPLIT_CODES, SPLITS, StoreError


@dataclass(frozen=True)
class StoreIndex:
    rows: np.ndarray  # int64, sorted
    valid: np.ndarray  # bool
    split: np.ndarray  # int8 code (SPLIT_CODES)
    key_hash: np.ndarray  # uint32

    @classmethod
    def from_records(cls, records: dict[int, dict[str, Any]], samples_per_shard: int) -> StoreIndex:
        parts_rows, parts_valid, parts_split, parts_hash = [], [], [], []
        for s in sorted(records):
            r = decode_rows(records[s])
            n = len(r.valid)
            parts_rows.append(np.arange(s * samples_per_shard, s * samples_per_shard + n))
            parts_valid.append(r.valid)
            parts_split.append(r.split)
            parts_hash.append(r.key_hash)
        if not parts_rows:
            return cls(
                np.zeros(0, np.int64),
                np.zeros(0, bool),
                np.zeros(0, np.int8),
                np.zeros(0, np.uint32),
            )
        return cls(
            np.concatenate(parts_rows).astype(np.int64),
            np.concatenate(parts_valid),
            np.concatenate(parts_split),
            np.concatenate(parts_hash),
        )

    def __len__(self) -> int:
        return len(self.rows)

    def mask(self, valid_only: bool = True, split: str | None = None) -> np.ndarray:
        """Boolean mask over the index entries."""
        m = self.valid.copy() if valid_only else np.ones(len(self.rows), bool)
        if split is not None:
            if split not in SPLITS:
                raise StoreError(f"split must be one of {SPLITS} or None, got {split!r}")
            m &= self.split == SPLIT_CODES[split]
        return m

    def select(self, valid_only: bool = True, split: str | None = None) -> np.ndarray:
        """Rows (sorted int64) of the samples asked for."""
        return self.rows[self.mask(valid_only, split)]
