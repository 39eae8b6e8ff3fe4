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
@pytest.mark.parametrize("shuffle", [False, True])
def test_every_cell_once_and_equal_steps(world_size: int, num_workers: int, shuffle: bool) -> None:
    sizes = np.array([1000, 1, 0, 357, 64])
    kwargs = dict(shard_sizes=sizes, batch_size=100, shuffle=shuffle, seed=3, epoch=1, shuffle_block_size=16,
                  shuffle_window=48)
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


def test_invalid_plan_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        EpochPlan(shard_sizes=np.array([3]), batch_size=0)
    with pytest.raises(ValueError, match="rank"):
        EpochPlan(shard_sizes=np.array([3]), batch_size=1, rank=2, world_size=2)
