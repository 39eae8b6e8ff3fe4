"""Per-gene (and per-batch) mean and population variance in one pass over the data."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from cellarium_steps.atomic import write_csv_atomically
from cellarium_steps.models._tensors import check_measured, grouped_column_moments, is_sparse, unmeasured_cells
from cellarium_steps.models.base import CellariumModel, check_var_names

if TYPE_CHECKING:
    import lightning.pytorch as pl


class OnePassMeanVarStd(CellariumModel):
    """Calculate the mean, variance, and standard deviation of the data in one pass (epoch)
    using running sums and running squared sums, per batch.

    Sums are float64: integer counts below 2**53 add exactly, so 10 million cells with
    counts in the thousands neither overflow nor round. ``shifted_data`` subtracts a
    per-gene shift (the mean of the first minibatch a rank sees) before summing, which keeps
    the variance accurate for data whose mean is large relative to its spread.

    Shards that did not measure every gene (the data layer's ``gene_join="outer"``) pass
    ``shard_index_n`` and ``gene_measured_sg``: a gene's statistics then cover only the cells whose
    shard measured it (its zero-filled values are left out), and ``n_cells_bg`` / ``n_cells_g`` say
    how many cells that is. Without them every cell counts for every gene, as before.

    References:
        1. Algorithms for calculating variance (Wikipedia).

    Args:
        var_names_g: The variable names schema for the input data validation.
        algorithm: ``"naive"`` (default) or ``"shifted_data"`` (numerically stable).
        n_batch: Number of batches. Use 1 to reproduce ``batch_key=None`` behaviour.
        output_path: Where to save a summary CSV (gene, mean, var, std, and n_cells: the cells that
            measured the gene) at the end of training; None writes nothing.
    """

    def __init__(
        self,
        var_names_g: np.ndarray,
        algorithm: Literal["naive", "shifted_data"] = "naive",
        n_batch: int = 1,
        output_path: str | None = "onepass_mean_var_std_output.csv",
    ) -> None:
        super().__init__()
        if algorithm not in ("naive", "shifted_data"):
            raise ValueError(f"algorithm must be 'naive' or 'shifted_data', got {algorithm!r}")
        if n_batch < 1:
            raise ValueError(f"n_batch must be at least 1, got {n_batch}")
        self.var_names_g = np.asarray(var_names_g)
        self.n_vars = len(self.var_names_g)
        self.algorithm = algorithm
        self.n_batch = n_batch
        self.output_path = output_path
        self.x_sums_bg: torch.Tensor
        self.x_squared_sums_bg: torch.Tensor
        self.x_size_b: torch.Tensor
        self.x_shift_g: torch.Tensor
        self.x_unmeasured_size_bg: torch.Tensor
        self.register_buffer("x_sums_bg", torch.empty(n_batch, self.n_vars, dtype=torch.float64))
        self.register_buffer("x_squared_sums_bg", torch.empty(n_batch, self.n_vars, dtype=torch.float64))
        self.register_buffer("x_size_b", torch.empty(n_batch, dtype=torch.float64))
        self.register_buffer("x_shift_g", torch.empty(self.n_vars, dtype=torch.float64))
        # Cells of each batch whose shard did not measure each gene (zero without a measured mask).
        self.register_buffer("x_unmeasured_size_bg", torch.empty(n_batch, self.n_vars, dtype=torch.float64))
        self._shift_set = False
        self._reduced = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        buffers = (self.x_sums_bg, self.x_squared_sums_bg, self.x_size_b, self.x_shift_g, self.x_unmeasured_size_bg)
        for buffer in buffers:
            buffer.zero_()
        self._shift_set = False
        self._reduced = False

    def forward(
        self,
        x_ng: torch.Tensor,
        var_names_g: np.ndarray,
        batch_index_n: torch.Tensor | None = None,
        shard_index_n: torch.Tensor | None = None,
        gene_measured_sg: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        check_var_names(self.var_names_g, var_names_g)
        n_cells = x_ng.shape[0]
        check_measured(shard_index_n, gene_measured_sg, n_cells, self.n_vars)
        if self.n_batch == 1:
            batch_index_n = torch.zeros(n_cells, dtype=torch.long, device=x_ng.device)
        elif batch_index_n is None:
            raise ValueError(f"batch_index_n is required when n_batch={self.n_batch}")
        elif n_cells and (batch_index_n.min() < 0 or batch_index_n.max() >= self.n_batch):
            raise ValueError(f"batch_index_n outside [0, {self.n_batch}): {int(batch_index_n.max())}")
        if n_cells == 0:
            return {}

        size_b = torch.bincount(batch_index_n, minlength=self.n_batch).to(torch.float64)
        # Unmeasured values are stored as zeros: they add nothing to the sums, only the cell counts differ.
        unmeasured_bg = None
        size_bg = size_b[:, None]
        if gene_measured_sg is not None:
            unmeasured_bg = unmeasured_cells(batch_index_n, self.n_batch, shard_index_n, gene_measured_sg)
            size_bg = size_bg - unmeasured_bg
        if self.algorithm == "naive":
            sums_bg, squared_sums_bg = grouped_column_moments(x_ng, batch_index_n, self.n_batch)
        elif is_sparse(x_ng):
            # Shifting would fill the zeros; shift this minibatch's exact sums instead.
            sums_bg, squared_sums_bg = grouped_column_moments(x_ng, batch_index_n, self.n_batch)
            first_n = n_cells if unmeasured_bg is None else size_bg.sum(0).clamp(min=1)
            shift_g = self._shift_from(sums_bg.sum(0) / first_n)
            squared_sums_bg = squared_sums_bg - 2 * shift_g * sums_bg + size_bg * shift_g**2
            sums_bg = sums_bg - size_bg * shift_g
        else:
            x64_ng = x_ng.to(torch.float64)
            if gene_measured_sg is None:
                shift_g = self._shift_from(x64_ng.mean(0))
                shifted_ng = x64_ng - shift_g
            else:
                measured_ng = gene_measured_sg.bool()[shard_index_n.long()].to(torch.float64)
                shift_g = self._shift_from(x64_ng.sum(0) / measured_ng.sum(0).clamp(min=1))
                shifted_ng = (x64_ng - shift_g) * measured_ng
            sums_bg, squared_sums_bg = grouped_column_moments(shifted_ng, batch_index_n, self.n_batch)
        self.x_sums_bg += sums_bg
        self.x_squared_sums_bg += squared_sums_bg
        self.x_size_b += size_b
        if unmeasured_bg is not None:
            self.x_unmeasured_size_bg += unmeasured_bg
        return {}

    def _shift_from(self, first_mean_g: torch.Tensor) -> torch.Tensor:
        """The shift is the mean of the first minibatch this rank sees; later minibatches reuse it."""
        if not self._shift_set:
            self.x_shift_g.copy_(first_mean_g)
            self._shift_set = True
        return self.x_shift_g

    def on_train_start(self, trainer: pl.Trainer) -> None:
        self.reset_parameters()

    def on_train_epoch_end(self, trainer: pl.Trainer) -> None:
        """Sum the statistics of all ranks, so that every rank ends with the full result."""
        if self._reduced or trainer.world_size <= 1 or not dist.is_initialized():
            self._reduced = True
            return
        if self.algorithm == "shifted_data":
            self._move_shift_to(self._broadcast(self.x_shift_g))
        for buffer in (self.x_sums_bg, self.x_squared_sums_bg, self.x_size_b, self.x_unmeasured_size_bg):
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        self._reduced = True

    @staticmethod
    def _broadcast(tensor: torch.Tensor) -> torch.Tensor:
        shared = tensor.clone()
        dist.broadcast(shared, src=0)
        return shared

    def _move_shift_to(self, new_shift_g: torch.Tensor) -> None:
        """Re-express this rank's shifted sums about another shift, so ranks' sums can be added."""
        delta_g = self.x_shift_g - new_shift_g
        n_bg = self.n_cells_bg
        self.x_squared_sums_bg += 2 * delta_g * self.x_sums_bg + n_bg * delta_g**2
        self.x_sums_bg += n_bg * delta_g
        self.x_shift_g.copy_(new_shift_g)

    def on_train_end(self, trainer: pl.Trainer) -> None:
        """Save a summary output CSV so we need not load the checkpoint downstream."""
        if self.output_path is not None and trainer.global_rank == 0:
            write_csv_atomically(self.summary_df(), self.output_path)

    @property
    def n_cells_b(self) -> torch.Tensor:
        return self.x_size_b

    @property
    def n_cells_bg(self) -> torch.Tensor:
        """Cells of each batch that measured each gene (all of the batch's cells without a measured mask)."""
        return self.x_size_b[:, None] - self.x_unmeasured_size_bg

    @property
    def n_cells_g(self) -> torch.Tensor:
        """Cells that measured each gene, whatever their batch."""
        return self.x_size_b.sum() - self.x_unmeasured_size_bg.sum(0)

    @property
    def batch_mean_bg(self) -> torch.Tensor:
        """Per-batch mean, shape (n_batch, n_genes)."""
        return self.x_shift_g + self.x_sums_bg / self.n_cells_bg

    @property
    def batch_var_bg(self) -> torch.Tensor:
        """Per-batch population variance, shape (n_batch, n_genes)."""
        n_bg = self.n_cells_bg
        return (self.x_squared_sums_bg - self.x_sums_bg**2 / n_bg) / n_bg

    @property
    def batch_std_bg(self) -> torch.Tensor:
        return self.batch_var_bg.sqrt()

    @property
    def mean_g(self) -> torch.Tensor:
        """Mean over all cells (that measured the gene), whatever their batch."""
        return self.x_shift_g + self.x_sums_bg.sum(0) / self.n_cells_g

    @property
    def var_g(self) -> torch.Tensor:
        """Population variance over all cells (that measured the gene), whatever their batch."""
        n_g = self.n_cells_g
        sums_g = self.x_sums_bg.sum(0)
        return (self.x_squared_sums_bg.sum(0) - sums_g**2 / n_g) / n_g

    @property
    def std_g(self) -> torch.Tensor:
        return self.var_g.sqrt()

    def summary_df(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "gene": self.var_names_g,
                "mean": self.mean_g.cpu().numpy(),
                "var": self.var_g.cpu().numpy(),
                "std": self.std_g.cpu().numpy(),
                "n_cells": self.n_cells_g.cpu().numpy().astype(np.int64),
            }
        )

    def batch_summary_df(self, batch_categories: np.ndarray | None = None) -> pd.DataFrame:
        """Long table: one row per (batch, gene) with the cells (of the batch, that measured the gene), mean
        and variance."""
        n_batch, n_genes = self.n_batch, self.n_vars
        names = np.asarray(batch_categories) if batch_categories is not None and len(batch_categories) else None
        labels = names if names is not None else np.arange(n_batch).astype(str)
        return pd.DataFrame(
            {
                "batch": np.repeat(labels, n_genes),
                "batch_index": np.repeat(np.arange(n_batch), n_genes),
                "n_cells": self.n_cells_bg.cpu().numpy().astype(np.int64).ravel(),
                "gene": np.tile(self.var_names_g, n_batch),
                "mean": self.batch_mean_bg.cpu().numpy().ravel(),
                "var": self.batch_var_bg.cpu().numpy().ravel(),
            }
        )


