"""Every model's per-cell outputs joined with the shards' obs into one partitioned Parquet dataset,
and the per-gene tables joined by gene."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from cellarium_steps.data.errors import InputError
from cellarium_steps.outputs.cells import ExportSummary, export_cells, export_genes

logger = logging.getLogger("cellarium_steps")


def default_dataset_name(output: str) -> str:
    parent = os.path.basename(os.path.dirname(os.path.abspath(output)))
    return parent or "default"


def export(
    *, inputs: Sequence[str], cells: Sequence[str], output: str, batch_key: str | None = None,
    dataset: str | None = None, row_group_size: int = 100_000, max_buffered_rows: int = 1_000_000,
    batch_size: int = 65_536, mean_var: str | None = None, hvg: str | None = None,
    genes_output: str | None = None, provenance: dict[str, Any] | None = None,
) -> ExportSummary:
    """One streaming pass over the cells (chunks of ``batch_size``), then the per-gene table if asked."""
    for name, value in (("row_group_size", row_group_size), ("max_buffered_rows", max_buffered_rows)):
        if value < 1:
            raise InputError(f"--{name.replace('_', '-')}: must be at least 1, got {value}")
    if genes_output and not (mean_var or hvg):
        raise InputError("--genes-output needs --mean-var, --hvg or both")
    summary = export_cells(
        inputs, cells, output, dataset=dataset or default_dataset_name(output), batch_key=batch_key,
        row_group_size=row_group_size, max_buffered_rows=max_buffered_rows, chunk_size=batch_size,
        provenance=provenance or {},
    )
    logger.info(
        "wrote %s: %d cells in %d partitions, %d row groups; columns %s",
        output, summary.n_cells, len(summary.partitions), summary.row_groups, ", ".join(summary.columns),
    )
    if genes_output:
        genes = export_genes(mean_var, hvg, genes_output, provenance or {})
        logger.info("wrote %s: %d genes", genes_output, len(genes))
    return summary
