"""Training data: batches of cached features straight from the Zarr feature store.

Training never runs an encoder: a batch is ``image_tokens``, ``prompt_latents`` and
``prompt_mask`` read from the store. Three decisions shape this module:

* **Train split only.** Samples the store marks ``split == "heldout"`` (held-out
  shape/colour combinations, eval only) are never trained on. A deterministic validation
  subset is carved out of the ``train`` samples from ``(seed, train.val_fraction)`` and written
  to ``<run_dir>/split.json`` so evaluation and resume see the same split.
* **Batch k is a pure function of (seed, k).** :class:`StepBatchSampler` draws data epoch
  ``e = k // batches_per_epoch`` as ``permutation(default_rng([seed, e]))`` and slices it.
  Lightning 2.6 restores its loop counters on resume but not the position of a plain sampler
  (``_TrainingEpochLoop.reset`` only warns), so the sampler starts at ``trainer.global_step``
  instead; Lightning's own epoch/batch counters then line up because one batch = one optimizer
  step and every epoch has the same number of batches (``drop_last``). In DDP each rank reads
  its own slice of the global batch, so the order does not depend on Lightning's
  ``DistributedSampler`` (we pass ``use_distributed_sampler=False``).
* **One store read per batch.** The sampler yields whole index lists and the dataset reads
  them with one sorted ``store.read`` call, so Zarr fetches each chunk once per batch instead
  of once per sample. Each worker process opens its own store handle (Zarr v3 runs a
  background event loop that must not cross a ``fork``).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from gap3d.config import Gap3dConfig

SPLIT_FILE = "split.json"
_VAL_SALT = 0x5EED  # keeps the val split independent of the epoch permutations


class DataError(ValueError):
    """The store cannot be trained on as configured; the message says what to do."""


# --------------------------------------------------------------------------------------------
# store checks and the train/val split
# --------------------------------------------------------------------------------------------


def check_store(store: Any, cfg: Gap3dConfig) -> list[str]:
    """Refuse a store that cannot be trained on; return notes worth printing.

    Refuses: no committed shards, a half-committed store (unless
    ``train.allow_partial_store``), no valid ``train`` samples, and a prompt length that does
    not match ``prompt_encoder.max_length`` of the config (the model's conditioning length).
    """
    notes: list[str] = []
    committed = list(store.committed_shards())
    missing = list(store.missing_shards())
    where = f"feature store {cfg.store_path}"
    if not committed:
        raise DataError(f"{where} has no committed shards (empty store); run `gap3d cache` first")
    if missing:
        if not cfg.train.allow_partial_store:
            raise DataError(
                f"{where} is half-committed: {len(missing)} of {len(committed) + len(missing)} "
                f"shards missing (e.g. {missing[:5]}). Finish it with `gap3d cache`, or set "
                "train.allow_partial_store=true to train on the committed part"
            )
        notes.append(
            f"training on the committed part only: {len(committed)} of "
            f"{len(committed) + len(missing)} shards (train.allow_partial_store=true)"
        )
    if int(store.prompt_max_length) != cfg.prompt_encoder.max_length:
        raise DataError(
            f"{where} holds prompt latents of length {store.prompt_max_length}, but the config "
            f"says prompt_encoder.max_length={cfg.prompt_encoder.max_length}; use the config the "
            "store was written with, or re-cache the store"
        )
    if len(store.indices(valid_only=True, committed_only=True, split="train")) < 2:
        raise DataError(f"{where} has fewer than 2 valid 'train' samples in committed shards")
    return notes


def make_split(
    indices: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic ``(train, val)`` split of store rows, both sorted, val non-empty."""
    indices = np.sort(np.asarray(indices, dtype=np.int64))
    n_val = int(round(len(indices) * val_fraction))
    n_val = min(max(n_val, 1), len(indices) - 1)
    perm = np.random.default_rng([seed, _VAL_SALT]).permutation(len(indices))
    return np.sort(indices[perm[n_val:]]), np.sort(indices[perm[:n_val]])


def load_or_make_split(
    run_dir: Path, train_rows: np.ndarray, val_fraction: float, seed: int, write: bool = True
) -> tuple[np.ndarray, np.ndarray, str]:
    """Reuse ``<run_dir>/split.json`` when it still fits the store, else make and write one.

    Reusing the written split keeps the val set fixed across resumes even if the store grew
    (``allow_partial_store``). Returns ``(train, val, note)``.
    """
    path = run_dir / SPLIT_FILE
    available = set(np.asarray(train_rows).tolist())
    if path.exists():
        saved = json.loads(path.read_text())
        tr, va = np.asarray(saved["train"], np.int64), np.asarray(saved["val"], np.int64)
        same_recipe = saved.get("seed") == seed and saved.get("val_fraction") == val_fraction
        if same_recipe and available.issuperset(tr.tolist()) and available.issuperset(va.tolist()):
            return tr, va, f"reusing the train/val split in {path}"
    tr, va = make_split(train_rows, val_fraction, seed)
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        payload = {
            "seed": seed,
            "val_fraction": val_fraction,
            "n_train": len(tr),
            "n_val": len(va),
            "train": tr.tolist(),
            "val": va.tolist(),
        }
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, path)  # atomic: DDP ranks may write the same content concurrently
    return tr, va, f"wrote the train/val split to {path}"


# --------------------------------------------------------------------------------------------
# sampler, dataset, loader
# --------------------------------------------------------------------------------------------


class StepBatchSampler(Sampler[list[int]]):
    """Yields this rank's index list of global batch k, for k = start, start+1, ...

    One ``__iter__`` runs to the end of the current data epoch (so ``len()`` batches per
    Lightning epoch), and the next call begins the following epoch.
    """

    def __init__(
        self,
        rows: np.ndarray,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        block: int = 1,
    ) -> None:
        self.rows = np.sort(np.asarray(rows, dtype=np.int64))
        if block < 1:
            raise DataError(f"train.shuffle_block must be >= 1, got {block}")
        self.block = int(block)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.global_batch_size = self.batch_size * self.world_size
        self.batches_per_epoch = len(self.rows) // self.global_batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{len(self.rows)} training samples are fewer than one global batch "
                f"({self.batch_size} x {self.world_size} devices); lower train.batch_size"
            )
        self.next_batch = int(start_batch)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All rows in the order of data epoch ``epoch``.

        ``block == 1``: a uniform permutation. ``block > 1``: runs of ``block`` consecutive
        store rows are permuted as units (the run boundaries shift by one row each epoch),
        so a batch needs ``batch / block`` contiguous reads instead of ``batch`` scattered
        ones. Neighbouring rows often come from one source shard (e.g. views of one asset),
        so batches are less diverse: an opt-in trade for I/O-bound runs.
        """
        rng = np.random.default_rng([self.seed, epoch])
        if self.block == 1:
            return self.rows[rng.permutation(len(self.rows))]
        rolled = np.roll(self.rows, -(epoch % self.block))
        blocks = [rolled[i : i + self.block] for i in range(0, len(rolled), self.block)]
        return np.concatenate([blocks[j] for j in rng.permutation(len(blocks))])

    def batch(self, k: int) -> list[int]:
        """Rows of global batch ``k`` that belong to this rank (a pure function of k)."""
        epoch, pos = divmod(k, self.batches_per_epoch)
        order = self.epoch_order(epoch)
        lo = pos * self.global_batch_size + self.rank * self.batch_size
        return order[lo : lo + self.batch_size].tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        start = self.next_batch
        end = (start // self.batches_per_epoch + 1) * self.batches_per_epoch
        self.next_batch = end
        epoch = start // self.batches_per_epoch
        order = self.epoch_order(epoch)  # one permutation per epoch, not per batch
        for k in range(start, end):
            lo = (k - epoch * self.batches_per_epoch) * self.global_batch_size
            lo += self.rank * self.batch_size
            yield order[lo : lo + self.batch_size].tolist()


class StoreBatchDataset(Dataset):
    """``dataset[list_of_rows]`` -> one batch dict of tensors, read with one store call."""

    def __init__(self, store_path: str | Path, fields: tuple[str, ...] | None = None) -> None:
        self.store_path = str(store_path)
        self.fields = fields or ("image_tokens", "prompt_latents", "prompt_mask")
        self._store: Any = None
        self._pid: int | None = None

    @property
    def store(self) -> Any:
        # Open per process: a handle created before fork/spawn must not be reused in a worker.
        if self._store is None or self._pid != os.getpid():
            from gap3d.store import FeatureStore

            self._store, self._pid = FeatureStore.open(self.store_path), os.getpid()
        return self._store

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None, "_pid": None}

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        idx = np.sort(np.asarray(rows, dtype=np.int64))  # sorted = chunk-local reads
        data = self.store.read(idx, fields=self.fields)
        out = {k: torch.as_tensor(np.asarray(data[k])) for k in self.fields}
        out["index"] = torch.as_tensor(idx)
        return out


class ResumableLoader(DataLoader):
    """A DataLoader Lightning treats as resumable (it has ``state_dict``/``load_state_dict``).

    The position itself comes from ``trainer.global_step`` (see the module docstring); the
    state only records what the order depends on, so a resume that would silently change the
    data order is reported.
    """

    def state_dict(self) -> dict[str, Any]:
        s = self.batch_sampler_ref
        return {
            "seed": s.seed,
            "global_batch_size": s.global_batch_size,
            "n_train": len(s.rows),
            "shuffle_block": s.block,
            "rows_sha1": hashlib.sha1(s.rows.tobytes()).hexdigest()[:16],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        now = self.state_dict()
        diff = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
        if diff:
            warnings.warn(
                "resuming with a different data order than the checkpoint's run "
                + ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in diff.items())
                + "; training continues but is not an exact continuation",
                stacklevel=2,
            )

    @property
    def batch_sampler_ref(self) -> StepBatchSampler:
        return self.sampler  # type: ignore[return-value]


def make_loader(
    dataset: StoreBatchDataset,
    sampler: Sampler[list[int]],
    num_workers: int = 0,
    multiprocessing_context: str | None = None,
    cls: type[DataLoader] = DataLoader,
) -> DataLoader:
    """A loader whose sampler yields whole batches (``batch_size=None``: no re-collation)."""
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(
            multiprocessing_context=multiprocessing_context,
            prefetch_factor=2,
            persistent_workers=False,
        )
    return cls(
        dataset,
        sampler=sampler,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        **kwargs,
    )


# --------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------


class StoreDataModule(pl.LightningDataModule):
    """Train/val loaders over the feature store for one config."""

    def __init__(self, cfg: Gap3dConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.store: Any = None
        self.train_rows = np.zeros(0, np.int64)
        self.val_rows = np.zeros(0, np.int64)
        self.notes: list[str] = []
        self.n_heldout = 0

    def open_store(self) -> Any:
        if self.store is None:
            from gap3d.store import FeatureStore

            if not Path(self.cfg.store_path).exists():
                raise FileNotFoundError(
                    f"feature store {self.cfg.store_path} not found; run `gap3d cache` first"
                )
            self.store = FeatureStore.open(self.cfg.store_path)
            self.notes = check_store(self.store, self.cfg)
        return self.store

    def prepare_split(self) -> None:
        """Load or make (and write) the train/val split; idempotent."""
        if len(self.train_rows):
            return
        store = self.open_store()
        rows = store.indices(valid_only=True, committed_only=True, split="train")
        self.n_heldout = len(store.indices(valid_only=True, committed_only=True, split="heldout"))
        rank0 = self.trainer is None or self.trainer.is_global_zero
        tr, va, note = load_or_make_split(
            self.cfg.run_dir, rows, self.cfg.train.val_fraction, self.cfg.seed, write=rank0
        )
        self.train_rows, self.val_rows = tr, va
        self.notes.append(note)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_split()

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        # Called after Lightning restored the checkpoint: global_step is the resume position.
        start = self.trainer.global_step if self.trainer is not None else 0
        sampler = StepBatchSampler(
            self.train_rows,
            self.cfg.train.batch_size,
            self.cfg.seed,
            rank,
            world,
            start_batch=start,
            block=self.cfg.train.shuffle_block,
        )
        return make_loader(
            StoreBatchDataset(self.cfg.store_path),
            sampler,
            self.cfg.train.num_workers,
            self.cfg.train.multiprocessing_context,
            cls=ResumableLoader,
        )

    def val_rows_used(self) -> np.ndarray:
        """The first ``train.val_samples`` val rows (fixed, so metrics compare across steps)."""
        return self.val_rows[: self.cfg.train.val_samples]

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        rows = self.val_rows_used()
        # Every rank needs the same number of val batches (metrics are all-reduced): pad by
        # wrapping around, which double-counts at most world_size - 1 samples.
        rows = np.resize(rows, -(-len(rows) // world) * world)[rank::world]
        bs = self.cfg.train.batch_size
        batches = [rows[i : i + bs].tolist() for i in range(0, len(rows), bs)]
        return make_loader(
            StoreBatchDataset(self.cfg.store_path),
            batches,  # type: ignore[arg-type]
            self.cfg.train.num_workers,
            self.cfg.train.multiprocessing_context,
        )

    def mean_tokens(self, max_samples: int = 2048, chunk: int = 64) -> torch.Tensor:
        """Per-position mean token over (up to ``max_samples``) training rows: the
        mean-feature baseline of the paper, in the store's token space, shape (T, C)."""
        store = self.open_store()
        self.prepare_split()
        rows = self.train_rows
        if len(rows) > max_samples:
            pick = np.random.default_rng([self.cfg.seed, 1]).choice(len(rows), max_samples, False)
            rows = np.sort(rows[pick])
        total = None
        for i in range(0, len(rows), chunk):
            x = store.read(rows[i : i + chunk], fields=["image_tokens"])["image_tokens"]
            x = np.asarray(x, dtype=np.float64)
            total = x.sum(0) if total is None else total + x.sum(0)
        return torch.as_tensor(total / len(rows), dtype=torch.float32)
