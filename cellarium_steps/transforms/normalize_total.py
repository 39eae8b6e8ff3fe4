"""Scale each cell to a common total count, as scanpy's normalize_total."""

from __future__ import annotations

import torch
from torch import nn

from cellarium_steps.transforms._sparse import scale_rows


class NormalizeTotal(nn.Module):
    """x_ng * target_count / total_mrna_umis_n, per cell; sparse batches stay sparse.

    ``total_mrna_umis_n`` comes from the data layer (the cell's total over all genes), so the
    result does not depend on whether genes were filtered before or after.

    Args:
        target_count: the total every cell is scaled to.
        eps: guards cells with no counts.
    """

    def __init__(self, target_count: float = 10_000, eps: float = 1e-6) -> None:
        super().__init__()
        self.target_count = target_count
        self.eps = eps

    def forward(self, x_ng: torch.Tensor, total_mrna_umis_n: torch.Tensor) -> dict[str, torch.Tensor]:
        scale_n = self.target_count / (total_mrna_umis_n.to(torch.float32) + self.eps)
        return {"x_ng": scale_rows(x_ng, scale_n)}
