"""cellarium-steps hvg: highly variable genes by Seurat v3 (scanpy's flavor="seurat_v3"), streamed."""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from cellarium_steps.data import ShardCollection, ShardReader, open_shards
from cellarium_steps.data.errors import InputError
from cellarium_steps.export import write_json_atomically, write_table_parquet
from cellarium_steps.export.tables import read_provenance
from cellarium_steps.models import HVGSeuratV3
from cellarium_steps.models.hvg_seurat_v3 import (
    FLAVORS,
    BatchStatisticsMismatchError,
    HVGWarning,
    NoBatchLeftError,
    hvg_output_paths,
)
from cellarium_steps.runner import fit_statistics
from cellarium_steps.steps.common import ConfigError, add_common_arguments, provenance

logger = logging.getLogger("cellarium_steps")

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

MEAN_VAR_COLUMNS = ("batch", "batch_index", "n_cells", "gene", "mean", "var")


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


def _check_options(args: argparse.Namespace, collection: ShardCollection) -> list[int]:
    n_top_genes = args.n_top_genes if isinstance(args.n_top_genes, list) else [args.n_top_genes]
    n_top_genes = [int(n) for n in n_top_genes]
    for n in n_top_genes:
        if n < 1:
            raise ConfigError(f"--n-top-genes: must be positive, got {n}")
        if n > collection.n_vars:
            raise InputError(
                f"--n-top-genes {n} is larger than the number of genes ({collection.n_vars}) in "
                f"{collection.shards[0].path}"
            )
    if not args.span > 0:
        raise ConfigError(f"--span: must be positive, got {args.span}")
    if args.batch_n_cell_minimum < 2:
        raise ConfigError(
            f"--batch-n-cell-minimum: must be at least 2 (a variance needs two cells), got {args.batch_n_cell_minimum}"
        )
    n_batch = collection.n_batch if args.batch_key else 1
    if not 1 <= args.n_batch_minimum <= n_batch:
        raise ConfigError(f"--n-batch-minimum: must be between 1 and the number of batches ({n_batch}), "
                          f"got {args.n_batch_minimum}")
    return n_top_genes


def cells_per_batch(collection: ShardCollection) -> np.ndarray:
    """Cells per batch code, from the shards' obs column alone (no count matrix is read)."""
    counts = np.zeros(collection.n_batch, dtype=np.int64)
    reader = ShardReader(collection)
    try:
        for shard in collection.shards:
            codes = reader.read_batch_index(shard, np.arange(shard.n_obs))
            counts += np.bincount(codes, minlength=collection.n_batch)
    finally:
        reader.close()
    return counts


def read_mean_var_statistics(
    mean_var_csv: str, collection: ShardCollection, batch_key: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n_cells_b, mean_bg, population var_bg) from the mean-var step's per-batch table, in the shards' batch order.

    The statistics are only valid for the same cells grouped by the same batch key: the LOESS is
    fitted per batch, and the clipped pass clips each cell at its own batch's clip value. So the
    genes, the batch names and each batch's cell count are all checked against the shards.
    """
    csv = Path(mean_var_csv)
    table_path = csv if csv.suffix == ".parquet" else csv.with_suffix(".parquet")
    why = (
        "the mean-var step must have run on the same shards with the same --batch-key as hvg, because its "
        "per-batch means and variances feed hvg's per-batch LOESS fits and clip values"
    )
    if not table_path.is_file():
        raise InputError(f"--mean-var {mean_var_csv}: its per-batch table {table_path} does not exist "
                         "(cellarium-steps mean-var writes it beside its CSV)")
    try:
        table = pd.read_parquet(table_path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is bad input
        raise InputError(f"--mean-var {table_path}: not a readable Parquet table ({e})") from None
    missing = [c for c in MEAN_VAR_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(f"--mean-var {table_path}: no column(s) {missing}; expected the mean-var step's "
                         f"per-batch table with columns {list(MEAN_VAR_COLUMNS)}")
    try:
        their_key = read_provenance(table_path).get("config", {}).get("batch_key")
    except (KeyError, ValueError, OSError):
        their_key = "unknown"
    if their_key != "unknown" and their_key != batch_key:
        raise InputError(
            f"--mean-var {table_path}: made with --batch-key {their_key!r}, but hvg runs with --batch-key "
            f"{batch_key!r}; {why}"
        )

    var_names_g = collection.var_names_g
    n_vars = len(var_names_g)
    table = table.sort_values(["batch_index"], kind="stable")
    batches = table.drop_duplicates("batch_index")[["batch_index", "batch"]]
    mean_by_name: dict[str, np.ndarray] = {}
    var_by_name: dict[str, np.ndarray] = {}
    n_cells_by_name: dict[str, int] = {}
    for batch_index, rows in table.groupby("batch_index", sort=True):
        name = str(rows["batch"].iloc[0])
        genes = rows["gene"].astype(str).to_numpy()
        if len(genes) != n_vars or not np.array_equal(genes, var_names_g):
            if len(genes) != n_vars:
                detail = f"{len(genes)} genes, the shards have {n_vars}"
            else:
                i = int(np.flatnonzero(genes != var_names_g)[0])
                detail = f"gene {i} is {genes[i]!r}, the shards' is {var_names_g[i]!r}"
            raise InputError(f"--mean-var {table_path}: genes of batch {name!r} differ from the shards' "
                             f"({detail}); {why}")
        mean_by_name[name] = rows["mean"].to_numpy(np.float64)
        var_by_name[name] = rows["var"].to_numpy(np.float64)
        n_cells_by_name[name] = int(rows["n_cells"].iloc[0])

    names = [str(b) for b in collection.batch_categories] if batch_key else [str(batches["batch"].iloc[0])]
    if batch_key:
        theirs, ours = set(mean_by_name), set(names)
        if theirs != ours:
            raise InputError(
                f"--mean-var {table_path}: batches {sorted(theirs - ours)[:5]} are not --batch-key {batch_key!r} "
                f"categories of the shards, and categories {sorted(ours - theirs)[:5]} are missing from it; {why}"
            )
    elif len(mean_by_name) != 1:
        raise InputError(f"--mean-var {table_path}: has {len(mean_by_name)} batches but hvg runs without "
                         f"--batch-key; {why}")
    n_cells_b = np.array([n_cells_by_name[n] for n in names], dtype=np.int64)
    expected_b = cells_per_batch(collection) if batch_key else np.array([collection.n_obs])
    if not np.array_equal(n_cells_b, expected_b):
        b = int(np.flatnonzero(n_cells_b != expected_b)[0])
        raise InputError(
            f"--mean-var {table_path}: batch {names[b]!r} has {n_cells_b[b]} cells there but {expected_b[b]} in "
            f"the shards; {why}"
        )
    mean_bg = np.stack([mean_by_name[n] for n in names])
    var_bg = np.stack([var_by_name[n] for n in names])
    return n_cells_b, mean_bg, var_bg


def run(args: argparse.Namespace) -> None:
    collection = open_shards(args.input, batch_key=args.batch_key)
    n_top_genes = _check_options(args, collection)
    use_batch_key = args.batch_key is not None
    model = HVGSeuratV3(
        collection.var_names_g,
        n_top_genes=n_top_genes,
        n_batch=collection.n_batch,
        flavor=args.flavor,
        use_batch_key=use_batch_key,
        span=args.span,
        output_path=args.output,
        batch_n_cell_minimum=args.batch_n_cell_minimum,
        n_batch_minimum=args.n_batch_minimum,
        batch_names=list(collection.batch_categories) if use_batch_key else None,
    )
    source = f"--mean-var {args.mean_var}: " if args.mean_var else ""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", HVGWarning)
            if args.mean_var:
                model.set_batch_statistics(*read_mean_var_statistics(args.mean_var, collection, args.batch_key))
            trainer = fit_statistics(
                model, collection, batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed,
                devices=args.devices, accelerator=args.accelerator, max_epochs=model.n_epochs_needed,
            )
    except (NoBatchLeftError, BatchStatisticsMismatchError) as e:
        raise InputError(f"{source}{e}") from None
    finally:
        # Outside the recording context: replaying inside it would record each warning again, forever.
        _replay_warnings(caught)
    if trainer.global_rank != 0:
        return
    meta = provenance(NAME, args)
    meta["batches"] = {
        "excluded": model.excluded_batches,
        "loess_fallbacks": model.loess_fallbacks,
        "mean_var_statistics": args.mean_var,
    }
    text = json.dumps(meta, default=str, sort_keys=True)
    for n, df, csv_path in zip(n_top_genes, model.hvg_dfs, hvg_output_paths(args.output, n_top_genes)):
        meta_n = json.loads(text) | {"n_top_genes": n}
        write_table_parquet(df.reset_index(), csv_path.with_suffix(".parquet"), meta_n)
        write_json_atomically(meta_n, str(csv_path) + ".provenance.json")


def _replay_warnings(caught: list[warnings.WarningMessage]) -> None:
    """The model's warnings as log lines (one line each); anything else as Python shows it."""
    for w in caught:
        if issubclass(w.category, HVGWarning):
            logger.warning("%s", w.message)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
