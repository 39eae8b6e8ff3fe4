"""Checks and views of a batch shared by transforms and models (a leaf: imports neither)."""

from __future__ import annotations

import numpy as np
import torch


def is_sparse(x_ng: torch.Tensor) -> bool:
    return x_ng.layout in (torch.sparse_csr, torch.sparse_coo)


def densify(x_ng: torch.Tensor) -> torch.Tensor:
    """A dense view of a batch; only models that need every entry call this."""
    return x_ng.to_dense() if is_sparse(x_ng) else x_ng


def check_var_names(expected_g: np.ndarray, actual_g: np.ndarray) -> None:
    """Raise a ValueError unless two gene lists are the same, in the same order."""
    if len(expected_g) != len(actual_g) or not np.array_equal(np.asarray(expected_g), np.asarray(actual_g)):
        mismatch = next(
            (i for i, (a, b) in enumerate(zip(expected_g, actual_g)) if a != b),
            min(len(expected_g), len(actual_g)),
        )
        raise ValueError(
            f"var_names_g of the input ({len(actual_g)} genes) differ from the model's "
            f"({len(expected_g)} genes), first at position {mismatch}"
        )
