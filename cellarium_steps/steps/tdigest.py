"""cellarium-steps tdigest: per-gene distribution of non-zero counts (median and quartiles)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cellarium_steps.atomic import write_csv_atomically
from cellarium_steps.data import open_shards
from cellarium_steps.export import write_json_atomically, write_table_parquet
from cellarium_steps.models import TDigest
from cellarium_steps.runner import fit_statistics
from cellarium_steps.steps.common import add_common_arguments, provenance_json

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
    collection = open_shards(args.input)
    model = TDigest(collection.var_names_g)
    trainer = fit_statistics(
        model, collection, batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed,
        devices=args.devices, accelerator=args.accelerator,
    )
    if trainer.global_rank == 0:
        table = model.summary_df()
        meta = provenance_json(NAME, args)
        write_csv_atomically(table, args.output)
        write_table_parquet(table, Path(args.output).with_suffix(".parquet"), meta)
        write_json_atomically(meta, args.output + ".provenance.json")
