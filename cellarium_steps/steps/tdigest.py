"""cellarium-steps tdigest: per-gene distribution of non-zero counts (median and quartiles)."""

from __future__ import annotations

import argparse

from cellarium_steps.pipelines.statistics import tdigest
from cellarium_steps.steps.common import add_common_arguments, call_pipeline, provenance

NAME = "tdigest"
HELP = "per-gene median and quartiles of the non-zero counts (exact for small counts, t-digest above)"
EPILOG = """outputs:
  OUTPUT (CSV)              gene, n_nonzero, median, q25, q75 of each gene's non-zero counts
  OUTPUT with .parquet      the same table, with the run's config and versions in the file metadata
  OUTPUT + .provenance.json the same config and versions, for the CSV

example:
  cellarium-steps tdigest --input 'shards/*.h5ad' --output out/tdigest.csv"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> None:
    call_pipeline(tdigest, args, provenance=provenance(NAME, args))
