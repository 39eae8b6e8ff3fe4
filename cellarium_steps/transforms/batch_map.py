"""Re-code each cell's batch, e.g. batches a model never saw read as one it did (predict --unseen-batch)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class BatchIndexMap(nn.Module):
    """``batch_index_n`` -> ``index_map[batch_index_n]``.

    Set up at run time by the step that reads the data (never saved in a checkpoint's recipe): the map
    is a non-persistent buffer, so it moves to the batch's device with the module.

    Args:
        index_map: The new code of each code the data layer gives.
    """

    def __init__(self, index_map: Sequence[int]) -> None:
        super().__init__()
        self.index_map: torch.Tensor
        self.register_buffer("index_map", torch.as_tensor(list(index_map), dtype=torch.long), persistent=False)

    def forward(self, batch_index_n: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"batch_index_n": self.index_map[batch_index_n.long()]}
