"""Which cells each rank and loader worker reads, batch by batch, in one epoch.

The plan is pure arithmetic on shard sizes, so every process derives the same split
without talking to the others:

* the epoch's cell order is the shards in order (or permuted by seed and epoch), and
  within a shard its rows in order; shuffled, a shard's rows are cut into small blocks whose
  order is permuted, and then cells are permuted within consecutive *windows* of
  ``shuffle_window`` cells. A batch is thus a random sample of a window, which spans
  ``shuffle_window / shuffle_block_size`` random places of the shard; a loader worker reads a
  whole window once (few contiguous runs) and serves its batches from memory;
* rank ``r`` of ``W`` takes the contiguous slice ``[N*r//W, N*(r+1)//W)`` of that order;
* every rank cuts its slice into the same number of batches, ``ceil(ceil(N/W) / batch_size)``,
  whose sizes differ by at most one cell. Ranks therefore run the same number of steps
  (DDP needs that) and no cell is padded or repeated;
* unshuffled, batch ``j`` of a rank goes to loader worker ``j % num_workers``, the order in
  which a DataLoader collects batches from its workers; shuffled, batches go to workers by
  window, so that each window is read by one worker.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchPiece:
    """Rows of one shard that belong to one batch (sorted, so they read as few runs).

    When shuffled, ``window_rows`` are all rows of the read window the piece lies in
    (sorted), and ``window`` identifies it within the shard, so a reader can cache it.
    """

    shard_index: int
    rows: np.ndarray
    window: int = -1
    window_rows: np.ndarray | None = None


@dataclass(frozen=True)
class EpochPlan:
    shard_sizes: np.ndarray
    batch_size: int
    rank: int = 0
    world_size: int = 1
    shuffle: bool = False
    seed: int = 0
    epoch: int = 0
    shuffle_block_size: int = 16
    shuffle_window: int = 4096

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")

    @property
    def n_cells(self) -> int:
        return int(np.sum(self.shard_sizes))

    @property
    def n_batches_per_rank(self) -> int:
        largest_share = math.ceil(self.n_cells / self.world_size)
        return math.ceil(largest_share / self.batch_size)

    def rank_range(self, rank: int | None = None) -> tuple[int, int]:
        r = self.rank if rank is None else rank
        n = self.n_cells
        return n * r // self.world_size, n * (r + 1) // self.world_size

    def shard_order(self) -> np.ndarray:
        n_shards = len(self.shard_sizes)
        if not self.shuffle:
            return np.arange(n_shards)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n_shards)

    def shard_rows(self, shard_index: int) -> np.ndarray | None:
        """The epoch's row order within a shard; None means the natural order."""
        if not self.shuffle:
            return None
        size = int(self.shard_sizes[shard_index])
        block = self.shuffle_block_size
        n_blocks = math.ceil(size / block)
        rng = np.random.default_rng([self.seed, self.epoch, shard_index + 1])
        starts = rng.permutation(n_blocks) * block
        rows = np.concatenate([np.arange(s, min(s + block, size)) for s in starts] or [np.zeros(0, np.int64)])
        for w in range(0, size, self.shuffle_window):
            rows[w : w + self.shuffle_window] = rng.permutation(rows[w : w + self.shuffle_window])
        return rows

    def batch_bounds(self, rank: int | None = None) -> list[tuple[int, int]]:
        """[start, stop) positions in the epoch order of each batch of a rank."""
        lo, hi = self.rank_range(rank)
        n_rank, n_batches = hi - lo, self.n_batches_per_rank
        bounds = [(lo + n_rank * j // n_batches, lo + n_rank * (j + 1) // n_batches) for j in range(n_batches)]
        return [(a, b) for a, b in bounds if b > a]

    def batches(self, worker_id: int = 0, num_workers: int = 1) -> Iterator[list[BatchPiece]]:
        """The batches of this rank that loader worker ``worker_id`` reads, in order."""
        order = self.shard_order()
        sizes = self.shard_sizes[order]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        cached: tuple[int, np.ndarray | None] = (-1, None)
        for j, (start, stop) in enumerate(self.batch_bounds()):
            owner = (start // self.shuffle_window) if self.shuffle else j
            if owner % num_workers != worker_id:
                continue
            pieces = []
            first = int(np.searchsorted(offsets, start, side="right")) - 1
            for k in range(first, len(order)):
                if offsets[k] >= stop:
                    break
                shard_index = int(order[k])
                a, b = max(start, offsets[k]) - offsets[k], min(stop, offsets[k + 1]) - offsets[k]
                if cached[0] != shard_index:
                    cached = (shard_index, self.shard_rows(shard_index))
                shard_rows = cached[1]
                if shard_rows is None:
                    pieces.append(BatchPiece(shard_index, np.arange(a, b)))
                    continue
                window_size = self.shuffle_window
                for w in range(a // window_size, (b - 1) // window_size + 1):
                    lo, hi = max(a, w * window_size), min(b, (w + 1) * window_size)
                    window_rows = np.sort(shard_rows[w * window_size : (w + 1) * window_size])
                    pieces.append(BatchPiece(shard_index, np.sort(shard_rows[lo:hi]), w, window_rows))
            yield pieces
