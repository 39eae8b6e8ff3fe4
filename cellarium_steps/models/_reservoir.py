"""A uniform sample of at most ``size`` rows of a stream, decided by index (Vitter's algorithm R in blocks).

The sampler holds no rows, only the count seen and a seeded random generator: given how many rows
arrive, it says which of them go to which slots of the sample, and its user stores its own arrays
(torch tensors, numpy arrays, several side by side) with ``store[slots] = arriving[rows]``.
"""

from __future__ import annotations

import numpy as np


class ReservoirSampler:
    """Which arriving rows enter a uniform sample of at most ``size`` rows of a stream.

    The first ``size`` rows fill slots ``0 .. size - 1`` in order; row ``t`` (0-based over the stream)
    after that draws a uniform slot of ``[0, t]`` and replaces it when the slot is inside the sample.
    After ``seen`` rows, every row seen so far is in the sample with probability ``size / seen``.
    Rows of one block that draw the same slot resolve as the sequential algorithm would: the later wins.
    """

    def __init__(self, size: int, seed: int) -> None:
        if int(size) < 0:
            raise ValueError(f"a reservoir's size must be non-negative, got {size}")
        self.size = int(size)
        self.seen = 0
        self.rng = np.random.default_rng(seed)

    @property
    def fill(self) -> int:
        """Slots in use: ``0 .. fill - 1``."""
        return min(self.seen, self.size)

    def offer(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Take the stream's next ``n`` rows: ``(rows_m, slots_m)``, row ``rows_m[i]`` of them goes to ``slots_m[i]``.

        Sorted by slot, each slot at most once, so slots ``>=`` the fill before the call are
        ``old fill .. fill - 1`` in order and can be appended.
        """
        t_n = np.arange(self.seen, self.seen + int(n), dtype=np.int64)
        slot_n = t_n.copy()
        late_n = t_n >= self.size
        if late_n.any():
            slot_n[late_n] = (self.rng.random(int(late_n.sum())) * (t_n[late_n] + 1)).astype(np.int64)
        kept_m = np.flatnonzero(slot_n < self.size)
        # The last row per slot wins: the first occurrence of each slot, reading the block backwards.
        slots_m, first_from_end_m = np.unique(slot_n[kept_m][::-1], return_index=True)
        self.seen += int(n)
        return kept_m[::-1][first_from_end_m], slots_m
