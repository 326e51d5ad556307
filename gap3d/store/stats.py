"""Per-role channel statistics of a feature store's image tokens.

The trainer standardises targets per channel, separately for the CLS, register and patch
tokens (they live on very different scales in DINOv2). Statistics are accumulated in float64
with Chan et al.'s pairwise update ("Updating formulae and a pairwise algorithm for computing
sample variances", 1979), which stays exact where a naive sum of squares would cancel.
They are stored in the store's ``stats`` group with the set of shards they cover.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from gap3d.store import FeatureStore

STATS_GROUP = "stats"
ROLES = ("cls", "register", "patch")
# Bound the float64 working set of one read (about 256 MB), whatever the token grid size.
_BATCH_BYTES = 256 * 2**20


class RunningMoments:
    """Streaming per-channel mean and M2 (sum of squared deviations) in float64."""

    def __init__(self, channels: int) -> None:
        self.n = 0
        self.mean = np.zeros(channels, np.float64)
        self.m2 = np.zeros(channels, np.float64)

    def update(self, x: np.ndarray) -> None:
        """Add rows ``x (m, C)``."""
        x = np.asarray(x, np.float64)
        m = x.shape[0]
        if m == 0:
            return
        mean_b = x.mean(axis=0)
        m2_b = ((x - mean_b) ** 2).sum(axis=0)
        n = self.n + m
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (m / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.n * m / n)
        self.n = n

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (ddof=0, like ``np.std``)."""
        return np.sqrt(self.m2 / max(self.n, 1))


def compute(store: FeatureStore, progress: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """Stream over valid rows of committed shards; returns ``(stats, info)``."""
    lay = store.layout
    slices = {"cls": lay.cls_slice, "register": lay.register_slice, "patch": lay.patch_slice}
    roles = [r for r in ROLES if slices[r].stop > slices[r].start]
    moments = {r: RunningMoments(lay.channels) for r in roles}
    shards = store.committed_shards()
    S = store.samples_per_shard
    rows_all = store.indices(valid_only=True, committed_only=True)
    rows_all = rows_all[np.isin(rows_all // S, shards)]  # a shard committed meanwhile waits
    batch = max(1, _BATCH_BYTES // (lay.n_tokens * lay.channels * 8))
    for s in tqdm(shards, desc="store stats", unit="shard", disable=not progress):
        lo, hi = np.searchsorted(rows_all, [s * S, (s + 1) * S])  # rows_all is sorted
        rows = rows_all[lo:hi]
        for i in range(0, rows.size, batch):
            tok = store.read(rows[i : i + batch], fields=["image_tokens"])["image_tokens"]
            for r in roles:
                moments[r].update(tok[:, slices[r], :].reshape(-1, lay.channels))
    n_samples = rows_all.size
    stats: dict[str, np.ndarray] = {}
    for r in roles:
        stats[f"{r}_mean"] = moments[r].mean
        stats[f"{r}_std"] = moments[r].std
    info = {
        "shards": shards,
        "n_samples": int(n_samples),
        "n_tokens": {r: int(moments[r].n) for r in roles},
        "computed": time.time(),
        "std": "population (ddof=0), float64",
    }
    return stats, info


def save(path: Path, stats: dict[str, np.ndarray], info: dict[str, Any]) -> None:
    """Replace the store's ``stats`` group; attributes are written last."""
    root = zarr.open_group(str(path), mode="r+", zarr_format=3)
    group = root.create_group(STATS_GROUP, overwrite=True)
    for name, values in stats.items():
        group.create_array(name, data=np.asarray(values, np.float64), chunks=values.shape)
    group.update_attributes({"info": info})


def load_info(path: Path) -> dict[str, Any] | None:
    """The ``info`` of the stored statistics, or None when there are none (yet)."""
    if not (Path(path) / STATS_GROUP / "zarr.json").is_file():
        return None
    info = zarr.open_group(str(Path(path) / STATS_GROUP), mode="r").attrs.get("info")
    return dict(info) if info else None


def load(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(Path(path) / STATS_GROUP), mode="r")
    return {name: np.asarray(group[name][:]) for name in group.array_keys()}
