"""Keep a list of genes, in the list's order (for instance the highly variable genes)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cellarium_steps.data.errors import InputError
from cellarium_steps.data.reader import column_positions
from cellarium_steps.transforms._sparse import select_columns, spread_columns

MISSING_GENES = ("error", "zero")


@dataclass(frozen=True)
class _Columns:
    """Where the list's genes are in one ``var_names_g``."""

    var_names_g: np.ndarray
    #: the columns of the list's genes that the data has, in the list's order
    index_m: torch.Tensor
    #: each of those genes' position in the list; None when the data has every gene
    position_m: torch.Tensor | None
    #: the data is exactly the list, in order
    unchanged: bool


class Filter(nn.Module):
    """Select ``filter_list`` genes from each batch.

    A gene absent from the data is an error, unless ``missing_genes="zero"``: it then reads as a column
    of zeros (a sparse batch stays sparse). Steps set that mode at run time, after checking how many
    genes are missing (``--missing-genes``); checkpoints keep the default. The column indices are
    computed once per distinct ``var_names_g`` and cached.
    """

    def __init__(self, filter_list: Sequence[str], missing_genes: str = "error") -> None:
        super().__init__()
        self.filter_list = np.asarray(filter_list, dtype=object)
        if len(self.filter_list) == 0:
            raise InputError("Filter: the gene list is empty")
        if len(set(self.filter_list)) != len(self.filter_list):
            raise InputError("Filter: the gene list has duplicates")
        if missing_genes not in MISSING_GENES:
            raise ValueError(f"Filter: missing_genes must be one of {MISSING_GENES}, got {missing_genes!r}")
        self.missing_genes = missing_genes
        self._cache: _Columns | None = None

    def column_index(self, var_names_g: np.ndarray) -> torch.Tensor:
        return self._lookup(var_names_g).index_m

    def _lookup(self, var_names_g: np.ndarray) -> _Columns:
        # The cache holds the names it was computed for: an id alone could be reused by another array
        # once the first is freed, and batches from loader workers bring equal arrays, not the same one.
        if self._cache is None or not _same_names(self._cache.var_names_g, var_names_g):
            index, missing = column_positions(var_names_g, self.filter_list)
            if missing and self.missing_genes == "error":
                raise InputError(
                    f"Filter: {len(missing)} genes of the list are not in the data, e.g. {missing[:5]}"
                )
            present = index >= 0
            unchanged = not missing and len(var_names_g) == len(index) and bool((index == np.arange(len(index))).all())
            position = None if not missing else torch.from_numpy(np.flatnonzero(present))
            self._cache = _Columns(var_names_g, torch.from_numpy(index[present]), position, unchanged)
        return self._cache

    def forward(self, x_ng: torch.Tensor, var_names_g: np.ndarray) -> dict[str, torch.Tensor | np.ndarray]:
        columns = self._lookup(var_names_g)
        if columns.unchanged:  # the data layer already selected these genes where it read the rows
            return {"x_ng": x_ng, "var_names_g": self.filter_list}
        x_nk = select_columns(x_ng, columns.index_m.to(x_ng.device))
        if columns.position_m is not None:
            x_nk = spread_columns(x_nk, columns.position_m, len(self.filter_list))
        return {"x_ng": x_nk, "var_names_g": self.filter_list}


def _same_names(cached_g: np.ndarray, var_names_g: np.ndarray) -> bool:
    return cached_g is var_names_g or (len(cached_g) == len(var_names_g) and np.array_equal(cached_g, var_names_g))
