"""Keep a list of genes, in the list's order (for instance the highly variable genes)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from cellarium_steps.data.errors import InputError
from cellarium_steps.data.reader import column_positions
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
        self._cache: tuple[np.ndarray, torch.Tensor, bool] | None = None

    def column_index(self, var_names_g: np.ndarray) -> torch.Tensor:
        return self._lookup(var_names_g)[0]

    def _lookup(self, var_names_g: np.ndarray) -> tuple[torch.Tensor, bool]:
        """The columns of the list's genes, and whether they are all of ``var_names_g`` in order."""
        # The cache holds the names it was computed for: an id alone could be reused by another array
        # once the first is freed, and batches from loader workers bring equal arrays, not the same one.
        if self._cache is None or not _same_names(self._cache[0], var_names_g):
            index, missing = column_positions(var_names_g, self.filter_list)
            if missing:
                raise InputError(
                    f"Filter: {len(missing)} genes of the list are not in the data, e.g. {missing[:5]}"
                )
            unchanged = len(var_names_g) == len(index) and bool((index == np.arange(len(index))).all())
            self._cache = (var_names_g, torch.from_numpy(index), unchanged)
        return self._cache[1], self._cache[2]

    def forward(self, x_ng: torch.Tensor, var_names_g: np.ndarray) -> dict[str, torch.Tensor | np.ndarray]:
        index_k, unchanged = self._lookup(var_names_g)
        if unchanged:  # the data layer already selected these genes where it read the rows
            return {"x_ng": x_ng, "var_names_g": self.filter_list}
        return {"x_ng": select_columns(x_ng, index_k.to(x_ng.device)), "var_names_g": self.filter_list}


def _same_names(cached_g: np.ndarray, var_names_g: np.ndarray) -> bool:
    return cached_g is var_names_g or (len(cached_g) == len(var_names_g) and np.array_equal(cached_g, var_names_g))
