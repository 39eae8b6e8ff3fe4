"""cellarium-steps export: every model's per-cell outputs joined into one Hive-partitioned Parquet dataset."""

from __future__ import annotations

import argparse

from cellarium_steps.pipelines.export import export
from cellarium_steps.steps.common import add_common_arguments, call_pipeline, provenance

NAME = "export"
HELP = "join the per-cell outputs (pca, predict) with the shards' obs into one partitioned Parquet dataset, streamed"
EPILOG = """one pass over the cells:
  the shards' obs names and --batch-key column are read in chunks of --batch-size cells, in shard order,
  and zipped with each --cells dataset read in its part files' order (pca --embeddings and predict keep
  the shards' order); each chunk's cell_id must equal the obs names, or the step stops naming the input.
  Rows are buffered per partition and written as a row group every --row-group-size rows, so memory is
  about (partitions x row group) rows, at most --max-buffered-rows, whatever the number of cells.

outputs:
  OUTPUT/dataset=<--dataset>/batch=<batch>/part-00000.parquet   (zstd, Hive partitioning)
      cell_id        the cell's obs name
      shard          the shard's file name without extension
      <columns>      every column of every --cells input but cell_id: pca, scvi_latent (fixed-size lists
                     of float32), cell_type_ontology_term_id, cell_type, cell_type_probability, ...
      dataset, batch the partition columns, in the directory names (null batch: __HIVE_DEFAULT_PARTITION__)
  every file's schema metadata (key cellarium_steps) holds this run's config and versions and each
  input's own provenance
  --genes-output (Parquet)  gene, mean, var, std (mean-var) and hvg's columns, joined by gene

read it with pyarrow.dataset.dataset(OUTPUT, partitioning="hive"), pandas.read_parquet(OUTPUT) or DuckDB:
  select batch, count(*) from read_parquet('OUTPUT/**/*.parquet', hive_partitioning=true) group by batch

example:
  cellarium-steps export --input 'shards/*.h5ad' --batch-key batch \\
      --cells out/pca_cells.parquet out/scvi_cells.parquet out/socam_cells.parquet \\
      --mean-var out/mean_var.csv --hvg out/hvg.csv --genes-output out/genes.parquet --output out/cells.parquet"""


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


REQUIRED = ("input", "output", "cells")


def run(args: argparse.Namespace) -> None:
    call_pipeline(export, args, provenance=provenance(NAME, args))
