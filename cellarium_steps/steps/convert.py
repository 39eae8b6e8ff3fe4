"""cellarium-steps convert: any input the steps read (and CSC, compressed, chunked or zarr ones) rewritten
as uncompressed CSR .h5ad shards that every step streams at full speed."""

from __future__ import annotations

import argparse

from cellarium_steps.pipelines.convert import convert
from cellarium_steps.steps.common import add_common_arguments, call_pipeline, provenance

NAME = "convert"
HELP = ("rewrite shards (CSR, CSC, dense; compressed or not; .h5ad or .zarr) as uncompressed CSR .h5ad shards of "
        "integer counts, with the chosen counts, genes, cells and obs columns, optionally shuffled")
EPILOG = """what is written:
  OUTPUT/shard_00000.h5ad ...  --cells-per-shard cells each (the last one fewer): X uncompressed CSR (int32
                               counts from --counts, int32 indices, int64 row pointers; read straight from the
                               file's bytes by every step), var indexed by the genes --gene-join and --var-names
                               give (the first input's var columns kept; with --var-names COLUMN its old index
                               as var_index), obs: the cells --obs-filter keeps with --obs-columns (categoricals
                               with the same categories in every shard), uns['cellarium_steps']: provenance
  OUTPUT/convert.json          the run: shards and their cells, inputs, options, provenance
  Genes an input lacks (--gene-join outer) are zeros in the output: the measured mask does not survive.
  The directory is built under a temporary name beside OUTPUT and renamed when every shard is complete:
  a killed convert leaves nothing at OUTPUT (an earlier convert's output there stays until the new one replaces it).

how, and what it costs:
  each input is read once, in windows of --batch-size cells; a shard is written once it has all its cells.
  --shuffle: cell i goes to the position a seeded permutation (--seed) gives it, so every shard mixes every
  input; cells wait in one temporary file per output shard (about the output's size on disk, each entry
  written and read once more) and the shards are written at the end.
  CSC input: one pass over its columns first buckets the entries by row window in temporary files
  (8 bytes + the value's size per entry), then its rows are read window by window.

memory: one read window (--batch-size cells), at most --cells-per-shard + --batch-size cells waiting, and one
  output shard being assembled (twice its rows when shuffled); with --shuffle also the permutation, 4 bytes a
  cell (12 while drawn); for a CSC input about two read windows' worth of entries during its column pass.
  Never the whole input.

example:
  cellarium-steps convert --input 'cellxgene/*.h5ad' --counts raw --var-names feature_name \\
      --obs-filter 'is_primary_data == True' --obs-columns dataset_id,assay,donor_id,cell_type_ontology_term_id \\
      --shuffle --output converted/
  cellarium-steps mean-var --input 'converted/shard_*.h5ad' --output mean_var.csv"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    group = parser.add_argument_group("convert options")
    group.add_argument("--cells-per-shard", type=int, default=20_000, metavar="N",
                       help="cells per output shard (default: 20000); memory grows with it")
    group.add_argument("--obs-columns", nargs="*", metavar="COLUMN",
                       help="obs columns to keep (a,b,c or a b c; default: every column all inputs have); "
                       "--batch-key's columns are always kept")
    group.add_argument("--shuffle", action="store_true",
                       help="place the cells by a seeded permutation (--seed) across the shards, so that a later "
                       "epoch's contiguous reads mix datasets (default: input order)")


def run(args: argparse.Namespace) -> None:
    call_pipeline(convert, args, provenance=provenance(NAME, args))
