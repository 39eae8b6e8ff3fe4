"""Highly variable genes by the Seurat v3 method (scanpy's ``flavor="seurat_v3"``), streamed in two passes."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from cellarium_steps.atomic import write_csv_atomically
from cellarium_steps.models._tensors import (
    check_measured,
    grouped_column_moments,
    is_sparse,
    nonzero_entries,
    unmeasured_cells,
)
from cellarium_steps.models.base import CellariumModel, check_var_names

if TYPE_CHECKING:
    import lightning.pytorch as pl

Flavor = Literal["seurat_v3", "seurat_v3_paper"]
FLAVORS: tuple[str, ...] = ("seurat_v3", "seurat_v3_paper")

#: The spans tried, wider and wider, after a LOESS fit failed at the requested span.
FALLBACK_SPANS: tuple[float, ...] = (0.5, 0.75, 1.0)
#: Standard deviations of log10(mean) by which x is jittered when the LOESS fit fails on tied x.
JITTER_SCALE = 1e-6

_PHASE_MOMENTS = "moments"
_PHASE_CLIP = "clip"
_PHASE_DONE = "done"


class HVGWarning(UserWarning):
    """A batch left out of the ranking, or fitted with a LOESS fallback."""


class NoBatchLeftError(ValueError):
    """No batch is left to rank genes in (every batch too small, constant, or failed its LOESS fit)."""


class BatchStatisticsMismatchError(ValueError):
    """Statistics given by ``set_batch_statistics`` do not describe the cells of the pass."""


def hvg_output_paths(output_path: str | Path, n_top_genes_list: Sequence[int]) -> list[Path]:
    """Where the table for each n_top_genes goes: the first at ``output_path``, the others at ``<stem>_<n><suffix>``."""
    path = Path(output_path)
    return [path] + [path.with_name(f"{path.stem}_{n}{path.suffix}") for n in n_top_genes_list[1:]]


class HVGSeuratV3(CellariumModel):
    """Highly variable genes by the Seurat v3 method, as ``scanpy.pp.highly_variable_genes(flavor="seurat_v3")``.

    Seurat v3 ranks genes by the variance of their counts after standardizing each gene by the
    standard deviation a LOESS fit of log10(variance) on log10(mean) expects for its mean, with
    counts clipped at ``mean + sqrt(n_cells) * expected_std``. Clipping needs the LOESS fit and
    the fit needs every cell's counts, hence two passes over the data (two Lightning epochs):

    * **Moments pass** (epoch 0): float64 per-batch sums, squared sums and cell counts.
      At its end the sums are all-reduced across DDP ranks, each batch's mean and variance
      (ddof=1, computed with scanpy's formula) are formed, and a LOESS ``loess(x, y, span,
      degree=2)`` of ``y = log10(var)`` on ``x = log10(mean)`` is fitted per batch on its
      non-constant genes, giving ``reg_std_bg = sqrt(10**fitted)`` (1 for constant genes) and
      ``clip_val_bg = reg_std_bg * sqrt(n_cells_b) + mean_bg``.
    * **Clipped pass** (epoch 1): per batch and gene, how many counts exceed the clip value and
      the sum and squared sum of those counts. A clipped count contributes exactly ``clip_val``,
      so the clipped sums are ``sum - clipped_sum + n_clipped * clip_val`` (squares likewise):
      exact integer sums plus one product, independent of how cells are split across ranks and
      minibatches (scanpy adds the clipped values one by one; the two differ in the last bits).
      Only counts above the clip value are gathered, and zeros are never clipped
      (``clip_val > 0``), so a sparse batch costs one comparison per stored entry. At its end
      ``variances_norm`` is formed per batch with scanpy's expression, genes are ranked per batch
      with scanpy's ``argsort(argsort(-norm))`` (so ties break alike) and the batches are combined.

    :meth:`set_batch_statistics` replaces the moments pass with per-batch statistics from an
    earlier :class:`~cellarium_steps.models.OnePassMeanVarStd` run: the LOESS is fitted at once
    and the model needs a single epoch (``max_epochs=1``). Forward and the epoch-end hook follow
    the model's phase (moments, clipped, done), not the trainer's epoch number.

    Combining batches (scanpy's rules, both flavors): within each batch the genes ranked below
    ``n_top_genes`` are that batch's highly variable genes; ``highly_variable_nbatches`` counts
    the batches in which a gene is one of them and ``highly_variable_rank`` is the median of its
    ranks over those batches (float32, NaN if none). ``variances_norm`` is the mean over the
    ranked batches. ``flavor="seurat_v3"`` sorts by median rank ascending then nbatches
    descending; ``"seurat_v3_paper"`` by nbatches descending then median rank ascending; NaN
    ranks last, remaining ties in gene order (pandas' sort, as scanpy). The first
    ``n_top_genes`` genes of that order are selected by position, so duplicate gene names cannot
    select extra rows (scanpy's label-based ``.loc`` could).

    ``n_batch_minimum``: only genes with ``highly_variable_nbatches >= n_batch_minimum`` can be
    selected; the selection walks the flavor's sort order, skipping the others, and stops after
    ``n_top_genes`` genes (fewer if not enough genes qualify, with a warning). With the default 1
    this never changes scanpy's result: each ranked batch puts ``n_top_genes`` genes at
    nbatches >= 1, and both sort orders put those genes before any gene with nbatches 0. For
    ``"seurat_v3_paper"`` (nbatches first) the filter only truncates the selection. For
    ``"seurat_v3"`` it drops genes with a low median rank found in too few batches, and the next
    genes by median rank take their places.

    Batches left out of the ranking, each with an :class:`HVGWarning` naming it: batches with
    fewer than ``batch_n_cell_minimum`` cells (a variance with ddof=1 needs two; scanpy would
    divide by zero for one), batches in which every gene is constant, and batches whose LOESS fit
    fails even after the fallback below. ``means`` and ``variances`` stay those of all cells,
    left-out batches included, as scanpy's. If no batch is left, :class:`NoBatchLeftError`.

    LOESS fallback (scanpy raises instead, e.g. "reciprocal condition number" on small or shallow
    batches, where many genes share the same few possible means and the local design matrices
    become singular): on a ``ValueError`` the fit of that batch is retried, in order, (1) at the
    same span with ``x`` jittered by ``1e-6 * std(x)`` times standard normal noise from a
    generator seeded with the batch index (deterministic, and far below any real difference in
    mean), then (2) with the same jitter at spans 0.5, 0.75 and 1.0 (those wider than ``span``).
    The first fit that succeeds is used and a warning names the batch and the fallback. Fitted
    values are those at the jittered ``x``.

    Shards that did not measure every gene (the data layer's ``gene_join="outer"``) pass
    ``shard_index_n`` and ``gene_measured_sg`` (their unmeasured values read as zeros): each gene's
    moments, clip values and normalized variance then count only the cells that measured it
    (``n_cells_bg``), and a gene measured by fewer than two cells of a batch is not ranked in it
    (``variances_norm`` averages the batches that rank it). Without them, every cell counts.

    Args:
        var_names_g: Gene names, length n_genes; every batch must carry the same.
        n_top_genes: Number of highly variable genes, or a list of numbers: ``hvg_dfs`` then
            holds one table per number (ranks and nbatches depend on it), ``hvg_df`` the first.
        n_batch: Number of batches (1 when no batch key is used).
        flavor: ``"seurat_v3"`` (median rank first) or ``"seurat_v3_paper"`` (nbatches first).
        use_batch_key: Rank within the ``batch_index_n`` batches; False treats all cells as one
            batch even if ``batch_index_n`` is given. The table has ``highly_variable_nbatches``
            only when True, as scanpy's only with a ``batch_key``.
        span: LOESS span (fraction of genes in each local fit).
        output_path: CSV written by rank 0 at the end of training (``gene`` column first); for a
            list of n_top_genes the others go to ``<stem>_<n>.csv``. None writes nothing.
        batch_n_cell_minimum: Batches with fewer cells are left out of the ranking (at least 2).
        n_batch_minimum: A gene must be among the top ``n_top_genes`` of at least this many
            ranked batches to be selected (see above).
        batch_names: Optional batch names used in warnings and errors (default: the indices).
    """

    def __init__(
        self,
        var_names_g: np.ndarray,
        n_top_genes: int | list[int],
        n_batch: int = 1,
        flavor: Flavor = "seurat_v3",
        use_batch_key: bool = False,
        span: float = 0.3,
        output_path: str | None = "hvg_seurat_v3_output.csv",
        batch_n_cell_minimum: int = 2,
        n_batch_minimum: int = 1,
        batch_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.var_names_g = np.asarray(var_names_g)
        self.n_vars = len(self.var_names_g)
        self.n_top_genes_list = self._check_n_top_genes(n_top_genes, self.n_vars)
        self.n_top_genes = n_top_genes
        if flavor not in FLAVORS:
            raise ValueError(f"flavor must be one of {FLAVORS}, got {flavor!r}")
        if n_batch < 1:
            raise ValueError(f"n_batch must be at least 1, got {n_batch}")
        if not span > 0:
            raise ValueError(f"span must be positive, got {span}")
        if batch_n_cell_minimum < 2:
            raise ValueError(
                f"batch_n_cell_minimum must be at least 2 (a variance with ddof=1 needs two cells), "
                f"got {batch_n_cell_minimum}"
            )
        self.use_batch_key = bool(use_batch_key)
        # Without the batch key every cell is in batch 0, whatever n_batch says.
        self.n_batch = n_batch if self.use_batch_key else 1
        if not 1 <= n_batch_minimum <= self.n_batch:
            raise ValueError(f"n_batch_minimum must be between 1 and the number of batches ({self.n_batch}), "
                             f"got {n_batch_minimum}")
        self.flavor = flavor
        self.span = float(span)
        self.output_path = output_path
        self.batch_n_cell_minimum = int(batch_n_cell_minimum)
        self.n_batch_minimum = int(n_batch_minimum)
        if batch_names is not None and self.use_batch_key and len(batch_names) != self.n_batch:
            raise ValueError(f"batch_names has {len(batch_names)} names for {self.n_batch} batches")
        self.batch_names = (
            [str(b) for b in batch_names] if batch_names is not None and self.use_batch_key
            else [str(b) for b in range(self.n_batch)]
        )

        b, g = self.n_batch, self.n_vars
        f64 = torch.float64
        # Moments pass.
        self.x_sums_bg: torch.Tensor
        self.x_squared_sums_bg: torch.Tensor
        self.x_size_b: torch.Tensor
        self.register_buffer("x_sums_bg", torch.zeros(b, g, dtype=f64))
        self.register_buffer("x_squared_sums_bg", torch.zeros(b, g, dtype=f64))
        self.register_buffer("x_size_b", torch.zeros(b, dtype=f64))
        # Cells of each batch whose shard did not measure each gene, counted in each pass (zero without a mask).
        self.x_unmeasured_size_bg: torch.Tensor
        self.clip_unmeasured_size_bg: torch.Tensor
        self.register_buffer("x_unmeasured_size_bg", torch.zeros(b, g, dtype=f64))
        self.register_buffer("clip_unmeasured_size_bg", torch.zeros(b, g, dtype=f64))
        # Between the passes: ddof=1 statistics and the LOESS results.
        self.mean_bg: torch.Tensor
        self.var_bg: torch.Tensor
        self.reg_std_bg: torch.Tensor
        self.clip_val_bg: torch.Tensor
        self.ranked_b: torch.Tensor
        self.register_buffer("mean_bg", torch.zeros(b, g, dtype=f64))
        self.register_buffer("var_bg", torch.zeros(b, g, dtype=f64))
        self.register_buffer("reg_std_bg", torch.ones(b, g, dtype=f64))
        self.register_buffer("clip_val_bg", torch.zeros(b, g, dtype=f64))
        self.register_buffer("ranked_b", torch.zeros(b, dtype=f64))  # 1.0: batch takes part in the ranking
        # Clipped pass: how many counts exceed clip_val, their sums, and the cells seen.
        self.clipped_sums_bg: torch.Tensor
        self.clipped_squared_sums_bg: torch.Tensor
        self.n_clipped_bg: torch.Tensor
        self.clip_size_b: torch.Tensor
        self.register_buffer("clipped_sums_bg", torch.zeros(b, g, dtype=f64))
        self.register_buffer("clipped_squared_sums_bg", torch.zeros(b, g, dtype=f64))
        self.register_buffer("n_clipped_bg", torch.zeros(b, g, dtype=f64))
        self.register_buffer("clip_size_b", torch.zeros(b, dtype=f64))
        self._clip_threshold_bg32: np.ndarray | None = None

        self.phase = _PHASE_MOMENTS
        self._statistics_given = False
        self._is_rank_zero = True
        self.loess_fallbacks: dict[str, str] = {}
        self.excluded_batches: dict[str, str] = {}
        self.hvg_dfs: list[pd.DataFrame] = []

    @staticmethod
    def _check_n_top_genes(n_top_genes: int | Sequence[int], n_vars: int) -> list[int]:
        values = [n_top_genes] if isinstance(n_top_genes, (int, np.integer)) else list(n_top_genes)
        if not values:
            raise ValueError("n_top_genes: give at least one number")
        for n in values:
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
                raise ValueError(f"n_top_genes must be positive integers, got {n!r}")
            if n > n_vars:
                raise ValueError(f"n_top_genes={n} is larger than the number of genes ({n_vars})")
        return [int(n) for n in values]

    # ------------------------------------------------------------------ state

    def reset_parameters(self) -> None:
        for buffer in (self.x_sums_bg, self.x_squared_sums_bg, self.x_size_b, self.x_unmeasured_size_bg, self.mean_bg,
                       self.var_bg, self.clip_val_bg, self.ranked_b):
            buffer.zero_()
        self.reg_std_bg.fill_(1.0)
        self._reset_clip_pass()
        self.phase = _PHASE_MOMENTS
        self._statistics_given = False
        self.loess_fallbacks = {}
        self.excluded_batches = {}
        self.hvg_dfs = []

    def _reset_clip_pass(self) -> None:
        for buffer in self._clip_pass_buffers():
            buffer.zero_()

    def _clip_pass_buffers(self) -> tuple[torch.Tensor, ...]:
        return (self.clipped_sums_bg, self.clipped_squared_sums_bg, self.n_clipped_bg, self.clip_size_b,
                self.clip_unmeasured_size_bg)

    @property
    def n_cells_bg(self) -> torch.Tensor:
        """Cells of each batch that measured each gene (float64)."""
        return self.x_size_b[:, None] - self.x_unmeasured_size_bg

    @property
    def n_cells_g(self) -> torch.Tensor:
        """Cells that measured each gene, whatever their batch (float64)."""
        return self.x_size_b.sum() - self.x_unmeasured_size_bg.sum(0)

    @property
    def hvg_df(self) -> pd.DataFrame | None:
        """The table for the first n_top_genes (None before the clipped pass has ended)."""
        return self.hvg_dfs[0] if self.hvg_dfs else None

    @property
    def n_epochs_needed(self) -> int:
        """Lightning epochs still to run: 2, or 1 after :meth:`set_batch_statistics`."""
        return 1 if self._statistics_given else 2

    def set_batch_statistics(
        self,
        n_cells_b: np.ndarray | torch.Tensor,
        mean_bg: np.ndarray | torch.Tensor,
        var_bg: np.ndarray | torch.Tensor,
        n_cells_bg: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Use per-batch statistics from an earlier pass and fit the LOESS now, so one epoch suffices.

        ``var_bg`` is the population variance (ddof=0) that ``OnePassMeanVarStd`` reports; it is
        rescaled to ddof=1 here as scanpy uses. Rows are batches in this model's batch order.
        ``n_cells_bg``: the cells of each batch that measured each gene, when shards measured
        different genes (``OnePassMeanVarStd.n_cells_bg``); the clipped pass checks it.
        """
        n_cells_b = torch.as_tensor(np.asarray(n_cells_b, dtype=np.float64)).reshape(-1)
        mean_bg = torch.as_tensor(np.asarray(mean_bg, dtype=np.float64))
        var_bg = torch.as_tensor(np.asarray(var_bg, dtype=np.float64))
        expected = (self.n_batch, self.n_vars)
        if n_cells_b.shape != (self.n_batch,) or mean_bg.shape != expected or var_bg.shape != expected:
            raise ValueError(
                f"set_batch_statistics: expected n_cells_b of shape ({self.n_batch},) and mean_bg, var_bg of shape "
                f"{expected}; got {tuple(n_cells_b.shape)}, {tuple(mean_bg.shape)}, {tuple(var_bg.shape)}"
            )
        if (n_cells_b < 0).any() or (n_cells_b != n_cells_b.round()).any():
            raise ValueError("set_batch_statistics: n_cells_b must be non-negative cell counts")
        device = self.x_sums_bg.device
        n_b1 = n_cells_b[:, None]
        unmeasured_bg = torch.zeros(expected, dtype=torch.float64)
        if n_cells_bg is not None:
            n_cells_bg = torch.as_tensor(np.asarray(n_cells_bg, dtype=np.float64))
            if n_cells_bg.shape != expected or (n_cells_bg > n_b1).any() or (n_cells_bg < 0).any():
                raise ValueError(
                    f"set_batch_statistics: n_cells_bg must have shape {expected} and lie in [0, n_cells_b]"
                )
            unmeasured_bg = n_b1 - n_cells_bg
            n_b1 = n_cells_bg
        # No cell of a batch measured the gene: no mean or variance there (NaN in OnePassMeanVarStd's
        # table); zero sums, as the moments pass would have left them.
        none_bg = (n_b1 == 0).expand(expected)
        mean_bg = torch.where(none_bg, torch.zeros_like(mean_bg), mean_bg)
        var_bg = torch.where(none_bg, torch.zeros_like(var_bg), var_bg)
        self.x_size_b.copy_(n_cells_b.to(device))
        self.x_unmeasured_size_bg.copy_(unmeasured_bg.to(device))
        var_ddof1_bg = torch.where(n_b1 > 1, var_bg * (n_b1 / (n_b1 - 1).clamp(min=1)), torch.zeros_like(var_bg))
        self.mean_bg.copy_(mean_bg.to(device))
        self.var_bg.copy_(var_ddof1_bg.to(device))
        # The sums the moments pass would have added up: float64 means and variances of counts
        # give them back to within rounding, so the clipped pass need not recompute them.
        self.x_sums_bg.copy_((mean_bg * n_b1).to(device))
        self.x_squared_sums_bg.copy_(((var_bg + mean_bg**2) * n_b1).to(device))
        self._fit_loess()
        self._statistics_given = True
        self._reset_clip_pass()
        self.phase = _PHASE_CLIP
        self.hvg_dfs = []

    # ------------------------------------------------------------------ forward

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
        if not self.use_batch_key or self.n_batch == 1:
            batch_index_n = torch.zeros(n_cells, dtype=torch.long, device=x_ng.device)
        elif batch_index_n is None:
            raise ValueError(f"batch_index_n is required when use_batch_key=True and n_batch={self.n_batch}")
        else:
            batch_index_n = batch_index_n.to(device=x_ng.device, dtype=torch.long)
            if n_cells and (batch_index_n.min() < 0 or batch_index_n.max() >= self.n_batch):
                raise ValueError(f"batch_index_n outside [0, {self.n_batch}): {int(batch_index_n.max())}")
        if n_cells == 0:
            return {}
        if self.phase in (_PHASE_MOMENTS, _PHASE_CLIP) and gene_measured_sg is not None:
            unmeasured_bg = unmeasured_cells(batch_index_n, self.n_batch, shard_index_n, gene_measured_sg)
            counter = self.x_unmeasured_size_bg if self.phase == _PHASE_MOMENTS else self.clip_unmeasured_size_bg
            counter += unmeasured_bg.to(counter.device)
        if self.phase == _PHASE_MOMENTS:
            self._accumulate_moments(x_ng, batch_index_n)
        elif self.phase == _PHASE_CLIP:
            self._accumulate_clipped(x_ng, batch_index_n)
        else:
            raise RuntimeError(
                f"HVGSeuratV3 has finished both passes; run it with max_epochs={self.n_epochs_needed} "
                "(2, or 1 after set_batch_statistics)"
            )
        return {}

    def _accumulate_moments(self, x_ng: torch.Tensor, batch_index_n: torch.Tensor) -> None:
        sums_bg, squared_sums_bg = grouped_column_moments(x_ng, batch_index_n, self.n_batch)
        self.x_sums_bg += sums_bg
        self.x_squared_sums_bg += squared_sums_bg
        self.x_size_b += torch.bincount(batch_index_n, minlength=self.n_batch).to(torch.float64)

    def _accumulate_clipped(self, x_ng: torch.Tensor, batch_index_n: torch.Tensor) -> None:
        """Count the counts above their batch's clip value and add them up; all other counts need nothing.

        Vectorized per minibatch: one comparison per stored entry, then scatter-adds over the few
        clipped entries only; no loop over genes.
        """
        batch_c, col_c, value_c = self._clipped_entries(x_ng, batch_index_n)
        if value_c.numel():
            flat_c = batch_c * self.n_vars + col_c
            self.clipped_sums_bg.view(-1).index_add_(0, flat_c, value_c)
            self.clipped_squared_sums_bg.view(-1).index_add_(0, flat_c, value_c * value_c)
            self.n_clipped_bg.view(-1).index_add_(0, flat_c, torch.ones_like(value_c))
        self.clip_size_b += torch.bincount(batch_index_n, minlength=self.n_batch).to(torch.float64)

    def _clipped_entries(
        self, x_ng: torch.Tensor, batch_index_n: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(batch_c, col_c, value_c as float64) of the entries above their batch's clip value."""
        device = self.clip_val_bg.device
        if x_ng.layout == torch.sparse_csr and x_ng.device.type == "cpu":
            return self._clipped_entries_csr_cpu(x_ng, batch_index_n)
        if is_sparse(x_ng):
            row_e, col_e, value_e = nonzero_entries(x_ng)
            row_e, col_e = row_e.long(), col_e.long()
            value_e = value_e.to(torch.float64)
            batch_e = batch_index_n[row_e]
            clipped_e = value_e > self.clip_val_bg[batch_e, col_e]
            return batch_e[clipped_e].to(device), col_e[clipped_e].to(device), value_e[clipped_e].to(device)
        x64_ng = x_ng.to(torch.float64)
        row_c, col_c = torch.nonzero(x64_ng > self.clip_val_bg[batch_index_n], as_tuple=True)
        return batch_index_n[row_c].to(device), col_c.to(device), x64_ng[row_c, col_c].to(device)

    def _clipped_entries_csr_cpu(
        self, x_ng: torch.Tensor, batch_index_n: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """numpy on zero-copy views: several times faster than torch's CPU gather for this.

        float32 counts are compared with the largest float32 not above each clip value, which
        decides ``value > clip_val`` exactly and halves the gathered bytes.
        """
        crow = x_ng.crow_indices().numpy()
        col_e = x_ng.col_indices().numpy()
        value_e = x_ng.values().numpy()
        if value_e.dtype == np.float32:
            threshold_bg = self._clip_threshold_float32()
        else:
            value_e = value_e.astype(np.float64, copy=False)
            threshold_bg = self.clip_val_bg.cpu().numpy()
        batch_n = batch_index_n.numpy()
        # A count at or below its gene's smallest threshold over all batches is never clipped, and
        # clip values sit many standard deviations above the mean: one lookup in a per-gene table
        # leaves a few candidates, which are then checked against their own batch's threshold.
        candidate_e = np.flatnonzero(value_e > threshold_bg.min(axis=0)[col_e])
        row_c = np.searchsorted(crow, candidate_e, side="right") - 1
        batch_c = batch_n[row_c]
        clipped = value_e[candidate_e] > threshold_bg[batch_c, col_e[candidate_e]]
        position_c = candidate_e[clipped]
        return (
            torch.from_numpy(batch_c[clipped].astype(np.int64)),
            torch.from_numpy(col_e[position_c].astype(np.int64)),
            torch.from_numpy(value_e[position_c].astype(np.float64)),
        )

    def _clip_threshold_float32(self) -> np.ndarray:
        """For each clip value, the largest float32 not above it: ``v > t32 <=> v > clip`` for float32 v."""
        if self._clip_threshold_bg32 is None:
            clip_val_bg = self.clip_val_bg.cpu().numpy()
            threshold_bg = clip_val_bg.astype(np.float32)
            above = threshold_bg.astype(np.float64) > clip_val_bg
            threshold_bg[above] = np.nextafter(threshold_bg[above], np.float32(-np.inf))
            self._clip_threshold_bg32 = threshold_bg
        return self._clip_threshold_bg32

    # ------------------------------------------------------------------ hooks

    def on_train_start(self, trainer: pl.Trainer) -> None:
        """Start the passes afresh (keeping statistics given by :meth:`set_batch_statistics`).

        Under DDP the buffers must not be broadcast from rank 0 (each rank accumulates its own
        share until the epoch-end all-reduce), so a DistributedDataParallel wrapper with
        ``broadcast_buffers=True`` is refused.
        """
        self._is_rank_zero = trainer.global_rank == 0
        if trainer.world_size > 1:
            ddp_kwargs = getattr(trainer.strategy, "_ddp_kwargs", {}) or {}
            wraps = type(trainer.strategy).__name__ != "ParameterFreeDDPStrategy"
            if wraps and ddp_kwargs.get("broadcast_buffers", True):
                raise ValueError("HVGSeuratV3 under DDP needs broadcast_buffers=False (or the parameter-free strategy)")
        if self._statistics_given:
            self._reset_clip_pass()
            self.phase = _PHASE_CLIP
            self.hvg_dfs = []
        else:
            self.reset_parameters()

    def on_train_epoch_start(self, trainer: pl.Trainer) -> None:
        """Derive the float32 clip thresholds afresh from the buffers (they may have been loaded or moved)."""
        self._clip_threshold_bg32 = None

    def on_train_epoch_end(self, trainer: pl.Trainer) -> None:
        """End of a pass: all-reduce across ranks, then fit the LOESS or rank the genes."""
        distributed = trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
        if self.phase == _PHASE_MOMENTS:
            if distributed:
                for buffer in (self.x_sums_bg, self.x_squared_sums_bg, self.x_size_b, self.x_unmeasured_size_bg):
                    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            self._compute_batch_statistics()
            self._fit_loess()
            if distributed:
                # Every rank fits the same LOESS (so all raise alike); rank 0's copy makes them bit-identical.
                for buffer in (self.reg_std_bg, self.clip_val_bg, self.ranked_b):
                    dist.broadcast(buffer, src=0)
                self._clip_threshold_bg32 = None
            self.phase = _PHASE_CLIP
        elif self.phase == _PHASE_CLIP:
            if distributed:
                for buffer in self._clip_pass_buffers():
                    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            self._check_clip_pass_cells()
            self.hvg_dfs = self.compute_hvg_dfs()
            self.phase = _PHASE_DONE

    def on_train_end(self, trainer: pl.Trainer) -> None:
        """Write the CSV(s) on rank 0, so a run's result exists without the checkpoint."""
        if self.phase != _PHASE_DONE:
            raise RuntimeError(
                f"HVGSeuratV3 stopped before its clipped pass ended; run it with max_epochs={self.n_epochs_needed}"
            )
        if self.output_path is not None and trainer.global_rank == 0:
            self.write_csvs(self.output_path)

    # ------------------------------------------------------------------ between the passes

    def _warn(self, message: str) -> None:
        if self._is_rank_zero:
            warnings.warn(message, HVGWarning, stacklevel=3)

    def _compute_batch_statistics(self) -> None:
        """Per-batch mean and ddof=1 variance with scanpy's operations, so they match it to the bit."""
        n_bg = self.n_cells_bg
        safe_n_bg = n_bg.clamp(min=1)
        mean_bg = self.x_sums_bg / safe_n_bg
        var_bg = self.x_squared_sums_bg / safe_n_bg - mean_bg**2
        self.mean_bg.copy_(mean_bg)
        self.var_bg.copy_(torch.where(n_bg > 1, var_bg * (n_bg / (n_bg - 1).clamp(min=1)), torch.zeros_like(var_bg)))

    def _fit_loess(self) -> None:
        """LOESS per batch (with the documented fallback); decide which batches take part in the ranking."""
        try:
            from skmisc.loess import loess
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise ImportError("HVGSeuratV3 needs scikit-misc: pip install scikit-misc") from e

        n_cells_b = self.x_size_b.cpu().numpy()
        n_cells_bg = self.n_cells_bg.cpu().numpy()
        mean_bg = self.mean_bg.cpu().numpy()
        var_bg = self.var_bg.cpu().numpy()
        reg_std_bg = np.ones((self.n_batch, self.n_vars))
        clip_val_bg = np.zeros((self.n_batch, self.n_vars))
        ranked_b = np.zeros(self.n_batch)
        self.loess_fallbacks, self.excluded_batches = {}, {}
        for b in range(self.n_batch):
            n_cells = int(n_cells_b[b])
            if n_cells < self.batch_n_cell_minimum:
                self._exclude(b, f"it has {n_cells} cell{'s' if n_cells != 1 else ''}, fewer than "
                                 f"batch_n_cell_minimum={self.batch_n_cell_minimum}")
                continue
            not_const_g = var_bg[b] > 0
            if not not_const_g.any():
                self._exclude(b, "every gene is constant in it")
                continue
            x = np.log10(mean_bg[b][not_const_g])
            y = np.log10(var_bg[b][not_const_g])
            fitted = self._loess_with_fallback(loess, b, x, y)
            if fitted is None:
                continue
            estimated_var_g = np.zeros(self.n_vars, dtype=np.float64)
            estimated_var_g[not_const_g] = fitted
            reg_std_g = np.sqrt(10**estimated_var_g)
            reg_std_bg[b] = reg_std_g
            # clip large values as in Seurat
            clip_val_bg[b] = reg_std_g * np.sqrt(n_cells_bg[b]) + mean_bg[b]
            ranked_b[b] = 1.0
        device = self.reg_std_bg.device
        self.reg_std_bg.copy_(torch.from_numpy(reg_std_bg).to(device))
        self.clip_val_bg.copy_(torch.from_numpy(clip_val_bg).to(device))
        self.ranked_b.copy_(torch.from_numpy(ranked_b).to(device))
        self._clip_threshold_bg32 = None
        if not ranked_b.any():
            raise NoBatchLeftError(
                "HVGSeuratV3: no batch left to rank genes in: "
                + "; ".join(f"batch {k!r}: {v}" for k, v in self.excluded_batches.items())
            )

    def _exclude(self, b: int, reason: str) -> None:
        name = self.batch_names[b]
        self.excluded_batches[name] = reason
        self._warn(f"HVGSeuratV3: batch {name!r} is left out of the ranking: {reason}")

    def _loess_with_fallback(self, loess: type, b: int, x: np.ndarray, y: np.ndarray) -> np.ndarray | None:
        """Fitted values of the LOESS of y on x; retries with jitter, then wider spans (see the class docstring)."""
        name = self.batch_names[b]
        rng = np.random.default_rng(b)
        scale = JITTER_SCALE * (float(np.std(x)) or max(float(np.abs(x).max()), 1.0))
        x_jittered = x + scale * rng.standard_normal(len(x))
        attempts = [(self.span, x, "none")]
        attempts.append((self.span, x_jittered, f"x jittered by {JITTER_SCALE:g} * std(x) (seed {b})"))
        attempts += [
            (s, x_jittered, f"x jittered by {JITTER_SCALE:g} * std(x) (seed {b}) and span widened to {s}")
            for s in FALLBACK_SPANS if s > self.span
        ]
        errors = []
        for span, x_fit, what in attempts:
            try:
                model = loess(x_fit, y, span=span, degree=2)
                model.fit()
            except ValueError as e:
                errors.append(f"span {span}{', jittered' if x_fit is not x else ''}: {_loess_message(e)}")
                continue
            if errors:
                self.loess_fallbacks[name] = what
                self._warn(
                    f"HVGSeuratV3: the LOESS fit of batch {name!r} failed ({errors[0]}); fitted with {what} instead"
                )
            return np.asarray(model.outputs.fitted_values, dtype=np.float64)
        self._exclude(b, "its LOESS fit failed at every fallback (" + "; ".join(errors) + ")")
        return None

    # ------------------------------------------------------------------ after the clipped pass

    def _check_clip_pass_cells(self) -> None:
        if torch.equal(self.clip_size_b, self.x_size_b) and torch.equal(
            self.clip_unmeasured_size_bg, self.x_unmeasured_size_bg
        ):
            return
        if torch.equal(self.clip_size_b, self.x_size_b):
            source = "the statistics given to set_batch_statistics" if self._statistics_given else "the moments pass"
            raise BatchStatisticsMismatchError(
                f"HVGSeuratV3: the cells that measured each gene differ between {source} and the clipped pass; "
                "both must see the same shards (pass n_cells_bg to set_batch_statistics for shards with "
                "different genes)"
            )
        given = self.x_size_b.cpu().numpy().astype(np.int64)
        seen = self.clip_size_b.cpu().numpy().astype(np.int64)
        diffs = [f"{self.batch_names[b]!r}: {given[b]} vs {seen[b]}" for b in np.flatnonzero(given != seen)[:5]]
        source = "the statistics given to set_batch_statistics" if self._statistics_given else "the moments pass"
        raise BatchStatisticsMismatchError(
            f"HVGSeuratV3: cells per batch differ between {source} and the clipped pass ({', '.join(diffs)}); "
            "both must see the same cells with the same batch key"
        )

    def norm_gene_vars_bg(self) -> np.ndarray:
        """scanpy's ``norm_gene_var`` per batch (rows of batches left out of the ranking are NaN, and
        genes measured by fewer than two of a batch's cells)."""
        n_b1 = self.n_cells_bg.cpu().numpy()
        reg_std_bg = self.reg_std_bg.cpu().numpy()
        clip_val_bg = self.clip_val_bg.cpu().numpy()
        n_clipped_bg = self.n_clipped_bg.cpu().numpy()
        sums_bg = self.x_sums_bg.cpu().numpy()
        squared_sums_bg = self.x_squared_sums_bg.cpu().numpy()
        batch_counts_sum_bg = sums_bg - self.clipped_sums_bg.cpu().numpy() + n_clipped_bg * clip_val_bg
        squared_batch_counts_sum_bg = (
            squared_sums_bg - self.clipped_squared_sums_bg.cpu().numpy() + n_clipped_bg * np.square(clip_val_bg)
        )
        ranked_b = self.ranked_b.cpu().numpy() > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            # The mean from the summed counts (scanpy's), whether summed here or given by set_batch_statistics.
            mean_bg = sums_bg / np.maximum(n_b1, 1)
            norm_bg = (1 / ((n_b1 - 1) * np.square(reg_std_bg))) * (
                (n_b1 * np.square(mean_bg)) + squared_batch_counts_sum_bg - 2 * batch_counts_sum_bg * mean_bg
            )
        norm_bg[~ranked_b] = np.nan
        norm_bg[n_b1 < 2] = np.nan
        return norm_bg

    def _all_cell_means_variances(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and ddof=1 variance over all cells (that measured each gene), by scanpy's formula on the
        summed moments."""
        n_g = self.n_cells_g.cpu().numpy()
        sums_g = self.x_sums_bg.sum(0).cpu().numpy()
        squared_sums_g = self.x_squared_sums_bg.sum(0).cpu().numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            means_g = sums_g / n_g
            variances_g = squared_sums_g / n_g - means_g**2
            variances_g = np.where(n_g != 1, variances_g * (n_g / (n_g - 1)), variances_g)
        return means_g, variances_g

    def compute_hvg_dfs(self) -> list[pd.DataFrame]:
        """One scanpy-compatible table per n_top_genes, indexed by gene."""
        norm_bg = self.norm_gene_vars_bg()
        ranked_b = self.ranked_b.cpu().numpy() > 0
        norm_gene_vars = norm_bg[ranked_b]
        means_g, variances_g = self._all_cell_means_variances()
        # A gene not ranked in some batch (too few cells measured it there) averages the others.
        if np.isnan(norm_gene_vars).any():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a gene no batch ranks stays NaN
                variances_norm_g = np.nanmean(norm_gene_vars, axis=0)
        else:
            variances_norm_g = np.mean(norm_gene_vars, axis=0)
        # argsort twice gives ranks, small rank means most variable (scanpy's calls, so ties break alike)
        ranks_vg = np.argsort(np.argsort(-norm_gene_vars, axis=1), axis=1).astype(np.float32)
        return [
            self._hvg_df_for(n, ranks_vg.copy(), means_g, variances_g, variances_norm_g) for n in self.n_top_genes_list
        ]

    def _compute_hvg_df(self) -> pd.DataFrame:
        """cellarium-ml's name: (re)compute every table from the buffers and return the first."""
        self.hvg_dfs = self.compute_hvg_dfs()
        return self.hvg_dfs[0]

    def _hvg_df_for(
        self,
        n_top_genes: int,
        ranks_vg: np.ndarray,
        means_g: np.ndarray,
        variances_g: np.ndarray,
        variances_norm_g: np.ndarray,
    ) -> pd.DataFrame:
        nbatches_g = np.sum((ranks_vg < n_top_genes).astype(int), axis=0)
        ranks_vg[ranks_vg >= n_top_genes] = np.nan
        median_rank_g = np.ma.median(np.ma.masked_invalid(ranks_vg), axis=0).filled(np.nan)
        if self.flavor == "seurat_v3":
            sort_cols, ascending = ["highly_variable_rank", "highly_variable_nbatches"], [True, False]
        else:
            sort_cols, ascending = ["highly_variable_nbatches", "highly_variable_rank"], [False, True]
        keys = pd.DataFrame({"highly_variable_rank": median_rank_g, "highly_variable_nbatches": nbatches_g})
        order = keys.sort_values(sort_cols, ascending=ascending, na_position="last").index.to_numpy()
        order = order[nbatches_g[order] >= self.n_batch_minimum]
        if len(order) < n_top_genes:
            self._warn(
                f"HVGSeuratV3: only {len(order)} genes are among the top {n_top_genes} of at least "
                f"n_batch_minimum={self.n_batch_minimum} batches; {len(order)} genes are selected"
            )
        highly_variable_g = np.zeros(self.n_vars, dtype=bool)
        highly_variable_g[order[:n_top_genes]] = True
        columns: dict[str, np.ndarray] = {
            "means": means_g,
            "variances": variances_g,
            "variances_norm": variances_norm_g.astype(np.float64, copy=False),
            "highly_variable_rank": median_rank_g,
        }
        if self.use_batch_key:
            columns["highly_variable_nbatches"] = nbatches_g
        columns["highly_variable"] = highly_variable_g
        return pd.DataFrame(columns, index=pd.Index(self.var_names_g, name="gene"))

    def write_csvs(self, output_path: str | Path) -> list[Path]:
        """Write each table as CSV with a ``gene`` column first (see :func:`hvg_output_paths`)."""
        paths = hvg_output_paths(output_path, self.n_top_genes_list)
        for df, path in zip(self.hvg_dfs, paths):
            write_csv_atomically(df.reset_index(), path)
        return paths


def _loess_message(error: ValueError) -> str:
    """skmisc puts the Fortran message in bytes; show it as text."""
    arg = error.args[0] if error.args else error
    return (arg.decode(errors="replace") if isinstance(arg, bytes) else str(arg)).strip()
