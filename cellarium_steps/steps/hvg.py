"""cellarium-steps hvg: highly variable genes by Seurat v3 (scanpy's flavor="seurat_v3"), streamed."""

from __future__ import annotations

import argparse

from cellarium_steps.models.hvg_seurat_v3 import FLAVORS
from cellarium_steps.pipelines.statistics import hvg
from cellarium_steps.steps.common import add_common_arguments, call_pipeline, provenance

NAME = "hvg"
HELP = "highly variable genes by Seurat v3 (as scanpy's flavor='seurat_v3'), in two passes or one after mean-var"
EPILOG = """outputs:
  OUTPUT (CSV)              gene, means, variances, variances_norm, highly_variable_rank,
                            highly_variable_nbatches (only with --batch-key), highly_variable:
                            scanpy.pp.highly_variable_genes(flavor=..., n_top_genes=N, batch_key=...)'s table
  OUTPUT with .parquet      the same table, with the run's config, versions and batch notes in the file metadata
  OUTPUT + .provenance.json the same config, versions and batch notes, for the CSV
  several --n-top-genes     one table per number (ranks and nbatches depend on it): the first number's at
                            OUTPUT, each other number N's at <stem>_<N>.csv (and <stem>_<N>.parquet,
                            <stem>_<N>.csv.provenance.json) beside it

batches (--batch-key):
  genes are ranked within each batch and combined as scanpy does: --flavor seurat_v3 sorts by the median
  rank over the batches, then by the number of batches (nbatches); seurat_v3_paper by nbatches, then median
  rank. --n-batch-minimum K selects only genes in the top N of at least K batches (default 1: scanpy's result).
  Batches with fewer than --batch-n-cell-minimum cells, with every gene constant, or whose LOESS fit fails
  are left out of the ranking with a warning (recorded in the provenance). A failing LOESS fit (scanpy
  stops with 'reciprocal condition number' on small or shallow batches) is retried with x jittered by
  1e-6 * std(x), then at spans 0.5, 0.75 and 1.0; the batch and the fallback used are logged and recorded.

one pass instead of two (--mean-var):
  give the CSV written by 'cellarium-steps mean-var' on the same shards with the same --batch-key; its
  per-batch table <stem>.parquet (beside the CSV) supplies each batch's mean and variance, so only the
  clipped pass runs. Its genes must equal the shards' and its batches the --batch-key categories.

examples:
  cellarium-steps hvg --input 'shards/*.h5ad' --batch-key batch --n-top-genes 2000 --output out/hvg.csv
  cellarium-steps mean-var --input 'shards/*.h5ad' --batch-key batch --output out/mean_var.csv
  cellarium-steps hvg --input 'shards/*.h5ad' --batch-key batch --mean-var out/mean_var.csv \\
      --n-top-genes 2000 5000 --output out/hvg.csv      # also writes out/hvg_5000.csv"""

def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    group = parser.add_argument_group("hvg options")
    group.add_argument(
        "--n-top-genes", type=int, nargs="+", default=[2000], metavar="N",
        help="number of highly variable genes; several numbers give one table each (default: 2000)",
    )
    group.add_argument(
        "--flavor", choices=FLAVORS, default="seurat_v3",
        help="how batches are combined: by median rank first (seurat_v3, default) or by nbatches first",
    )
    group.add_argument(
        "--span", type=float, default=0.3, help="LOESS span, fraction of genes per local fit (default: 0.3)"
    )
    group.add_argument(
        "--batch-n-cell-minimum", type=int, default=2, metavar="N",
        help="batches with fewer cells are left out of the ranking (default: 2, the least a variance needs)",
    )
    group.add_argument(
        "--n-batch-minimum", type=int, default=1, metavar="K",
        help="select only genes in the top N of at least K batches (default: 1)",
    )
    group.add_argument(
        "--mean-var", metavar="CSV",
        help="output CSV of 'cellarium-steps mean-var' on the same shards and --batch-key; "
        "its <stem>.parquet per-batch table replaces the first pass",
    )


def run(args: argparse.Namespace) -> None:
    call_pipeline(hvg, args, provenance=provenance(NAME, args))
