"""Random augmentations of count batches for contrastive learning (SimCLR-style two views).

The contrastive recipe, as in cellarium-ml: ``DuplicateViews`` stacks the batch on itself
(rows ``0..n-1`` are view 1, rows ``n..2n-1`` view 2, row ``i`` and ``n + i`` the same cell), then
independent random augmentations (``BinomialResample``, ``GeneDropout``) make the two views
differ, then the usual NormalizeTotal / Log1p, then :class:`~cellarium_steps.models.ContrastiveMLP`,
which treats the first and second halves as the positive pairs.

Each augmentation draws from its own ``torch.Generator`` seeded with ``seed``: the same seed and
the same sequence of batches give the same augmentations. Sparse CSR batches stay sparse (the
augmentations only ever lower counts, so zeros stay zero). When the batch carries
``total_mrna_umis_n`` it is scaled by the fraction of counts each cell kept, so NormalizeTotal
afterwards normalises the augmented cell by its new depth.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from cellarium_steps.transforms._sparse import _csr


def _row_sums(x_ng: torch.Tensor) -> torch.Tensor:
    if x_ng.layout == torch.sparse_csr:
        crow = x_ng.crow_indices().long()
        row_e = torch.repeat_interleave(torch.arange(x_ng.shape[0], device=x_ng.device), crow.diff())
        return torch.zeros(x_ng.shape[0], dtype=x_ng.values().dtype, device=x_ng.device).index_add_(0, row_e, x_ng.values())
    return x_ng.sum(dim=1)


def _values(x_ng: torch.Tensor) -> torch.Tensor:
    return x_ng.values() if x_ng.layout == torch.sparse_csr else x_ng


def _with_values(x_ng: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    if x_ng.layout == torch.sparse_csr:
        return _csr(x_ng.crow_indices(), x_ng.col_indices(), values, x_ng.shape)
    return values


class _SeededAugmentation(nn.Module):
    """Holds a generator per device, seeded on first use."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def _output(self, x_ng: torch.Tensor, new_x_ng: torch.Tensor, total_mrna_umis_n: torch.Tensor | None) -> dict[str, Any]:
        out: dict[str, Any] = {"x_ng": new_x_ng}
        if total_mrna_umis_n is not None:
            before_n = _row_sums(x_ng).to(total_mrna_umis_n.dtype)
            after_n = _row_sums(new_x_ng).to(total_mrna_umis_n.dtype)
            kept_n = torch.where(before_n > 0, after_n / before_n.clamp(min=1e-12), torch.ones_like(before_n))
            out["total_mrna_umis_n"] = total_mrna_umis_n * kept_n
        return out


class DuplicateViews(nn.Module):
    """Stack the batch on itself: ``x_ng`` becomes ``[x_ng; x_ng]`` (2n rows).

    Every other per-cell entry of the batch (keys ending in ``_n``: tensors, numpy arrays) is
    duplicated the same way, so later transforms (NormalizeTotal's ``total_mrna_umis_n``) line up.
    Rows ``i`` and ``n + i`` are the two views of cell ``i``.
    """

    def forward(self, **batch: Any) -> dict[str, Any]:
        x_ng = batch["x_ng"]
        out: dict[str, Any] = {"x_ng": _stack_twice(x_ng)}
        n = x_ng.shape[0]
        for key, value in batch.items():
            if not key.endswith("_n") or key == "x_ng":
                continue
            if isinstance(value, torch.Tensor) and value.shape[:1] == (n,):
                out[key] = torch.cat([value, value])
            elif isinstance(value, np.ndarray) and value.shape[:1] == (n,):
                out[key] = np.concatenate([value, value])
        return out


def _stack_twice(x_ng: torch.Tensor) -> torch.Tensor:
    if x_ng.layout != torch.sparse_csr:
        return torch.cat([x_ng, x_ng])
    crow = x_ng.crow_indices()
    nnz = crow[-1:]
    new_crow = torch.cat([crow, crow[1:] + nnz])
    return _csr(
        new_crow, torch.cat([x_ng.col_indices(), x_ng.col_indices()]), torch.cat([x_ng.values(), x_ng.values()]),
        torch.Size((2 * x_ng.shape[0], x_ng.shape[1])),
    )


class BinomialResample(_SeededAugmentation):
    """Thin each count: ``y ~ Binomial(x, p)`` with ``p ~ Uniform(p_low, p_high)`` drawn per entry.

    Args:
        p_low: Lower bound of the keep probability.
        p_high: Upper bound of the keep probability.
        seed: Seed of the transform's random generator.
    """

    def __init__(self, p_low: float = 0.5, p_high: float = 1.0, seed: int = 0) -> None:
        super().__init__(seed)
        if not 0.0 <= p_low <= p_high <= 1.0:
            raise ValueError(f"BinomialResample: need 0 <= p_low <= p_high <= 1, got {p_low}, {p_high}")
        self.p_low = p_low
        self.p_high = p_high

    def forward(self, x_ng: torch.Tensor, total_mrna_umis_n: torch.Tensor | None = None) -> dict[str, Any]:
        values = _values(x_ng)
        gen = self.generator(values.device)
        counts = values.to(torch.float32).round().clamp(min=0)
        p = torch.rand(counts.shape, generator=gen, device=counts.device) * (self.p_high - self.p_low) + self.p_low
        resampled = torch.binomial(counts, p, generator=gen).to(values.dtype)
        return self._output(x_ng, _with_values(x_ng, resampled), total_mrna_umis_n)


class GeneDropout(_SeededAugmentation):
    """Set each entry to zero with probability ``p``, independently.

    Args:
        p: Dropout probability.
        seed: Seed of the transform's random generator.
    """

    def __init__(self, p: float = 0.1, seed: int = 0) -> None:
        super().__init__(seed)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"GeneDropout: p must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x_ng: torch.Tensor, total_mrna_umis_n: torch.Tensor | None = None) -> dict[str, Any]:
        values = _values(x_ng)
        gen = self.generator(values.device)
        keep = torch.rand(values.shape, generator=gen, device=values.device) >= self.p
        return self._output(x_ng, _with_values(x_ng, values * keep.to(values.dtype)), total_mrna_umis_n)
