"""Data statistics of a run, computed once (global rank 0) and shared through the run folder.

Two things come from the data before training starts: the per-role normalisation statistics
(merged from the store's partial moments, validation rows taken out) and the per-position mean
token (the mean-feature baseline). Rank 0 computes them and writes ``<run_dir>/data_stats.pt``
(atomically, with a key of what they depend on); every other rank, and a resumed run, loads
that file instead of reading the store again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gap3d.config import Gap3dConfig

STATS_FILE = "data_stats.pt"
WAIT_S = 1800.0  # how long a non-zero rank waits for rank 0's file


def stats_key(cfg: Gap3dConfig, store: Any, val_rows: np.ndarray) -> str:
    """What the statistics depend on: store, committed shards (and when), split, options."""
    records = store.commit_records()
    blob = {
        "store": store.url,
        "shards": sorted((s, r.get("written")) for s, r in records.items()),
        "val": hashlib.sha1(np.sort(val_rows).tobytes()).hexdigest(),
        "normalize": cfg.aligner.normalize_targets,
        "seed": cfg.seed,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _load(path: Path, key: str) -> dict[str, Any] | None:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, RuntimeError, EOFError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("key") == key else None


def run_statistics(
    dm: Any, cfg: Gap3dConfig, is_global_zero: bool, say: Any = print
) -> tuple[dict[str, np.ndarray] | None, torch.Tensor]:
    """``(normalisation stats or None, mean tokens (T, C))`` for this run (see module doc)."""
    store = dm.open_store()
    dm.prepare_split()
    key = stats_key(cfg, store, dm.val_rows)
    path = Path(cfg.run_dir) / STATS_FILE
    data = _load(path, key)
    computed = data is None and is_global_zero
    if computed:
        t0 = time.perf_counter()
        stats = dm.statistics() if cfg.aligner.normalize_targets else None
        mean = dm.mean_tokens()
        data = {
            "key": key,
            "stats": {k: torch.as_tensor(v) for k, v in (stats or {}).items()},
            "has_stats": stats is not None,
            "mean_tokens": mean,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(data, tmp)
        os.replace(tmp, path)
        say(f"stats    computed the data statistics in {time.perf_counter() - t0:.1f} s -> {path}")
    elif data is None:
        deadline = time.monotonic() + WAIT_S
        while data is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 did not write {path} within {WAIT_S:.0f} s")
            time.sleep(0.5)
            data = _load(path, key)
    if not is_global_zero:
        print(f"stats    loaded the data statistics of rank 0 from {path}", flush=True)
    elif not computed:
        say(f"stats    reusing {path}")
    stats = {k: v.numpy() for k, v in data["stats"].items()} if data["has_stats"] else None
    return stats, data["mean_tokens"]
