"""Which cells each rank and loader worker reads, batch by batch, in one epoch.

The plan is pure arithmetic on shard sizes, so every process derives the same split
without talking to the others:

* unshuffled, the epoch's cell order is the shards in order, each shard's rows in order;
* shuffled, each shard's rows are cut into small blocks (``shuffle_block_size`` rows) whose
  order is permuted, and that order is cut into *chunks* of whole blocks. The chunks of every
  shard are then interleaved at random (each chunk's place drawn over the whole collection, a
  shard's chunks keep their relative order), consecutive runs of ``shuffle_window_chunks``
  chunks form a *window* (about ``shuffle_window`` cells), and cells are permuted within each
  window. A batch is thus a random sample of a window: cells from several shards, each read from
  random places of its shard. Shards made one per dataset, donor or tissue, as collections are,
  therefore do not train one after another (which costs scVI about 0.05 of label-transfer
  accuracy across sources; see docs/benchmarks.md), while a loader worker still reads a whole
  window once (a few shards, few contiguous runs each) and serves its batches from memory;
* rank ``r`` of ``W`` takes the contiguous slice ``[N*r//W, N*(r+1)//W)`` of that order;
* every rank cuts its slice into the same number of batches, ``ceil(ceil(N/W) / batch_size)``,
  whose sizes differ by at most one cell. Ranks therefore run the same number of steps
  (DDP needs that) and no cell is padded or repeated;
* unshuffled, batch ``j`` of a rank goes to loader worker ``j % num_workers``, the order in
  which a DataLoader collects batches from its workers; shuffled, batches go to workers by
  the window they start in, so that each window is read by one worker.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np

# Block orders kept per plan (by shard): a window visits a few shards, which later windows revisit.
_BLOCK_ORDERS_KEPT = 64


@dataclass(frozen=True)
class BatchPiece:
    """Rows of one shard that belong to one batch (sorted, so they read as few runs).

    When shuffled, ``window_rows`` are all rows of that shard in the window the piece lies in
    (sorted), and ``window`` numbers the window within the epoch, so a reader can cache it.
    """

    shard_index: int
    rows: np.ndarray
    window: int = -1
    window_rows: np.ndarray | None = None


@dataclass(frozen=True)
class _Chunks:
    """The shuffled epoch's chunks in order: their shard, their number within it and their size;
    ``window_offsets`` are the positions in the epoch order where each window starts (and the end)."""

    shard_c: np.ndarray
    chunk_c: np.ndarray
    size_c: np.ndarray
    window_offsets: np.ndarray


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
    shuffle_window_chunks: int = 16

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if min(self.shuffle_block_size, self.shuffle_window, self.shuffle_window_chunks) < 1:
            raise ValueError("shuffle_block_size, shuffle_window and shuffle_window_chunks must be positive")

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

    def batch_bounds(self, rank: int | None = None) -> list[tuple[int, int]]:
        """[start, stop) positions in the epoch order of each batch of a rank."""
        lo, hi = self.rank_range(rank)
        n_rank, n_batches = hi - lo, self.n_batches_per_rank
        bounds = [(lo + n_rank * j // n_batches, lo + n_rank * (j + 1) // n_batches) for j in range(n_batches)]
        return [(a, b) for a, b in bounds if b > a]

    def batches(self, worker_id: int = 0, num_workers: int = 1) -> Iterator[list[BatchPiece]]:
        """The batches of this rank that loader worker ``worker_id`` reads, in order."""
        if self.shuffle:
            yield from self._shuffled_batches(worker_id, num_workers)
            return
        offsets = np.concatenate([[0], np.cumsum(self.shard_sizes)])
        for j, (start, stop) in enumerate(self.batch_bounds()):
            if j % num_workers != worker_id:
                continue
            first = int(np.searchsorted(offsets, start, side="right")) - 1
            pieces = []
            for k in range(first, len(self.shard_sizes)):
                if offsets[k] >= stop:
                    break
                a, b = max(start, offsets[k]) - offsets[k], min(stop, offsets[k + 1]) - offsets[k]
                pieces.append(BatchPiece(k, np.arange(a, b)))
            yield pieces

    # ------------------------------------------------------------------------------------------ shuffled

    @property
    def _chunk_blocks(self) -> int:
        return max(1, self.shuffle_window // (self.shuffle_block_size * self.shuffle_window_chunks))

    @cached_property
    def _block_orders(self) -> dict[int, np.ndarray]:
        return {}

    def _block_order(self, shard_index: int) -> np.ndarray:
        """The epoch's permutation of a shard's blocks."""
        cache = self._block_orders
        order = cache.pop(shard_index, None)
        if order is None:
            n_blocks = math.ceil(int(self.shard_sizes[shard_index]) / self.shuffle_block_size)
            order = np.random.default_rng([self.seed, self.epoch, shard_index + 1]).permutation(n_blocks)
            while len(cache) >= _BLOCK_ORDERS_KEPT:
                cache.pop(next(iter(cache)))
        cache[shard_index] = order
        return order

    @cached_property
    def _chunks(self) -> _Chunks:
        block, per_chunk = self.shuffle_block_size, self._chunk_blocks
        sizes = np.asarray(self.shard_sizes, dtype=np.int64)
        n_blocks_s = -(-sizes // block)
        n_chunks_s = -(-n_blocks_s // per_chunk)
        # A random interleaving of the shards' chunk sequences (a shard's chunks keep their order).
        shard_c = np.random.default_rng([self.seed, self.epoch]).permutation(np.repeat(np.arange(len(sizes)), n_chunks_s))
        by_shard = np.argsort(shard_c, kind="stable")  # shard by shard, each shard's chunks in order
        first_chunk_s = np.cumsum(n_chunks_s) - n_chunks_s
        chunk_c = np.empty(len(shard_c), dtype=np.int64)
        chunk_c[by_shard] = np.arange(len(shard_c)) - np.repeat(first_chunk_s, n_chunks_s)
        blocks_c = np.minimum(per_chunk, n_blocks_s[shard_c] - chunk_c * per_chunk)
        size_c = blocks_c * block
        # A shard's last rows make a short block wherever the permutation put it.
        for s in np.flatnonzero(sizes % block):
            short_at = int(np.flatnonzero(self._block_order(int(s)) == n_blocks_s[s] - 1)[0])
            size_c[by_shard[first_chunk_s[s] + short_at // per_chunk]] -= block - sizes[s] % block
        window_sizes = np.add.reduceat(size_c, np.arange(0, len(size_c), self.shuffle_window_chunks)) \
            if len(size_c) else np.zeros(0, dtype=np.int64)
        return _Chunks(shard_c, chunk_c, size_c, np.concatenate([[0], np.cumsum(window_sizes)]))

    def _window(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        """A window's cells in the epoch's order: their shard and row."""
        chunks, block, per_chunk = self._chunks, self.shuffle_block_size, self._chunk_blocks
        shard_parts, row_parts = [], []
        first = window * self.shuffle_window_chunks
        for c in range(first, min(first + self.shuffle_window_chunks, len(chunks.shard_c))):
            s, k = int(chunks.shard_c[c]), int(chunks.chunk_c[c])
            blocks = self._block_order(s)[k * per_chunk : (k + 1) * per_chunk]
            rows = (blocks[:, None] * block + np.arange(block)).ravel()
            rows = rows[rows < self.shard_sizes[s]]
            shard_parts.append(np.full(len(rows), s, dtype=np.int64))
            row_parts.append(rows)
        order = np.random.default_rng([self.seed, self.epoch, 0, window]).permutation(sum(len(r) for r in row_parts))
        return np.concatenate(shard_parts)[order], np.concatenate(row_parts)[order]

    def _shuffled_batches(self, worker_id: int, num_workers: int) -> Iterator[list[BatchPiece]]:
        offsets = self._chunks.window_offsets
        windows: dict[int, tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]] = {}
        for start, stop in self.batch_bounds():
            first = int(np.searchsorted(offsets, start, side="right")) - 1
            if first % num_workers != worker_id:
                continue
            pieces = []
            for w in range(first, int(np.searchsorted(offsets, stop, side="left"))):
                if w not in windows:
                    # The windows of the current batch only: a few thousand cells.
                    for old in [k for k in windows if k < w]:
                        del windows[old]
                    shard_n, row_n = self._window(w)
                    windows[w] = (shard_n, row_n, {int(s): np.sort(row_n[shard_n == s]) for s in np.unique(shard_n)})
                shard_n, row_n, window_rows = windows[w]
                a, b = max(start, offsets[w]) - offsets[w], min(stop, offsets[w + 1]) - offsets[w]
                for s in np.unique(shard_n[a:b]):
                    rows = np.sort(row_n[a:b][shard_n[a:b] == s])
                    pieces.append(BatchPiece(int(s), rows, w, window_rows[int(s)]))
            yield pieces
