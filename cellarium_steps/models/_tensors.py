"""Helpers shared by models that accept sparse CSR or dense count batches."""

from __future__ import annotations

import torch

from cellarium_steps._batch import densify, is_sparse

__all__ = [
    "check_measured", "densify", "global_count", "grouped_column_moments", "is_sparse", "nonzero_entries",
    "unmeasured_cells",
]


def nonzero_entries(x_ng: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_e, col_e, value_e) of the stored entries of a sparse or dense batch."""
    if x_ng.layout == torch.sparse_csr:
        crow = x_ng.crow_indices()
        row_e = torch.repeat_interleave(torch.arange(x_ng.shape[0], device=x_ng.device), crow.diff())
        return row_e, x_ng.col_indices(), x_ng.values()
    if x_ng.layout == torch.sparse_coo:
        x_ng = x_ng.coalesce()
        return x_ng.indices()[0], x_ng.indices()[1], x_ng.values()
    row_e, col_e = torch.nonzero(x_ng, as_tuple=True)
    return row_e, col_e, x_ng[row_e, col_e]


def grouped_column_moments(
    x_ng: torch.Tensor, group_n: torch.Tensor, n_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group column sums of x and of x**2, in float64: shapes (n_groups, g) each.

    On CPU a sparse CSR batch goes through scipy's CSR kernels on zero-copy numpy views
    (several times faster than torch's scatter kernels on CPU); dense and GPU batches stay in torch.
    """
    g = x_ng.shape[1]
    if not is_sparse(x_ng):
        x64 = x_ng.to(torch.float64)
        sums = torch.zeros(n_groups, g, dtype=torch.float64, device=x_ng.device)
        squares = torch.zeros_like(sums)
        sums.index_add_(0, group_n, x64)
        squares.index_add_(0, group_n, x64 * x64)
        return sums, squares
    if x_ng.layout == torch.sparse_csr and x_ng.device.type == "cpu":
        return _grouped_column_moments_scipy(x_ng, group_n, n_groups)
    row_e, col_e, value_e = nonzero_entries(x_ng)
    value_e = value_e.to(torch.float64)
    flat_e = group_n[row_e] * g + col_e
    sums = torch.bincount(flat_e, weights=value_e, minlength=n_groups * g).view(n_groups, g)
    squares = torch.bincount(flat_e, weights=value_e * value_e, minlength=n_groups * g).view(n_groups, g)
    return sums, squares


def _grouped_column_moments_scipy(
    x_ng: torch.Tensor, group_n: torch.Tensor, n_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np
    import scipy.sparse as sp

    n, g = x_ng.shape
    crow_n1 = x_ng.crow_indices().numpy()
    col_e = x_ng.col_indices().numpy()
    value_e = x_ng.values().numpy().astype(np.float64)
    group = group_n.numpy()
    if n > 1 and (np.diff(group) < 0).any():
        x = sp.csr_matrix((value_e, col_e, crow_n1), shape=(n, g))[np.argsort(group, kind="stable")]
        crow_n1, col_e, value_e, group = x.indptr, x.indices, x.data, np.sort(group, kind="stable")
    square_e = value_e * value_e
    sums = np.zeros((n_groups, g))
    squares = np.zeros((n_groups, g))
    bounds = np.searchsorted(group, np.arange(n_groups + 1))
    for k in np.flatnonzero(np.diff(bounds)):
        # Rows a..b as CSR views of the batch's arrays: no copy of the entries.
        a, b = bounds[k], bounds[k + 1]
        e0, e1 = crow_n1[a], crow_n1[b]
        indptr = crow_n1[a : b + 1] - e0
        ones = np.ones(b - a)
        sums[k] = ones @ sp.csr_matrix((value_e[e0:e1], col_e[e0:e1], indptr), shape=(b - a, g))
        squares[k] = ones @ sp.csr_matrix((square_e[e0:e1], col_e[e0:e1], indptr), shape=(b - a, g))
    return torch.from_numpy(sums), torch.from_numpy(squares)


def global_count(m: int, device: torch.device) -> tuple[int, int]:
    """(the sum of ``m`` over the ranks, the world size); ``(m, 1)`` outside a process group.

    A collective: under DDP every rank calls it once per training step (the forward does).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return m, 1
    total = torch.tensor([m], dtype=torch.long, device=device)
    dist.all_reduce(total)
    return int(total.item()), dist.get_world_size()


def check_measured(
    shard_index_n: torch.Tensor | None, gene_measured_sg: torch.Tensor | None, n_cells: int, n_genes: int
) -> None:
    """The measured-mask inputs (see ``ShardedCellDataset``) come together and fit the batch."""
    if gene_measured_sg is None and shard_index_n is None:
        return
    if gene_measured_sg is None or shard_index_n is None:
        raise ValueError("gene_measured_sg and shard_index_n go together: pass both or neither")
    if gene_measured_sg.ndim != 2 or gene_measured_sg.shape[1] != n_genes:
        raise ValueError(f"gene_measured_sg has shape {tuple(gene_measured_sg.shape)}, expected (shards, {n_genes})")
    if shard_index_n.shape != (n_cells,):
        raise ValueError(f"shard_index_n has shape {tuple(shard_index_n.shape)}, expected ({n_cells},)")
    if n_cells and (shard_index_n.min() < 0 or shard_index_n.max() >= gene_measured_sg.shape[0]):
        raise ValueError(f"shard_index_n outside [0, {gene_measured_sg.shape[0]})")


def unmeasured_cells(
    group_n: torch.Tensor, n_groups: int, shard_index_n: torch.Tensor, gene_measured_sg: torch.Tensor
) -> torch.Tensor:
    """Cells of each group whose shard did not measure each gene: float64, (n_groups, g).

    Cells of one group and shard share a row of the mask, so this is a (groups x shards) count
    times the (shards x genes) mask: no per-cell, per-gene work.
    """
    n_shards = gene_measured_sg.shape[0]
    flat_n = group_n.long() * n_shards + shard_index_n.long()
    cells_bs = torch.bincount(flat_n, minlength=n_groups * n_shards).view(n_groups, n_shards).to(torch.float64)
    return cells_bs @ (~gene_measured_sg.bool()).to(torch.float64)
