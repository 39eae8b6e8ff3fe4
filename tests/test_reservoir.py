"""The reservoir sampler shared by scVI's validation classifier and the report's cell sample."""

from __future__ import annotations

from collections import Counter

import numpy as np

from cellarium_steps.models._reservoir import ReservoirSampler
from cellarium_steps.outputs.report import CellSample


def _sample_by_blocks(size: int, seed: int, block_sizes: list[int]) -> np.ndarray:
    """Stream positions held in each slot after offering blocks of these sizes."""
    sampler, sample_r, start = ReservoirSampler(size, seed), np.full(size, -1), 0
    for n in block_sizes:
        rows_m, slots_m = sampler.offer(n)
        assert np.all(np.diff(slots_m) > 0) and np.all((0 <= rows_m) & (rows_m < n))  # sorted, each slot once
        sample_r[slots_m] = start + rows_m
        start += n
    return sample_r[: sampler.fill]


def test_blocks_give_the_sample_of_the_row_by_row_algorithm() -> None:
    # Rows of one block that draw the same slot must resolve as row-by-row offers do: the later wins.
    for size, seed in ((5, 0), (17, 1), (1, 2)):
        by_row = _sample_by_blocks(size, seed, [1] * 300)
        assert np.array_equal(_sample_by_blocks(size, seed, [3, 40, 0, 1, 256]), by_row)
        assert np.array_equal(_sample_by_blocks(size, seed, [300]), by_row)
        assert len(set(by_row.tolist())) == size


def test_first_rows_fill_the_slots_in_order_then_each_row_is_kept_uniformly() -> None:
    sampler = ReservoirSampler(10, seed=0)
    rows_m, slots_m = sampler.offer(4)
    assert rows_m.tolist() == [0, 1, 2, 3] and slots_m.tolist() == [0, 1, 2, 3] and sampler.fill == 4
    n_stream, size, n_trials = 100, 10, 3000
    hits = np.zeros(n_stream)
    for trial in range(n_trials):
        hits[_sample_by_blocks(size, trial, [7] * 14 + [2])] += 1
    expected = n_trials * size / n_stream  # 300 hits each, sd ~16.4
    assert np.abs(hits - expected).max() < 5 * np.sqrt(expected * (1 - size / n_stream))


def _cell_sample(seed: int) -> tuple[CellSample, Counter[tuple[str, str]]]:
    rng = np.random.default_rng(0)
    sample, counts = CellSample(size=25, seed=seed), Counter()
    for n in (10, 0, 60, 7):
        batch = rng.choice(["b1", "b2"], n).astype(object)
        cell_type = rng.choice(["t1", "t2", "t3"], n).astype(object)
        # Each cell's latent encodes its batch and type, so a mismatched row would show.
        latent = np.stack([batch == "b1", cell_type == "t2", rng.normal(size=n)], axis=1).astype(np.float32)
        sample.add(latent, batch, cell_type)
        counts.update(zip(batch.tolist(), cell_type.tolist()))
    return sample, counts


def test_cell_sample_keeps_at_most_size_cells_and_counts_every_cell() -> None:
    sample, counts = _cell_sample(seed=3)
    assert sample.seen == 77 and len(sample.batch) == len(sample.cell_type) == sample.latent.shape[0] == 25
    assert sample.counts == counts
    assert np.array_equal(sample.latent[:, 0] == 1, sample.batch == "b1")
    assert np.array_equal(sample.latent[:, 1] == 1, sample.cell_type == "t2")
    assert len(set(sample.latent[:, 2].tolist())) == 25  # no cell twice
    assert np.array_equal(_cell_sample(seed=3)[0].latent, sample.latent)  # seeded
    assert not np.array_equal(_cell_sample(seed=4)[0].latent, sample.latent)
