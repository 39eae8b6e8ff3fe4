"""Readers and writers of the statistics steps' tables: mean-var's per-batch table (which feeds hvg's
one-pass mode), hvg's tables, and tdigest's per-gene medians (Geneformer's normalisation factors)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellarium_steps.atomic import write_csv_atomically, write_json_atomically
from cellarium_steps.data import ShardCollection, ShardReader
from cellarium_steps.data.batches import parse_batch_key
from cellarium_steps.data.errors import InputError
from cellarium_steps.models.hvg_seurat_v3 import hvg_output_paths
from cellarium_steps.outputs.tables import read_provenance, write_table_parquet

logger = logging.getLogger("cellarium_steps")

MEAN_VAR_COLUMNS = ("batch", "batch_index", "n_cells", "gene", "mean", "var")


def batch_table_path(output: str) -> Path:
    """mean-var's per-batch table beside its CSV."""
    return Path(output).with_suffix(".parquet")


def write_mean_var_tables(batch_df: pd.DataFrame, output: str, provenance: str) -> None:
    """The per-batch Parquet and the provenance beside mean-var's CSV (the model writes the CSV itself)."""
    write_table_parquet(batch_df, batch_table_path(output), provenance)
    write_json_atomically(provenance, output + ".provenance.json")


def write_tdigest_tables(table: pd.DataFrame, output: str, provenance: str) -> None:
    write_csv_atomically(table, output)
    write_table_parquet(table, Path(output).with_suffix(".parquet"), provenance)
    write_json_atomically(provenance, output + ".provenance.json")


def write_hvg_tables(tables: Sequence[pd.DataFrame], n_top_genes: Sequence[int], output: str,
                     provenance: dict[str, Any]) -> None:
    """One Parquet (and provenance) per --n-top-genes beside the CSVs the model wrote."""
    text = json.dumps(provenance, default=str, sort_keys=True)
    for n, df, csv_path in zip(n_top_genes, tables, hvg_output_paths(output, n_top_genes)):
        meta_n = json.loads(text) | {"n_top_genes": n}
        write_table_parquet(df.reset_index(), csv_path.with_suffix(".parquet"), meta_n)
        write_json_atomically(meta_n, str(csv_path) + ".provenance.json")


def cells_per_batch(collection: ShardCollection, by_batch: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Cells per batch code (all in one batch without ``by_batch``), and per batch and gene the cells
    whose shard measured the gene (the same for every gene unless shards measured different genes),
    from the shards' obs column alone (no count matrix is read)."""
    n_batch = collection.n_batch if by_batch else 1
    n_cells_b = np.zeros(n_batch, dtype=np.int64)
    n_cells_bg = np.zeros((n_batch, collection.n_vars), dtype=np.int64)
    reader = ShardReader(collection, require_counts=False)
    try:
        for s, shard in enumerate(collection.shards):
            if by_batch:
                counts_b = np.bincount(reader.read_batch_index(shard, np.arange(shard.n_obs)), minlength=n_batch)
            else:
                counts_b = np.array([shard.n_obs], dtype=np.int64)
            n_cells_b += counts_b
            n_cells_bg += counts_b[:, None] * collection.gene_measured_g(s)[None, :]
    finally:
        reader.close()
    return n_cells_b, n_cells_bg


def read_mean_var_statistics(
    mean_var_csv: str, collection: ShardCollection, batch_key: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(n_cells_b, mean_bg, population var_bg, n_cells_bg) from the mean-var step's per-batch table, in the
    shards' batch order; ``n_cells_bg`` (the cells of each batch that measured each gene, the table's
    ``n_cells``) only when shards measured different genes (``gene_join="outer"``), else None.

    The statistics are only valid for the same cells grouped by the same batch key: the LOESS is
    fitted per batch, and the clipped pass clips each cell at its own batch's clip value. So the
    genes, the batch names and each batch's (and gene's) cell count are all checked against the shards.
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
    if their_key != "unknown" and parse_batch_key(their_key) != parse_batch_key(batch_key):
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
    n_cells_by_name: dict[str, np.ndarray] = {}
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
        n_cells_by_name[name] = rows["n_cells"].to_numpy(np.int64)

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
    n_cells_bg = np.stack([n_cells_by_name[n] for n in names])
    n_cells_b, expected_bg = cells_per_batch(collection, by_batch=bool(batch_key))
    if not np.array_equal(n_cells_bg, expected_bg):
        b, g = (int(i[0]) for i in np.nonzero(n_cells_bg != expected_bg))
        gene = f", gene {var_names_g[g]!r}" if collection.partial_genes else ""
        raise InputError(
            f"--mean-var {table_path}: batch {names[b]!r}{gene} has {n_cells_bg[b, g]} cells there but "
            f"{expected_bg[b, g]} in the shards; {why}"
        )
    mean_bg = np.stack([mean_by_name[n] for n in names])
    var_bg = np.stack([var_by_name[n] for n in names])
    return n_cells_b, mean_bg, var_bg, n_cells_bg if collection.partial_genes else None


def read_norm_factor(path: str, var_names_g: np.ndarray) -> np.ndarray:
    """Each gene's non-zero median from the tdigest table, in var_names_g order.

    A gene with no non-zero count in the table has no median: its factor is 1 (it cannot be
    ranked in the data the table summarises anyway).
    """
    if not os.path.isfile(path):
        raise InputError(f"--tdigest: {path}: no such file")
    try:
        table = pd.read_parquet(path) if path.lower().endswith(".parquet") else pd.read_csv(path)
    except (ValueError, OSError, pd.errors.ParserError) as e:
        raise InputError(f"--tdigest: {path}: not a readable table ({e})") from None
    for column in ("gene", "median"):
        if column not in table.columns:
            raise InputError(f"--tdigest: {path}: no {column!r} column (columns: {list(table.columns)})")
    genes = table["gene"].astype(str)
    if genes.duplicated().any():
        raise InputError(f"--tdigest: {path}: genes are listed more than once, e.g. {genes[genes.duplicated()].iloc[0]!r}")
    median = pd.to_numeric(table["median"], errors="coerce").set_axis(genes)
    missing = [g for g in var_names_g if g not in median.index]
    if missing:
        raise InputError(f"--tdigest: {path}: {len(missing)} of the model's genes are not in the table, e.g. {missing[:5]}")
    factor_g = median.reindex(var_names_g).to_numpy(dtype=np.float64)
    if (factor_g <= 0).any() or np.isinf(factor_g).any():
        bad = np.asarray(var_names_g)[(factor_g <= 0) | np.isinf(factor_g)]
        raise InputError(f"--tdigest: {path}: medians must be positive, e.g. gene {bad[0]!r}")
    n_undefined = int(np.isnan(factor_g).sum())
    if n_undefined:
        logger.info("--tdigest: %d genes have no non-zero count in the table; their factor is 1", n_undefined)
    return np.where(np.isnan(factor_g), 1.0, factor_g)
