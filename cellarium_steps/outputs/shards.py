"""Converted shards (``convert``): uncompressed CSR ``.h5ad`` files, assembled from cells that arrive in any order.

:func:`write_csr_h5ad` writes one file in anndata's on-disk format: ``X`` a ``csr_matrix`` group whose
``data`` (int32 counts), ``indices`` (int32) and ``indptr`` (int64) are contiguous, unfiltered datasets,
so that the data layer reads their bytes directly (``data/direct.py``); ``obs``, ``var`` and ``uns`` are
written by anndata's own ``write_elem``, so every column keeps its encoding.

:class:`ShardBuckets` routes cells to output shards. Cells arrive in read windows, each cell with its
output shard and its row there; each shard's cells are kept in memory until it has all of them, then
it is assembled (its cells put in row order) and written, and its memory freed. When more than
``spill_cells`` cells wait in memory, every waiting group is appended to its shard's temporary file
(pickled), and read back when the shard completes. Cells that arrive in output order (no shuffle)
complete one shard after another and never wait on disk; shuffled cells complete their shards only
at the end and each passes through its temporary file once.

:func:`converted_directory` builds the output directory under a temporary name beside it and renames
it into place when the block succeeds, so a killed convert leaves no file at the final names.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellarium_steps.atomic import atomic_path, remove_stale_temporaries
from cellarium_steps.data.errors import InputError
from cellarium_steps.data.obs_columns import ObsColumnType

#: the run's description in the output directory; its presence marks a directory convert may replace
MANIFEST = "convert.json"
#: where the run's provenance goes in each shard (a JSON string in uns)
UNS_PROVENANCE = "cellarium_steps"
# The AnnData on-disk spec's encodings of what is written here by hand.
_ANNDATA = {"encoding-type": "anndata", "encoding-version": "0.1.0"}
_CSR = {"encoding-type": "csr_matrix", "encoding-version": "0.1.0"}
_EMPTY_ELEMENTS = ("layers", "obsm", "obsp", "varm", "varp")


def shard_file_name(index: int, n_shards: int) -> str:
    return f"shard_{index:0{max(5, len(str(n_shards - 1)))}d}.h5ad"


def write_csr_h5ad(path: str, parts: Sequence[sp.csr_matrix], obs: pd.DataFrame, var: pd.DataFrame,
                   uns: dict[str, Any]) -> None:
    """One AnnData file whose X is ``parts`` stacked (rows in order) as uncompressed CSR: int32 data and
    indices, int64 row pointers. Each part is written into its range of the datasets, never concatenated."""
    from anndata.io import write_elem

    n_rows = sum(p.shape[0] for p in parts)
    nnz_p = np.array([p.nnz for p in parts], dtype=np.int64)
    offset_p = np.concatenate([[0], np.cumsum(nnz_p)])
    indptr = np.concatenate([[0]] + [p.indptr[1:].astype(np.int64) + offset for p, offset in zip(parts, offset_p)])
    with h5py.File(path, "w") as f:
        f.attrs.update(_ANNDATA)
        group = f.create_group("X")
        group.attrs.update(_CSR)
        group.attrs["shape"] = np.array([n_rows, parts[0].shape[1]], dtype=np.int64)
        # No chunks, no filters: contiguous datasets, read straight from the file's bytes. Every element is
        # written below, so no fill values first (writing those doubled the time of a 20,000-cell shard).
        data = group.create_dataset("data", shape=(int(offset_p[-1]),), dtype=np.int32, fill_time="never")
        indices = group.create_dataset("indices", shape=(int(offset_p[-1]),), dtype=np.int32, fill_time="never")
        for part, start, stop in zip(parts, offset_p[:-1], offset_p[1:]):
            if stop > start:
                data[start:stop] = part.data.astype(np.int32, copy=False)
                indices[start:stop] = part.indices.astype(np.int32, copy=False)
        group.create_dataset("indptr", data=indptr)
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        for key in _EMPTY_ELEMENTS:
            write_elem(f, key, {})
        write_elem(f, "uns", uns)


@dataclass
class Cells:
    """Cells bound for one output shard: their rows there, counts, obs names and encoded obs columns."""

    rows: np.ndarray
    x: sp.csr_matrix
    names: np.ndarray
    columns: dict[str, Any]


class ShardBuckets:
    """Collect cells into output shards of ``sizes`` cells; ``write(index, parts, obs)`` each shard once it is
    complete (its counts: the CSR ``parts`` stacked in order).

    Memory: the cells waiting in memory (at most ``spill_cells`` after each :meth:`add`, plus those of
    one read window) and one shard being assembled (its cells once if they came in row order, else
    twice: as they came and gathered into order).
    """

    def __init__(self, sizes: Sequence[int], columns: Sequence[ObsColumnType], directory: str,
                 write: Callable[[int, list[sp.csr_matrix], pd.DataFrame], None], spill_cells: int) -> None:
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.columns = list(columns)
        self.directory = directory
        self.write = write
        self.spill_cells = spill_cells
        self.received = np.zeros(len(self.sizes), dtype=np.int64)
        self.written = np.zeros(len(self.sizes), dtype=bool)
        self._waiting: dict[int, list[Cells]] = {}
        self._n_waiting = 0
        self._spilled: set[int] = set()
        self.spilled_cells = 0

    def _spill_path(self, index: int) -> str:
        return os.path.join(self.directory, f"cells_{index:07d}.pkl")

    def add(self, shard_n: np.ndarray, row_n: np.ndarray, x: sp.csr_matrix, names: np.ndarray,
            columns: dict[str, Any]) -> None:
        """Cells of one read window: cell n goes to row ``row_n[n]`` of output shard ``shard_n[n]``."""
        if len(shard_n) and (np.diff(shard_n) < 0).any():
            order = np.argsort(shard_n, kind="stable")
            shard_n, row_n, x, names = shard_n[order], row_n[order], x[order], names[order]
            columns = {name: values[order] for name, values in columns.items()}
        bounds = np.flatnonzero(np.diff(shard_n)) + 1
        for start, stop in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(shard_n)]])):
            index = int(shard_n[start])
            if start == 0 and stop == len(shard_n):  # the whole window: no copy
                cells = Cells(row_n, x, names, columns)
            else:
                cells = Cells(row_n[start:stop], x[start:stop], names[start:stop],
                              {name: values[start:stop] for name, values in columns.items()})
            self._waiting.setdefault(index, []).append(cells)
            self._n_waiting += stop - start
            self.received[index] += stop - start
            if self.received[index] > self.sizes[index]:
                raise RuntimeError(f"output shard {index} was sent more than its {self.sizes[index]} cells")
            if self.received[index] == self.sizes[index]:
                self._complete(index)
        if self._n_waiting > self.spill_cells:
            self._spill()

    def _spill(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        for index, groups in self._waiting.items():
            with open(self._spill_path(index), "ab") as f:
                for cells in groups:
                    pickle.dump(cells, f, protocol=pickle.HIGHEST_PROTOCOL)
            self._spilled.add(index)
        self.spilled_cells += int(self._n_waiting)
        self._waiting.clear()
        self._n_waiting = 0

    def _groups(self, index: int) -> list[Cells]:
        groups = []
        if index in self._spilled:
            with open(self._spill_path(index), "rb") as f:
                while True:
                    try:
                        groups.append(pickle.load(f))
                    except EOFError:
                        break
            os.remove(self._spill_path(index))
            self._spilled.discard(index)
        waiting = self._waiting.pop(index, [])
        self._n_waiting -= sum(len(c.rows) for c in waiting)
        return groups + waiting

    def _complete(self, index: int) -> None:
        groups = self._groups(index)
        rows = np.concatenate([c.rows for c in groups])
        order = np.argsort(rows, kind="stable")
        if not np.array_equal(rows[order], np.arange(self.sizes[index])):
            raise RuntimeError(f"output shard {index}: its cells' rows are not 0..{self.sizes[index] - 1} once each")
        in_order = bool(np.array_equal(order, np.arange(len(order))))
        parts = [c.x for c in groups]
        names = np.concatenate([c.names for c in groups])
        columns = {column.name: column.decode([c.columns[column.name] for c in groups]) for column in self.columns}
        del groups
        if not in_order:  # rows gathered into their order; in order, the parts are written as they are
            stacked = parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")
            del parts  # at most two copies of the shard's rows at a time: as they came and gathered
            parts = [stacked[order]]
            del stacked
            names = names[order]
            columns = {name: values[order] for name, values in columns.items()}
        obs = pd.DataFrame(columns, index=pd.Index(names, dtype=object))
        self.write(index, parts, obs)
        self.written[index] = True

    def finish(self) -> None:
        """Every shard was completed and written (checked)."""
        missing = np.flatnonzero(~self.written)
        if missing.size:
            index = int(missing[0])
            raise RuntimeError(f"output shard {index} got {self.received[index]} of its {self.sizes[index]} cells")


def check_output_directory(output: str, inputs: Sequence[str]) -> None:
    """``output`` may be created or replaced: absent, empty, or an earlier convert's (it has the manifest);
    no input lies inside it. An :class:`InputError` otherwise, before anything is written."""
    root = os.path.realpath(output)
    for path in inputs:
        if os.path.commonpath([root, os.path.realpath(path)]) == root:
            raise InputError(f"--output: {output} holds the input {path}; convert into another directory")
    if os.path.exists(output) and not os.path.isdir(output):
        raise InputError(f"--output: {output} is a file; convert writes a directory of shards")
    if os.path.isdir(output) and os.listdir(output) and not os.path.isfile(os.path.join(output, MANIFEST)):
        raise InputError(f"--output: {output} exists and is not an earlier convert's output (no {MANIFEST}); "
                         "choose a new directory or empty it")


@contextlib.contextmanager
def converted_directory(output: str, manifest: Callable[[], dict[str, Any]]) -> Iterator[str]:
    """A temporary directory beside ``output`` to write the shards into; when the block succeeds the
    manifest (``manifest()``) is written into it and it replaces ``output``. A failed block removes it;
    a killed run's is removed by the next run."""
    remove_stale_temporaries([output])
    with atomic_path(output) as tmp:
        os.makedirs(tmp)
        yield tmp
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest(), f, default=str, indent=2, sort_keys=True)
        if os.path.isdir(output):
            shutil.rmtree(output)
