"""The epoch plan: every cell exactly once across ranks and workers, equal steps per rank."""

from __future__ import annotations

import numpy as np
import pytest

from cellarium_steps.data.plan import EpochPlan


def all_cells(plan_kwargs: dict, world_size: int, num_workers: int) -> tuple[list[tuple[int, int]], list[int]]:
    cells, steps = [], []
    for rank in range(world_size):
        plan = EpochPlan(rank=rank, world_size=world_size, **plan_kwargs)
        n_batches = 0
        for worker in range(num_workers):
            for pieces in plan.batches(worker, num_workers):
                n_batches += 1
                cells += [(p.shard_index, int(r)) for p in pieces for r in p.rows]
        steps.append(n_batches)
    return cells, steps


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
@pytest.mark.parametrize("num_workers", [1, 2, 3])
@pytest.mark.parametrize(("shuffle", "window_chunks"), [(False, 8), (True, 1), (True, 3), (True, 8)])
def test_every_cell_once_and_equal_steps(world_size: int, num_workers: int, shuffle: bool, window_chunks: int) -> None:
    sizes = np.array([1000, 1, 0, 357, 64])
    kwargs = dict(shard_sizes=sizes, batch_size=100, shuffle=shuffle, seed=3, epoch=1, shuffle_block_size=16,
                  shuffle_window=96, shuffle_window_chunks=window_chunks)
    cells, steps = all_cells(kwargs, world_size, num_workers)
    expected = {(s, r) for s, n in enumerate(sizes) for r in range(n)}
    assert len(cells) == sizes.sum()
    assert set(cells) == expected
    assert len(set(steps)) == 1, f"ranks run different numbers of steps: {steps}"


def test_batch_sizes_differ_by_at_most_one_and_never_exceed_batch_size() -> None:
    plan = EpochPlan(shard_sizes=np.array([1001, 500]), batch_size=128, rank=1, world_size=3)
    sizes = [b - a for a, b in plan.batch_bounds()]
    assert max(sizes) - min(sizes) <= 1
    assert max(sizes) <= 128


def test_unshuffled_order_is_file_order() -> None:
    plan = EpochPlan(shard_sizes=np.array([5, 5]), batch_size=4)
    rows = [(p.shard_index, list(p.rows)) for pieces in plan.batches() for p in pieces]
    flat = [(s, r) for s, rs in rows for r in rs]
    assert flat == [(0, r) for r in range(5)] + [(1, r) for r in range(5)]


def test_shuffle_depends_on_seed_and_epoch_only() -> None:
    def order(seed: int, epoch: int) -> list[tuple[int, int]]:
        plan = EpochPlan(shard_sizes=np.array([300, 300]), batch_size=50, shuffle=True, seed=seed, epoch=epoch,
                         shuffle_block_size=8)
        return [(p.shard_index, int(r)) for pieces in plan.batches() for p in pieces for r in p.rows]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)


def shuffled_cells(sizes: list[int], **kwargs) -> tuple[list[list], np.ndarray]:
    """Each batch's pieces, and each cell's shard in the epoch's order."""
    plan = EpochPlan(shard_sizes=np.array(sizes), shuffle=True, seed=0, **kwargs)
    batches = list(plan.batches())
    return batches, np.array([p.shard_index for pieces in batches for p in pieces for _ in p.rows])


def test_shuffled_batches_mix_the_shards() -> None:
    """Shards made one per dataset must not train one after another: every batch samples several
    shards, in about the collection's proportions, from the first batch on."""
    sizes = [60000, 30000, 20000, 10000]
    batches, shard_of_cell = shuffled_cells(sizes, batch_size=128)
    assert np.mean([len({p.shard_index for p in pieces}) >= 2 for pieces in batches]) > 0.95
    expected = np.array(sizes) / sum(sizes)
    for part in np.array_split(shard_of_cell, 4):  # each quarter of the epoch
        np.testing.assert_allclose(np.bincount(part, minlength=4) / len(part), expected, atol=0.1)
    share_0 = [sum(len(p.rows) for p in pieces if p.shard_index == 0) / sum(len(p.rows) for p in pieces)
               for pieces in batches]
    # Windows of 16 chunks: a batch's share is about Binomial(16, 0.5) / 16 (sd 0.125); one shard at a time: 0.5
    assert abs(np.mean(share_0) - 0.5) < 0.03 and np.std(share_0) < 0.2


def test_shuffled_windows_bound_what_a_worker_reads() -> None:
    """A batch reads from at most two windows; a window holds at most ``shuffle_window`` cells of at
    most ``shuffle_window_chunks`` shards, each shard's rows a few runs of whole blocks."""
    sizes = [5000, 1000, 37, 2500]
    batches, _ = shuffled_cells(sizes, batch_size=100, shuffle_window=1024, shuffle_window_chunks=4)
    windows: dict[int, dict[int, np.ndarray]] = {}
    for pieces in batches:
        assert len({p.window for p in pieces}) <= 2
        for p in pieces:
            assert np.isin(p.rows, p.window_rows).all()
            windows.setdefault(p.window, {})[p.shard_index] = p.window_rows
    for shards in windows.values():
        assert sum(len(rows) for rows in shards.values()) <= 1024 and len(shards) <= 4
        for rows in shards.values():  # 16-row blocks: a chunk of 16 blocks is at most 16 runs
            assert np.count_nonzero(np.diff(rows) != 1) + 1 <= 16 * 4


def test_invalid_plan_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        EpochPlan(shard_sizes=np.array([3]), batch_size=0)
    with pytest.raises(ValueError, match="rank"):
        EpochPlan(shard_sizes=np.array([3]), batch_size=1, rank=2, world_size=2)
    with pytest.raises(ValueError, match="shuffle_window_chunks"):
        EpochPlan(shard_sizes=np.array([3]), batch_size=1, shuffle_window_chunks=0)
