"""Training data: batches of cached features straight from the feature store.

Training never runs an encoder: a batch is ``image_tokens``, ``prompt_latents`` and
``prompt_mask`` read from the store. Four decisions shape this module:

* **Train split only, validation by key.** Samples the store marks ``heldout`` (held-out
  shape/colour combinations, eval only) are never trained on. ``train.val_samples`` samples of
  the ``train`` split are set aside for validation by a pure function of (seed, sample key)
  (``split.py``); only the threshold is written to ``<run_dir>/split.json``.
* **An index from commit records.** Rows, validity, split and key hashes come from the
  store's per-shard commit records, read once per process: no per-row array, no text column.
* **Batch k is a pure function of (seed, k).** :class:`StepBatchSampler` draws data epoch
  ``e = k // batches_per_epoch`` as ``permutation(default_rng([seed, e]))`` and slices it.
  Lightning 2.6 restores its loop counters on resume but not the position of a plain sampler
  (``_TrainingEpochLoop.reset`` only warns), so the sampler starts at ``trainer.global_step``
  instead; Lightning's own epoch/batch counters then line up because one batch = one optimizer
  step and every epoch has the same number of batches (``drop_last``). In DDP each rank reads
  its own slice of the global batch, so the order does not depend on Lightning's
  ``DistributedSampler`` (we pass ``use_distributed_sampler=False``).
* **One store read per batch.** The sampler yields whole index lists and the dataset reads
  them with one ``store.read`` call (rows read sorted, then put back in the batch's order;
  tensorstore: all rows of all arrays in one concurrent request).
* **The same samples, the same run.** Training rows are ordered by the (seed, key) split
  score before each epoch's permutation, and batches keep that order: the download stage
  writes samples in the order they finish, so two caches of the same data differ in row
  layout, and a run that followed row order would train on different batches from each.
* **A store handle per process.** Each worker process opens its own store handle; a parent
  that forks workers reads through zarr-python itself, since tensorstore does not survive a
  fork.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from gap3d.config import Gap3dConfig
from gap3d.trainer.sampler import DataError, StepBatchSampler
from gap3d.trainer.split import SPLIT_FILE, split_store

__all__ = [
    "SPLIT_FILE",
    "DataError",
    "ResumableLoader",
    "StepBatchSampler",
    "StoreBatchDataset",
    "StoreDataModule",
    "check_store",
    "make_loader",
    "split_store",
]

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


def reader_for(cfg: Gap3dConfig) -> str:
    """The store reader of the training process itself: a fork-safe one when it will fork
    DataLoader workers (tensorstore does not survive a fork; the workers use it), else auto."""
    from gap3d.store import StoreLocation
    from gap3d.store.reader import fork_safe, resolve_backend

    ctx = cfg.train.multiprocessing_context
    forks = ctx == "fork" or (ctx is None and mp_default_is_fork())
    backend = resolve_backend(StoreLocation.parse(cfg.store_path), "auto")
    return fork_safe(backend) if cfg.train.num_workers > 0 and forks else backend


def mp_default_is_fork() -> bool:
    import multiprocessing

    return (
        multiprocessing.get_start_method(allow_none=True) in (None, "fork") and os.name == "posix"
    )


# --------------------------------------------------------------------------------------------
# sampler, dataset, loader
# --------------------------------------------------------------------------------------------


class StoreBatchDataset(Dataset):
    """``dataset[list_of_rows]`` -> one batch dict of tensors, read with one store call."""

    def __init__(
        self, store_path: str | Path, fields: tuple[str, ...] | None = None, reader: str = "auto"
    ) -> None:
        self.store_path = str(store_path)
        self.fields = fields or ("image_tokens", "prompt_latents", "prompt_mask")
        self.reader = reader
        self._store: Any = None
        self._pid: int | None = None

    @property
    def store(self) -> Any:
        # Open per process: a handle created before fork/spawn must not be reused in a worker.
        if self._store is None or self._pid != os.getpid():
            from gap3d.store import FeatureStore

            self._store = FeatureStore.open(self.store_path, reader=self.reader)
            self._pid = os.getpid()
        return self._store

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None, "_pid": None}

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        # In the order asked (the store reads sorted rows and gathers them back): which sample
        # sits at which batch position decides the noise and time it is trained with, so a
        # sorted-by-row batch would make training depend on the store's row layout.
        idx = np.asarray(rows, dtype=np.int64)
        # float16 halves what workers hand to the training process; the module casts.
        data = self.store.read(idx, fields=self.fields, floats="float16")
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
            from gap3d.store import FeatureStore, StoreError, StoreLocation

            if not StoreLocation.parse(self.cfg.store_path).exists():
                raise FileNotFoundError(
                    f"feature store {self.cfg.store_path} not found; run `gap3d cache` first"
                )
            try:
                self.store = FeatureStore.open(self.cfg.store_path, reader=reader_for(self.cfg))
            except StoreError as e:
                raise DataError(str(e)) from e
            self.notes = check_store(self.store, self.cfg)
        return self.store

    def prepare_split(self) -> None:
        """Compute the train/val split (writing ``split.json`` on rank 0); idempotent."""
        if len(self.train_rows):
            return
        store = self.open_store()
        self.n_heldout = len(store.indices(valid_only=True, committed_only=True, split="heldout"))
        rank0 = self.trainer is None or self.trainer.is_global_zero
        tr, va, note = split_store(store, self.cfg, write=rank0 and env_is_global_zero())
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
            self._dataset(),
            sampler,
            self.cfg.train.num_workers,
            self.cfg.train.multiprocessing_context,
            cls=ResumableLoader,
        )

    def _dataset(self) -> StoreBatchDataset:
        # Without workers the batches are read in this process, with its own reader choice.
        reader = reader_for(self.cfg) if self.cfg.train.num_workers == 0 else "auto"
        return StoreBatchDataset(self.cfg.store_path, reader=reader)

    def val_rows_used(self) -> np.ndarray:
        """The first ``train.val_samples`` val rows by score (fixed, so metrics compare across
        steps; a grown store may add val rows, which are then withheld but not used)."""
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
            self._dataset(),
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
            x = np.asarray(x, dtype=np.float64).sum(0)
            total = x if total is None else total + x
        return torch.as_tensor(total / len(rows), dtype=torch.float32)

    def statistics(self) -> dict[str, np.ndarray]:
        """Per-role channel statistics of exactly the rows this run trains on: the store's
        partial moments of its train split (no token read), minus the validation rows."""
        from gap3d.store.stats import to_stats

        store = self.open_store()
        self.prepare_split()
        parts = store.moments()
        held = store.token_moments(self.val_rows)
        return to_stats({role: parts[role].remove(held[role]) for role in parts})


def env_is_global_zero() -> bool:
    """Whether this process is global rank 0, as the launcher says in the environment.

    Lightning's subprocess launcher re-runs ``gap3d train`` in each extra rank with
    ``LOCAL_RANK``/``NODE_RANK`` set (torchrun also sets ``RANK``); before the trainer exists
    this is how a rank knows whether to write shared run files."""
    env = os.environ
    if "LOCAL_RANK" in env:
        node = int(env.get("NODE_RANK", env.get("GROUP_RANK", 0)))
        return int(env["LOCAL_RANK"]) == 0 and node == 0
    return int(env.get("RANK", 0)) == 0
