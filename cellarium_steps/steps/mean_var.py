"""cellarium-steps mean-var: per-gene, per-batch mean and variance of raw counts in one pass."""

from __future__ import annotations

import argparse

from cellarium_steps.pipelines.statistics import mean_var
from cellarium_steps.steps.common import add_common_arguments, call_pipeline, provenance

NAME = "mean-var"
HELP = "per-gene (and per-batch) mean, variance and standard deviation of raw counts, in one pass"
EPILOG = """outputs:
  OUTPUT (CSV)              gene, mean, var, std over all cells (population variance)
  OUTPUT with .parquet      one row per (batch, gene): batch, batch_index, n_cells, gene, mean, var;
                            the run's config and versions in the file metadata
  OUTPUT + .provenance.json the same config and versions, for the CSV

example:
  cellarium-steps mean-var --input 'shards/*.h5ad' --batch-key batch --output out/mean_var.csv"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument(
        "--algorithm", choices=("naive", "shifted_data"), default="naive",
        help="naive running sums (exact for counts) or sums about a per-gene shift (default: naive)",
    )


def run(args: argparse.Namespace) -> None:
    call_pipeline(mean_var, args, provenance=provenance(NAME, args))
