"""log(1 + x), which keeps zeros at zero and so keeps sparse batches sparse."""

from __future__ import annotations

import torch
from torch import nn

from cellarium_steps.transforms._sparse import map_values


class Log1p(nn.Module):
    def forward(self, x_ng: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"x_ng": map_values(x_ng, torch.log1p)}
