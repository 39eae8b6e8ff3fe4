"""Every model's per-cell outputs joined with the shards' obs into one partitioned Parquet dataset and/or
back into one AnnData file per shard, and the per-gene tables joined by gene."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from cellarium_steps.data.errors import InputError
from cellarium_steps.data.obs_columns import split_columns
from cellarium_steps.data.options import DataOptions
from cellarium_steps.outputs.cells import ExportSummary, export_cells, export_genes
from cellarium_steps.outputs.layout import LayoutOptions

logger = logging.getLogger("cellarium_steps")


def default_dataset_name(output: str) -> str:
    parent = os.path.basename(os.path.dirname(os.path.abspath(output)))
    return parent or "default"


def export(
    *, inputs: Sequence[str], cells: Sequence[str], output: str | None = None, batch_key: str | None = None,
    dataset: str | None = None, row_group_size: int = 100_000, max_buffered_rows: int = 1_000_000,
    batch_size: int = 65_536, mean_var: str | None = None, hvg: str | None = None,
    genes_output: str | None = None, anndata: str | None = None, obs_columns: Sequence[str] | str | None = None,
    layout_2d: bool = False, layout_method: str = "auto", layout_column: str = "scvi_latent",
    layout_sample_size: int = 20_000, seed: int = 0, data_options: DataOptions | None = None,
    provenance: dict[str, Any] | None = None,
) -> ExportSummary:
    """One streaming pass over the cells (chunks of ``batch_size``) writing the Parquet dataset ``output``
    and/or one .h5ad per shard under ``anndata``, then the per-gene table if asked. ``data_options`` must
    be those the per-cell steps ran with (the same ``obs_filter`` gives the same cells)."""
    for name, value in (("row_group_size", row_group_size), ("max_buffered_rows", max_buffered_rows),
                        ("layout_sample_size", layout_sample_size)):
        if value < 1:
            raise InputError(f"--{name.replace('_', '-')}: must be at least 1, got {value}")
    if genes_output and not (mean_var or hvg):
        raise InputError("--genes-output needs --mean-var, --hvg or both")
    layout = LayoutOptions(layout_method, layout_column, layout_sample_size, seed) if layout_2d else None
    summary = export_cells(
        inputs, cells, output, dataset=dataset or default_dataset_name(output or anndata or "."), batch_key=batch_key,
        row_group_size=row_group_size, max_buffered_rows=max_buffered_rows, chunk_size=batch_size,
        provenance=provenance or {}, obs_columns=split_columns(obs_columns), anndata=anndata, layout=layout,
        data_options=data_options,
    )
    if output:
        logger.info(
            "wrote %s: %d cells in %d partitions, %d row groups; columns %s",
            output, summary.n_cells, len(summary.partitions), summary.row_groups, ", ".join(summary.columns),
        )
    if anndata:
        logger.info("wrote %d .h5ad files to %s (%d cells)", len(summary.anndata), anndata, summary.n_cells)
    if genes_output:
        genes = export_genes(mean_var, hvg, genes_output, provenance or {})
        logger.info("wrote %s: %d genes", genes_output, len(genes))
    return summary
