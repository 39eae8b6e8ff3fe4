"""cellarium-steps mean-var: per-gene, per-batch mean and variance of raw counts in one pass."""

from __future__ import annotations

import argparse
from pathlib import Path

from cellarium_steps.data import open_shards
from cellarium_steps.export import write_json_atomically, write_table_parquet
from cellarium_steps.models import OnePassMeanVarStd
from cellarium_steps.runner import fit_statistics
from cellarium_steps.steps.common import add_common_arguments, provenance_json

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


def batch_table_path(output: str) -> Path:
    return Path(output).with_suffix(".parquet")


def run(args: argparse.Namespace) -> None:
    collection = open_shards(args.input, batch_key=args.batch_key)
    model = OnePassMeanVarStd(
        collection.var_names_g, algorithm=args.algorithm, n_batch=collection.n_batch, output_path=args.output
    )
    trainer = fit_statistics(
        model, collection, batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed,
        devices=args.devices, accelerator=args.accelerator,
    )
    if trainer.global_rank == 0:
        meta = provenance_json(NAME, args)
        write_table_parquet(model.batch_summary_df(collection.batch_categories), batch_table_path(args.output), meta)
        write_json_atomically(meta, args.output + ".provenance.json")
