"""cellarium-steps simulate: write realistic demo shards of raw counts."""

from __future__ import annotations

import argparse
import logging

from cellarium_steps.data.simulate import simulate_shards
from cellarium_steps.steps.common import call_pipeline

logger = logging.getLogger("cellarium_steps")

NAME = "simulate"
HELP = "write demo .h5ad shards: negative-binomial counts from cell-type programs, several batches"
REQUIRED = ("output",)
EPILOG = """outputs:
  OUTPUT/shard_000.h5ad ...  raw integer counts (CSR), obs: batch, cell_type_ontology_term_id, cell_type

example:
  cellarium-steps simulate --output shards/ --n-cells 20000 --n-shards 4"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", metavar="DIR", help="directory to write the shards into (required)")
    parser.add_argument("--n-cells", type=int, default=20_000, help="cells in all (default: 20000)")
    parser.add_argument("--n-genes", type=int, default=2_000, help="genes (default: 2000)")
    parser.add_argument("--n-batches", type=int, default=4, help="batches with their own depth and capture (default: 4)")
    parser.add_argument("--n-cell-types", type=int, default=6, help="cell-type programs (default: 6)")
    parser.add_argument("--n-shards", type=int, default=4, help="files to spread the cells over (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--config", metavar="YAML", help="a YAML file with these options' long names as keys")
    parser.add_argument("--quiet", action="store_true", help="log warnings and errors only")


def run(args: argparse.Namespace) -> None:
    paths = call_pipeline(simulate_shards, args, output_dir=args.output)
    logger.info("wrote %d shards to %s", len(paths), args.output)
