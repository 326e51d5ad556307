"""The train/validation split: a pure function of (seed, sample key), no stored row lists.

Every sample gets a score ``u = mix64(key_hash32(key) ^ mix64(seed))`` (uniform over 64-bit
integers; ``key_hash32`` is in each shard's commit record, so no text column is read). A run
validates on the samples of the store's ``train`` split whose score is below a threshold, and
trains on the rest. The threshold is chosen once, at the start of a run, as the smallest value
that puts ``train.val_samples`` samples below it, and written to ``<run_dir>/split.json`` with
the seed: resumes reuse it, so a sample's side never changes, and a store that grows later
only adds samples (new ones below the threshold join validation, at the same rate). Nothing
but those few samples is withheld from training.

``mix64`` is the finaliser of SplitMix64 (Steele, Lea & Flood, "Fast splittable pseudorandom
number generators", OOPSLA 2014): a bijection on 64-bit integers with good avalanche, so close
keys and close seeds give unrelated scores.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from gap3d.config import Gap3dConfig

SPLIT_FILE = "split.json"
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = 0x9E3779B97F4A7C15


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function, vectorised over uint64."""
    z = np.asarray(x, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(30)
        z *= _M1
        z ^= z >> np.uint64(27)
        z *= _M2
        z ^= z >> np.uint64(31)
    return z


def scores(key_hash: np.ndarray, seed: int) -> np.ndarray:
    """The split score (uint64) of each sample."""
    s = mix64(np.array([(int(seed) * _GOLDEN) % 2**64], dtype=np.uint64))[0]
    return mix64(np.asarray(key_hash, dtype=np.uint64) ^ s)


@dataclass(frozen=True)
class SplitRule:
    """What defines a run's split; the threshold is fixed at the run's start."""

    seed: int
    val_samples: int
    threshold: int  # validation iff score < threshold
    n_candidates: int  # train-split samples when the threshold was chosen

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "threshold": str(self.threshold)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> SplitRule:
        d = json.loads(text)
        return cls(
            int(d["seed"]), int(d["val_samples"]), int(d["threshold"]), int(d["n_candidates"])
        )


def choose_threshold(score: np.ndarray, val_samples: int) -> int:
    """The smallest threshold with ``min(val_samples, n)`` scores below it."""
    n = len(score)
    k = min(int(val_samples), n)
    if k == 0:
        return 0
    kth = np.partition(np.asarray(score, np.uint64), k - 1)[k - 1]
    return int(kth) + 1


def make_rule(score: np.ndarray, seed: int, val_samples: int) -> SplitRule:
    return SplitRule(int(seed), int(val_samples), choose_threshold(score, val_samples), len(score))


def by_score(rows: np.ndarray, score: np.ndarray) -> np.ndarray:
    """``rows`` ordered by ``score`` (ties by row): an order that depends on the samples' keys
    and the seed only, not on where the cache stage happened to write each sample."""
    rows = np.asarray(rows, dtype=np.int64)
    by_row = np.argsort(rows, kind="stable")  # cheap: index rows arrive sorted
    rows, score = rows[by_row], np.asarray(score, dtype=np.uint64)[by_row]
    return rows[np.argsort(score, kind="stable")]  # stable: equal scores stay in row order


def scored_rows(index: Any, split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, scores)`` of the valid samples of store split ``split`` (``index`` is
    ``store.index()``): the trainer's candidates (``train``) and eval's ``heldout`` rows."""
    sel = index.mask(valid_only=True, split=split)
    return index.rows[sel], scores(index.key_hash[sel], seed)


def split_rows(
    rows: np.ndarray, score: np.ndarray, rule: SplitRule
) -> tuple[np.ndarray, np.ndarray]:
    """``(train_rows, val_rows)`` of the candidate ``rows``, both ordered by score.

    The download stage writes a shard's samples in the order their downloads finish, which
    differs between runs of the same URL list; ordering by the (seed, key) score instead of
    by row makes everything downstream (the batch order, the evaluated subset) the same for
    the same samples wherever they sit in the store.
    """
    val = score < np.uint64(rule.threshold)
    return by_score(rows[~val], score[~val]), by_score(rows[val], score[val])


def load_rule(run_dir: Path) -> SplitRule | None:
    path = Path(run_dir) / SPLIT_FILE
    try:
        return SplitRule.from_json(path.read_text())
    except (FileNotFoundError, KeyError, ValueError, json.JSONDecodeError):
        return None


def save_rule(run_dir: Path, rule: SplitRule) -> Path:
    """Write ``split.json`` atomically (DDP ranks may race with the same content)."""
    path = Path(run_dir) / SPLIT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(rule.to_json())
    os.replace(tmp, path)
    return path


def split_store(
    store: Any, cfg: Gap3dConfig, write: bool = True
) -> tuple[np.ndarray, np.ndarray, str]:
    """``(train_rows, val_rows, note)`` of the store's valid ``train`` samples for ``cfg``.

    Reuses ``<run_dir>/split.json`` when it has the same seed and ``val_samples`` (a resume, or
    a store that grew: every old sample keeps its side); otherwise chooses the threshold now and
    writes it (``write``: rank 0 only).
    """
    rows, score = scored_rows(store.index(), "train", cfg.seed)
    rule = load_rule(cfg.run_dir)
    path = cfg.run_dir / SPLIT_FILE
    if rule is not None and (rule.seed, rule.val_samples) == (cfg.seed, cfg.train.val_samples):
        note = f"validation rows by (seed, key) with the threshold in {path}"
    else:
        n_val = min(cfg.train.val_samples, max(1, len(rows) // 2))
        rule = make_rule(score, cfg.seed, n_val)
        rule = SplitRule(cfg.seed, cfg.train.val_samples, rule.threshold, rule.n_candidates)
        if write:
            save_rule(cfg.run_dir, rule)
        note = f"chose {n_val} validation rows by (seed, key); threshold written to {path}"
    train, val = split_rows(rows, score, rule)
    return train, val, note
