"""The training batch order: batch k is a pure function of (seed, k), sharded over ranks.

Plain numpy (no torch import), so tools can compute a rank's view of a run cheaply; the
DataLoader takes it as its sampler (``batch_size=None``: each item is a whole batch).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class DataError(ValueError):
    """The data cannot be trained on as configured; the message says what to do."""


class StepBatchSampler:
    """Yields this rank's index list of global batch k, for k = start, start+1, ...

    ``rows`` are the training rows in a canonical order (``split.split_rows`` orders them by
    the (seed, key) score); each epoch permutes that order.

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
        if block < 1:
            raise DataError(f"train.shuffle_block must be >= 1, got {block}")
        rows = np.asarray(rows, dtype=np.int64)
        # block == 1: the permutation acts on the rows in the order given (the split's key
        # order), so the batches hold the same samples however the store laid them out.
        # block > 1: runs of neighbouring store rows are the point, so rows are taken sorted.
        self.rows = rows if block == 1 else np.sort(rows)
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
