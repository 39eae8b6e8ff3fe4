"""Which names are the genes of a file, and how each shard's columns map onto the collection's genes.

``gene_join``:

* ``"same"``: every shard has the first shard's set of genes, in any order;
* ``"inner"``: the genes every shard has, in the first shard's order;
* ``"outer"``: every gene any shard has: the first shard's order, then new genes in order of
  appearance; a shard's missing genes read as zeros, and the batches say which genes each shard
  measured (see :class:`~cellarium_steps.data.dataset.ShardedCellDataset`).

A shard's alignment is a column map (for each of its file's genes, the collection's column, or -1
to drop it) applied where rows are read; nothing is densified. Shards with the same gene list share
one map object, so a collection of many shards holds (and pickles to loader workers) few maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cellarium_steps.data.errors import InputError
from cellarium_steps.data.sources import Store, dataframe_columns, dataframe_index, read_column

GENE_JOINS = ("same", "inner", "outer")


def shard_gene_names(store: Store, var_key: str, var_names: str, n_cols: int, matrix_key: str) -> np.ndarray:
    """The gene names of a file's counts matrix: ``var_key``'s index or one of its columns, checked."""
    path = store.path
    if var_key not in store:
        raise InputError(f"{path}: no {var_key} dataframe for the genes of {matrix_key}")
    frame = store[var_key]
    if var_names == "index":
        names = dataframe_index(frame, path, var_key)
        what = f"{var_key} index"
    else:
        if var_names not in frame:
            columns = dataframe_columns(frame)
            raise InputError(f"{path}: {var_key} has no column {var_names!r} (--var-names); "
                             f"it has {columns[:10] if columns else 'only an index'}")
        values = np.asarray(read_column(frame, var_names), dtype=object)
        if pd.isna(values).any():
            raise InputError(f"{path}: {var_key}[{var_names!r}] has missing gene names (--var-names)")
        names = values.astype(str).astype(object)
        what = f"{var_key}[{var_names!r}]"
    if len(names) != n_cols:
        raise InputError(f"{path}: {what} names {len(names)} genes but {matrix_key} has {n_cols} columns")
    if len(set(names)) != len(names):
        unique, counts = np.unique(names.astype(str), return_counts=True)
        duplicates = [str(g) for g in unique[counts > 1][:5]]
        raise InputError(f"{path}: {what} has duplicate gene names, e.g. {duplicates} (--var-names: choose a "
                         "column of unique names)")
    return names


@dataclass(frozen=True)
class GeneAlignment:
    var_names_g: np.ndarray
    #: per shard: its file's genes -> the collection's columns (-1: dropped); None where identical
    column_maps: list[np.ndarray | None]
    #: whether some shard lacks some of the collection's genes (outer join only)
    partial: bool


def align_genes(paths: Sequence[str], names: Sequence[np.ndarray], gene_join: str) -> GeneAlignment:
    """The collection's genes and each shard's column map, or an ``InputError`` naming the shard."""
    if gene_join not in GENE_JOINS:
        raise InputError(f"--gene-join: {gene_join!r} is not one of {GENE_JOINS}")
    first = names[0]
    if gene_join == "same":
        first_set = set(first)
        for path, shard_names in zip(paths[1:], names[1:]):
            if len(shard_names) != len(first) or not first_set.issuperset(shard_names):
                raise InputError(_describe_mismatch(path, shard_names, paths[0], first))
        var_names_g = first
    elif gene_join == "inner":
        common = set(first).intersection(*map(set, names[1:]))
        var_names_g = np.array([g for g in first if g in common], dtype=object)
        if not len(var_names_g):
            raise InputError(f"--gene-join inner: no gene is in every shard ({paths[0]} and the others share none)")
    else:
        seen: dict[str, None] = {}
        for shard_names in names:
            seen.update(dict.fromkeys(shard_names))
        var_names_g = np.array(list(seen), dtype=object)
    position = {g: i for i, g in enumerate(var_names_g)}
    maps: dict[bytes, np.ndarray | None] = {}
    column_maps = []
    partial = False
    for shard_names in names:
        key = "\0".join(shard_names).encode()
        if key not in maps:
            column_f = np.array([position.get(g, -1) for g in shard_names], dtype=np.int32)
            identity = len(column_f) == len(var_names_g) and np.array_equal(column_f, np.arange(len(column_f)))
            maps[key] = None if identity else column_f
            partial |= int((column_f >= 0).sum()) < len(var_names_g)
        column_maps.append(maps[key])
    return GeneAlignment(var_names_g, column_maps, partial)


def measured_genes(column_f: np.ndarray | None, n_vars: int) -> np.ndarray:
    """Which of the collection's genes a shard with this column map measured (bool, length n_vars)."""
    measured_g = np.zeros(n_vars, dtype=bool)
    if column_f is None:
        measured_g[:] = True
    else:
        measured_g[column_f[column_f >= 0]] = True
    return measured_g


def _describe_mismatch(path: str, genes: np.ndarray, first_path: str, first_genes: np.ndarray) -> str:
    hint = " (--gene-join same; inner or outer join differing genes)"
    if len(genes) != len(first_genes):
        return f"{path}: var_names has {len(genes)} genes, {first_path} has {len(first_genes)}{hint}"
    first_set = set(first_genes)
    i = next(i for i, g in enumerate(genes) if g not in first_set)
    return (f"{path}: var_names differ from {first_path}'s at gene {i} ({str(genes[i])!r} vs "
            f"{str(first_genes[i])!r}){hint}")
