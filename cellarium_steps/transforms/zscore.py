"""Centre and scale genes with statistics from the mean/var step."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cellarium_steps._batch import check_var_names, densify


class ZScore(nn.Module):
    """(x_ng - mean_g) / (std_g + eps); the output is dense, as centring fills the zeros.

    Args:
        mean_g: per-gene means (for instance ``OnePassMeanVarStd.mean_g`` of the same transformed data).
        std_g: per-gene standard deviations.
        var_names_g: the genes the statistics belong to, checked against each batch.
        eps: guards genes with zero variance.
    """

    def __init__(self, mean_g: torch.Tensor, std_g: torch.Tensor, var_names_g: np.ndarray, eps: float = 1e-6) -> None:
        super().__init__()
        self.var_names_g = np.asarray(var_names_g)
        self.eps = eps
        self.mean_g: torch.Tensor
        self.std_g: torch.Tensor
        self.register_buffer("mean_g", torch.as_tensor(mean_g, dtype=torch.float32))
        self.register_buffer("std_g", torch.as_tensor(std_g, dtype=torch.float32))

    def forward(self, x_ng: torch.Tensor, var_names_g: np.ndarray) -> dict[str, torch.Tensor]:
        check_var_names(self.var_names_g, var_names_g)
        return {"x_ng": (densify(x_ng) - self.mean_g) / (self.std_g + self.eps)}
