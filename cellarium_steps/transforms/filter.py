"""Keep a list of genes, in the list's order (for instance the highly variable genes)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from cellarium_steps.data.errors import InputError
from cellarium_steps.transforms._sparse import select_columns


class Filter(nn.Module):
    """Select ``filter_list`` genes from each batch; a gene absent from the data is an error.

    The column indices are computed once per distinct ``var_names_g`` and cached.
    """

    def __init__(self, filter_list: Sequence[str]) -> None:
        super().__init__()
        self.filter_list = np.asarray(filter_list, dtype=object)
        if len(self.filter_list) == 0:
            raise InputError("Filter: the gene list is empty")
        if len(set(self.filter_list)) != len(self.filter_list):
            raise InputError("Filter: the gene list has duplicates")
        self._cache: tuple[int, torch.Tensor] | None = None

    def column_index(self, var_names_g: np.ndarray) -> torch.Tensor:
        key = id(var_names_g)
        if self._cache is None or self._cache[0] != key:
            position = {name: i for i, name in enumerate(var_names_g)}
            missing = [name for name in self.filter_list if name not in position]
            if missing:
                raise InputError(
                    f"Filter: {len(missing)} genes of the list are not in the data, e.g. {missing[:5]}"
                )
            self._cache = (key, torch.tensor([position[name] for name in self.filter_list], dtype=torch.long))
        return self._cache[1]

    def forward(self, x_ng: torch.Tensor, var_names_g: np.ndarray) -> dict[str, torch.Tensor | np.ndarray]:
        if var_names_g is self.filter_list or (
            len(var_names_g) == len(self.filter_list) and np.array_equal(var_names_g, self.filter_list)
        ):
            # Already these genes in this order (the data layer selected them where it read the rows).
            return {"x_ng": x_ng, "var_names_g": self.filter_list}
        index_k = self.column_index(var_names_g).to(x_ng.device)
        return {"x_ng": select_columns(x_ng, index_k), "var_names_g": self.filter_list}
