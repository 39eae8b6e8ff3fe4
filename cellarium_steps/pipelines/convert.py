"""Rewrite any input the steps accept, and what they cannot stream (CSC, compressed or chunked arrays,
zarr stores), into uncompressed CSR ``.h5ad`` shards that every step reads at full speed.

The cells are those the data options keep (``--obs-filter``), with integer counts from wherever
``--counts`` says, in the genes ``--gene-join`` and ``--var-names`` give (the output's var index),
numbered 0..N-1 in input order. Output cell i goes to row ``p % C`` of shard ``p // C`` (C cells a
shard, the last one smaller), where p = i, or with ``shuffle`` p = a seeded permutation of 0..N-1:
every cell exactly once, the same shards for the same seed and inputs whatever ``batch_size``.

One pass reads each input once, in windows of ``batch_size`` cells (CSC inputs through
:class:`~cellarium_steps.data.csc.CSCRows`: one pass over their columns first, bucketing the
entries by row window on disk), and hands each window's cells to
:class:`~cellarium_steps.outputs.shards.ShardBuckets`, which writes a shard as soon as it has all its
cells. Without shuffle the shards complete in order and nothing waits on disk; with it, cells wait
in one temporary file per output shard (every entry written and read once more, about the output's
size on disk) and the shards are written at the end.

Memory: one read window, the cells waiting in memory (at most ``cells_per_shard + batch_size``) and
one output shard being assembled (twice its rows when shuffled); with ``shuffle`` the permutation,
4 bytes per cell (12 while it is drawn); for a CSC input, about two read windows' worth of entries
during its column pass.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellarium_steps.data.batches import parse_batch_key
from cellarium_steps.data.counts import counts_location
from cellarium_steps.data.csc import CSCRows
from cellarium_steps.data.errors import ConfigError, InputError
from cellarium_steps.data.obs_columns import common_obs_columns, obs_column_types, split_columns
from cellarium_steps.data.options import DataOptions
from cellarium_steps.data.reader import ShardReader
from cellarium_steps.data.shards import ShardCollection, expand_inputs, open_shards
from cellarium_steps.data.sources import Store
from cellarium_steps.outputs.shards import (
    UNS_PROVENANCE,
    ShardBuckets,
    check_output_directory,
    converted_directory,
    shard_file_name,
    write_csr_h5ad,
)

logger = logging.getLogger("cellarium_steps")

FORMAT = "cellarium_steps.convert/1"
_INT32_MAX = np.iinfo(np.int32).max
# Where the temporary files of a run go, inside the output's temporary directory.
_SPILL = ".spill"
#: the var column that keeps the first input's var index when --var-names names the genes by a column
VAR_INDEX_COLUMN = "var_index"


@dataclass
class ConvertSummary:
    output: str
    n_cells: int
    n_genes: int
    files: list[str] = field(default_factory=list)
    #: cells that waited in the temporary files (shuffle)
    spilled_cells: int = 0


def convert(
    *, inputs: Sequence[str], output: str, cells_per_shard: int = 20_000,
    obs_columns: Sequence[str] | str | None = None, shuffle: bool = False, batch_key: str | None = None,
    batch_size: int = 10_000, seed: int = 0,
    data_options: DataOptions | None = None, provenance: dict[str, Any] | None = None,
) -> ConvertSummary:
    """Write ``output/shard_*.h5ad`` (``cells_per_shard`` cells each) and ``output/convert.json``; see the
    module docstring. ``obs_columns``: the obs columns to keep (None: every column all inputs have);
    ``batch_key``'s columns are always kept."""
    for name, value in (("cells_per_shard", cells_per_shard), ("batch_size", batch_size)):
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be at least 1, got {value}")
    data_options = data_options or DataOptions()
    paths = expand_inputs(inputs)
    check_output_directory(output, paths)
    collection = open_shards(paths, batch_key=batch_key, allow_csc=True, **data_options.open_kwargs())
    shard_paths = [s.path for s in collection.shards]
    names = common_obs_columns(shard_paths) if obs_columns is None else split_columns(obs_columns)
    names += [k for k in parse_batch_key(batch_key) if k not in names]
    columns, skipped = obs_column_types(shard_paths, names, skip_untyped=obs_columns is None)
    if skipped:
        logger.warning("obs columns %s have no common type over the inputs; left out (name them in --obs-columns "
                       "to see why)", skipped)
    var = output_var(collection)
    if collection.partial_genes:
        logger.warning("--gene-join outer: some inputs lack some genes; the converted shards store zeros there, so "
                       "statistics on them count those cells as measured zeros (the measured mask is not kept)")

    n_cells = collection.n_obs
    n_shards = -(-n_cells // cells_per_shard)
    sizes = [min(cells_per_shard, n_cells - k * cells_per_shard) for k in range(n_shards)]
    destination = None
    if shuffle:
        destination = np.random.default_rng(seed).permutation(n_cells)
        destination = destination.astype(np.int32 if n_cells <= _INT32_MAX else np.int64)
    files = [shard_file_name(k, n_shards) for k in range(n_shards)]
    summary = ConvertSummary(output, n_cells, collection.n_vars, files)
    uns = {UNS_PROVENANCE: json.dumps(provenance or {}, default=str, sort_keys=True)}

    def manifest() -> dict[str, Any]:
        return {
            "format": FORMAT, "n_cells": n_cells, "n_genes": collection.n_vars, "cells_per_shard": cells_per_shard,
            "shards": [{"file": f, "n_obs": n} for f, n in zip(summary.files, sizes)],
            "shuffle": shuffle, "seed": seed if shuffle else None,
            "source": {"counts": collection.counts, "var_names": collection.var_names,
                       "gene_join": collection.gene_join, "obs_filter": collection.obs_filter},
            "obs_columns": [c.name for c in columns],
            "unmeasured_genes_are_zero": collection.partial_genes,
            "inputs": [{"path": s.path, "n_cells": s.n_obs,
                        "n_genes_missing": int((~collection.gene_measured_g(i)).sum())}
                       for i, s in enumerate(collection.shards)],
            "provenance": provenance or {},
        }

    with converted_directory(output, manifest) as tmp:
        spill = os.path.join(tmp, _SPILL)

        def write(index: int, parts: list[sp.csr_matrix], obs: pd.DataFrame) -> None:
            write_csr_h5ad(os.path.join(tmp, summary.files[index]), parts, obs, var, uns)
            logger.info("wrote %s (%d cells)", summary.files[index], len(obs))

        buckets = ShardBuckets(sizes, columns, spill, write, spill_cells=cells_per_shard + batch_size)
        reader = ShardReader(collection)
        try:
            first = 0
            for s, shard in enumerate(collection.shards):
                if shard.x_encoding == "csc_matrix":
                    reader.csc_rows[shard.path] = _csc_rows(shard.path, collection.x_key,
                                                            os.path.join(spill, f"csc_{s}"), batch_size)
                for start in range(0, shard.n_obs, batch_size):
                    positions = np.arange(start, min(start + batch_size, shard.n_obs))
                    x = _int32_counts(reader.read_x(shard, positions), shard.path, collection.x_key)
                    out_n = first + positions if destination is None else destination[first + positions]
                    values = {c.name: c.encode(reader.read_obs_column(shard, c.name, positions)) for c in columns}
                    buckets.add(out_n // cells_per_shard, out_n % cells_per_shard, x,
                                reader.read_obs_names(shard, positions), values)
                if shard.path in reader.csc_rows:
                    reader.csc_rows.pop(shard.path).close()
                first += shard.n_obs
            buckets.finish()
        finally:
            reader.close()
            for rows in reader.csc_rows.values():
                rows.close()
        shutil.rmtree(spill, ignore_errors=True)
        summary.spilled_cells = buckets.spilled_cells
    logger.info("wrote %s: %d cells x %d genes in %d shards%s", output, n_cells, collection.n_vars, n_shards,
                " (shuffled)" if shuffle else "")
    return summary


def _csc_rows(path: str, key: str, directory: str, window_rows: int) -> CSCRows:
    logger.info("%s: %s is CSC; bucketing its entries by row window (one pass over its columns)", path, key)
    rows = CSCRows(path, key, directory, window_rows)
    with Store(path, for_rows=True) as store:
        rows.build(store)
    return rows


def _int32_counts(x: sp.csr_matrix, path: str, key: str) -> sp.csr_matrix:
    """The rows with int32 counts (the reader has checked that they are non-negative integers)."""
    if x.dtype != np.int32:
        if x.data.size and x.data.max() > _INT32_MAX:
            raise InputError(f"{path}: {key} has a count above {_INT32_MAX}, more than an int32 holds")
        x = sp.csr_matrix((x.data.astype(np.int32), x.indices, x.indptr), shape=x.shape)
    return x


def output_var(collection: ShardCollection) -> pd.DataFrame:
    """The converted shards' var: indexed by the collection's genes, with the first input's var columns
    (its genes' dataframe: ``raw/var`` for raw counts) where it has the gene, missing where it has not
    (outer join); a var column chosen as gene names keeps the old index as ``var_index``."""
    from anndata.io import read_elem

    first = collection.shards[0].path
    with Store(first) as store:
        frame = read_elem(store[counts_location(collection.counts).var_key])
    if collection.var_names != "index":
        if VAR_INDEX_COLUMN not in frame.columns:
            frame[VAR_INDEX_COLUMN] = np.asarray(frame.index, dtype=object)
        frame.index = pd.Index(np.asarray(frame[collection.var_names]).astype(str), dtype=object)
    frame.index = frame.index.astype(str)
    genes = pd.Index(collection.var_names_g, dtype=object)
    if not genes.isin(frame.index).all():  # genes the first input lacks (outer join): types that hold missing values
        for column in frame.columns:
            kind = frame[column].dtype
            if pd.api.types.is_object_dtype(kind):
                frame[column] = frame[column].astype(pd.StringDtype())
            elif isinstance(kind, np.dtype) and kind.kind in "biu":
                frame[column] = frame[column].astype("boolean" if kind.kind == "b" else "Int64")
    frame = frame.reindex(genes)
    frame.index.name = None
    return frame
