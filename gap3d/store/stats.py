"""Per-role channel statistics from mergeable partial moments.

The trainer can standardise targets per channel, separately for the CLS, register and patch
tokens (they live on very different scales). Instead of a pass over the whole store, every
encode task keeps ``(count, mean, M2)`` per role and channel of the float32 tokens of its
valid ``train`` rows (before float16/int8 storage) and stores them with its shard
(``moments/mean``, ``moments/m2``; counts in the commit record). Statistics of any set of
shards are then a merge of a few numbers per shard, done on demand and only when a config
normalises. Rows that must not count (a trainer's validation rows) are taken out again with
the inverse of the same update.

The merge is the pairwise update of Chan, Golub & LeVeque ("Updating formulae and a pairwise
algorithm for computing sample variances", 1979): for parts ``a`` and ``b``,
``n = n_a + n_b``, ``delta = mean_b - mean_a``, ``mean = mean_a + delta * n_b / n``,
``M2 = M2_a + M2_b + delta**2 * n_a * n_b / n``. It stays exact where a naive sum of squares
cancels. Removing part ``b`` from a whole solves the same equations for ``a``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gap3d.layout import TokenLayout
from gap3d.store.manifest import ROLES

# Rows per step when reducing a batch of tokens: bounds the temporaries.
_ROWS_PER_STEP = 16
# Token rows per float64 deviation block in Moments.of (4096 x 1024 channels = 32 MiB).
_DEVIATION_ROWS = 4096


@dataclass
class Moments:
    """Count, mean and M2 (sum of squared deviations) per channel, float64."""

    n: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def zeros(cls, channels: int) -> Moments:
        return cls(0, np.zeros(channels, np.float64), np.zeros(channels, np.float64))

    @classmethod
    def of(cls, x: np.ndarray) -> Moments:
        """Moments of the rows of ``x (m, C)``, accumulated in float64.

        float64 because the statistics must not depend on how rows were grouped: the cache
        stage reduces a shard in the order its samples were downloaded, which changes from
        run to run. float32 partial sums differ by ~1e-7 between groupings, enough to change
        the float32 normalisation statistics and so every training step after them; float64
        ones by ~1e-16, which the float32 statistics do not see.
        """
        x = np.asarray(x)
        m = x.shape[0]
        if m == 0:
            return cls.zeros(x.shape[-1])
        mean = x.mean(axis=0, dtype=np.float64)  # a float64 accumulator, no float64 copy
        m2 = np.zeros_like(mean)
        for lo in range(0, m, _DEVIATION_ROWS):  # bounded float64 temporaries
            d = x[lo : lo + _DEVIATION_ROWS].astype(np.float64) - mean
            m2 += np.einsum("ij,ij->j", d, d)
        return cls(m, mean, m2)

    def merge(self, other: Moments) -> Moments:
        """Moments of the union of two disjoint row sets."""
        if other.n == 0:
            return Moments(self.n, self.mean.copy(), self.m2.copy())
        if self.n == 0:
            return Moments(other.n, other.mean.copy(), other.m2.copy())
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.n * other.n / n)
        return Moments(n, mean, m2)

    def remove(self, part: Moments) -> Moments:
        """Moments of the rows of ``self`` that are not in ``part`` (``part`` must be a subset)."""
        if part.n == 0:
            return Moments(self.n, self.mean.copy(), self.m2.copy())
        if part.n > self.n:
            raise ValueError(f"cannot remove {part.n} rows from {self.n}")
        n = self.n - part.n
        if n == 0:
            return Moments.zeros(len(self.mean))
        mean = (self.n * self.mean - part.n * part.mean) / n
        delta = part.mean - mean
        m2 = self.m2 - part.m2 - delta**2 * (n * part.n / self.n)
        return Moments(n, mean, np.maximum(m2, 0.0))  # rounding may dip below zero

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (ddof=0, like ``np.std``)."""
        return np.sqrt(self.m2 / max(self.n, 1))


def role_slices(layout: TokenLayout) -> dict[str, slice]:
    return {"cls": layout.cls_slice, "register": layout.register_slice, "patch": layout.patch_slice}


class RoleMoments:
    """Streaming per-role moments of token batches (what an encode task keeps per shard)."""

    def __init__(self, layout: TokenLayout) -> None:
        self.layout = layout
        self.parts = {r: Moments.zeros(layout.channels) for r in ROLES}

    def update(self, tokens: np.ndarray, rows: np.ndarray | None = None) -> None:
        """Add samples ``tokens[rows] (m, T, C)`` (float32, before storage encoding); the
        selection is taken a few rows at a time, so no copy of the batch is made."""
        C = self.layout.channels
        rows = np.arange(len(tokens)) if rows is None else np.asarray(rows)
        for lo in range(0, len(rows), _ROWS_PER_STEP):
            block = tokens[rows[lo : lo + _ROWS_PER_STEP]]
            for role, sl in role_slices(self.layout).items():
                if sl.stop > sl.start:
                    part = Moments.of(block[:, sl, :].reshape(-1, C))
                    self.parts[role] = self.parts[role].merge(part)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
        """``(mean (3, C), m2 (3, C), counts)`` in ROLES order, for the store."""
        mean = np.stack([self.parts[r].mean for r in ROLES])
        m2 = np.stack([self.parts[r].m2 for r in ROLES])
        return mean, m2, {r: int(self.parts[r].n) for r in ROLES}


def merge_shards(
    means: np.ndarray, m2s: np.ndarray, counts: list[dict[str, int]]
) -> dict[str, Moments]:
    """Merge per-shard moments ``means/m2s (k, 3, C)`` with their counts into one per role."""
    out: dict[str, Moments] = {}
    for j, role in enumerate(ROLES):
        total = Moments.zeros(means.shape[-1])
        for i, c in enumerate(counts):
            total = total.merge(Moments(int(c.get(role, 0)), means[i, j], m2s[i, j]))
        out[role] = total
    return out


# Significant bits the statistics keep (relative step 2**-16 = 1.5e-5, far below what a sample
# estimate of a mean or std is good for). See to_stats.
STAT_BITS = 16


def round_significant(x: np.ndarray, bits: int = STAT_BITS) -> np.ndarray:
    """``x`` rounded to ``bits`` significant bits (zeros stay zero)."""
    mantissa, exponent = np.frexp(np.asarray(x, dtype=np.float64))
    return np.ldexp(np.round(mantissa * 2.0**bits) / 2.0**bits, exponent)


def to_stats(parts: dict[str, Moments]) -> dict[str, np.ndarray]:
    """``{role}_mean`` / ``{role}_std`` arrays (C,) for roles with tokens (the trainer's form).

    Rounded to :data:`STAT_BITS` significant bits: partial moments merged in another order
    (the cache stage reduces samples in download order) differ in the last float64 bits, and
    now and then that moved a float32 statistic by one step and with it the whole training
    run. Rounding to a coarse grid makes the same samples give the same statistics.
    """
    stats: dict[str, np.ndarray] = {}
    for role in ROLES:
        if parts[role].n:
            stats[f"{role}_mean"] = round_significant(parts[role].mean)
            stats[f"{role}_std"] = round_significant(parts[role].std)
    return stats
