"""cellarium-steps export: every model's per-cell outputs joined into one Hive-partitioned Parquet dataset,
and/or written back into one AnnData file per shard."""

from __future__ import annotations

import argparse

from cellarium_steps.pipelines.export import export
from cellarium_steps.steps.common import add_common_arguments, call_pipeline, provenance

NAME = "export"
HELP = ("join the per-cell outputs (pca, predict) with the shards' obs into one partitioned Parquet dataset "
        "and/or one .h5ad per shard, streamed")
EPILOG = """one pass over the cells:
  the shards' obs names and --batch-key column(s) are read in chunks of --batch-size cells, in shard order
  (only the cells --obs-filter keeps: give the options the per-cell steps ran with), and zipped with each
  --cells dataset read in its part files' order (pca --embeddings and predict keep the shards' order);
  each chunk's cell_id must equal the obs names, or the step stops naming the input.
  Rows are buffered per partition and written as a row group every --row-group-size rows, so memory is
  about (partitions x row group) rows, at most --max-buffered-rows, whatever the number of cells.
  --anndata writes in the same pass. --layout-2d first reads the --layout-column alone from its Parquet
  input (one cheap pass over that column, not the shards) to draw a uniform sample (--layout-sample-size
  cells, seeded by --seed), fits the layout on it, then places every cell during the export pass.

outputs:
  OUTPUT/dataset=<--dataset>/batch=<batch>/part-00000.parquet   (zstd, Hive partitioning)
      cell_id        the cell's obs name
      shard          the shard's file name without extension
      <obs columns>  --obs-columns, with their types: categoricals dictionary-encoded strings, numbers,
                     booleans, text; a name the export already writes gets the prefix obs_
      <columns>      every column of every --cells input but cell_id: pca, scvi_latent (fixed-size lists
                     of float32), cell_type_ontology_term_id, cell_type, cell_type_probability, ...
      umap_2d|pc_2d  --layout-2d: 2 float32 per cell, UMAP (umap-learn installed) or the latent's first 2 PCs
      dataset, batch the partition columns, in the directory names (null batch: __HIVE_DEFAULT_PARTITION__)
  every file's schema metadata (key cellarium_steps) holds this run's config and versions and each
  input's own provenance
  --genes-output (Parquet)  gene, mean, var, std (mean-var) and hvg's columns, joined by gene
  --anndata DIR  DIR/<shard file name>.h5ad per shard: the shard's obs (every column, same types) and var,
                 no X (X=None, the shard's shape), obsm X_pca, X_scVI (and X_umap or X_pc_2d), and SOCAM's
                 cell_type_ontology_term_id, cell_type, cell_type_probability as obs columns (predicted_<name>
                 when a shard's obs already has the name); every cell in the shard's order (NaN rows for
                 cells --obs-filter left out); renamed into place only when the whole export succeeded

read it with pyarrow.dataset.dataset(OUTPUT, partitioning="hive"), pandas.read_parquet(OUTPUT) or DuckDB:
  select batch, count(*) from read_parquet('OUTPUT/**/*.parquet', hive_partitioning=true) group by batch

example:
  cellarium-steps export --input 'shards/*.h5ad' --batch-key batch \\
      --cells out/pca_cells.parquet out/scvi_cells.parquet out/socam_cells.parquet \\
      --mean-var out/mean_var.csv --hvg out/hvg.csv --genes-output out/genes.parquet --output out/cells.parquet \\
      --anndata out/anndata --obs-columns donor,tissue,assay --layout-2d"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, batch_size=65_536)
    group = parser.add_argument_group("export options")
    group.add_argument("--cells", nargs="+", metavar="PARQUET",
                       help="per-cell Parquet datasets (directories of part files) with a cell_id column (required)")
    group.add_argument("--dataset", metavar="NAME",
                       help="the dataset partition's value (default: the name of OUTPUT's parent directory)")
    group.add_argument("--row-group-size", type=int, default=100_000, metavar="N",
                       help="rows per Parquet row group, per partition (default: 100000, DuckDB's sweet spot)")
    group.add_argument("--max-buffered-rows", type=int, default=1_000_000, metavar="N",
                       help="most rows held over all partitions before the largest is written early (default: 1000000)")
    group.add_argument("--mean-var", metavar="CSV", help="mean-var's per-gene table, for --genes-output")
    group.add_argument("--hvg", metavar="CSV", help="hvg's per-gene table, for --genes-output")
    group.add_argument("--genes-output", metavar="PARQUET", help="also write the per-gene table here")
    group.add_argument("--anndata", metavar="DIR", help="also (or, without --output, only) write one .h5ad per shard here")
    group.add_argument("--obs-columns", nargs="*", metavar="COLUMN",
                       help="obs columns of the shards to add to the Parquet export (a,b,c or a b c)")
    group.add_argument("--layout-2d", action="store_true",
                       help="add a 2-D layout column of every cell: umap_2d, or pc_2d without umap-learn")
    group.add_argument("--layout-method", choices=("auto", "umap", "pca"), default="auto",
                       help="auto: umap if umap-learn is installed, else pca (default: auto)")
    group.add_argument("--layout-column", default="scvi_latent", metavar="COLUMN",
                       help="the latent the layout is fitted on (default: scvi_latent)")
    group.add_argument("--layout-sample-size", type=int, default=20_000, metavar="N",
                       help="cells sampled uniformly to fit the layout (default: 20000)")


# --output or --anndata: the pipeline checks that one is given
REQUIRED = ("input", "cells")


def run(args: argparse.Namespace) -> None:
    call_pipeline(export, args, provenance=provenance(NAME, args))
