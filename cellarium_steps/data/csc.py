"""The rows of a CSC count matrix, which the other steps cannot stream: for ``convert``.

A CSC matrix stores each *gene*'s cells together, so a range of cells is spread over every column.
Reading a block of rows by slicing every column would read (and, compressed, decompress) the whole
``indices`` array once per block; densifying or loading the matrix would take memory that grows
with the cells. Instead, one pass over the columns buckets the entries by row window:

1. ``indptr`` (one entry per gene) gives the columns' extents; the columns are read in blocks of
   about ``block_entries`` stored entries (default: a read window's worth, ``window_rows`` times the
   mean entries per row, at least a million), each block two contiguous ranges of ``data`` and
   ``indices`` (so every compressed chunk is decompressed once);
2. each entry goes to the buffer of its row window (``row // window_rows``); when the buffers hold
   ``block_entries`` entries they are appended to one temporary file per window (row within the
   window as int32, column as int32, the value in the file's dtype);
3. :meth:`CSCRows.rows` then reads a window's file and builds its CSR rows (columns come in
   increasing order, so the rows are sorted and the build does not sort).

Memory: about two blocks of entries (the block read and the buffers) and one window's CSR rows,
whatever the number of cells; disk: every stored entry once, 8 bytes plus the value's size; time:
one read of the matrix and one write and read of its entries. The reader
(:class:`~cellarium_steps.data.reader.ShardReader`) takes the rows from here for a shard whose
``x_encoding`` is ``csc_matrix`` and checks and aligns them like any other rows.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import scipy.sparse as sp

from cellarium_steps.data.errors import InputError
from cellarium_steps.data.sources import Store


def csc_refused(path: str, key: str, how: str = "") -> InputError:
    """The error of a step that cannot stream a CSC matrix: it names the file, the matrix and the fix."""
    return InputError(f"{path}: {key} is stored as CSC{how}; cells can only be streamed from CSR rows: "
                      "rewrite the file with `cellarium-steps convert`")


def _record_dtype(value_dtype: np.dtype) -> np.dtype:
    return np.dtype([("row", "<i4"), ("col", "<i4"), ("value", value_dtype)])


class CSCRows:
    """One file's CSC matrix at ``key``, read as CSR rows after :meth:`build` bucketed it under ``directory``."""

    def __init__(self, path: str, key: str, directory: str, window_rows: int, block_entries: int | None = None) -> None:
        if window_rows < 1 or (block_entries is not None and block_entries < 1):
            raise ValueError("window_rows and block_entries must be positive")
        self.path, self.key, self.directory = path, key, directory
        self.window_rows, self.block_entries = window_rows, block_entries
        self.n_rows = self.n_cols = 0
        self.record = _record_dtype(np.dtype(np.float32))
        self._cached: tuple[int, sp.csr_matrix] | None = None

    def _window_path(self, window: int) -> str:
        return os.path.join(self.directory, f"rows_{window:07d}.bin")

    def build(self, store: Store) -> None:
        """The pass over the columns (see the module docstring)."""
        elem = store[self.key]
        self.n_rows, self.n_cols = (int(v) for v in elem.attrs["shape"])
        self.record = _record_dtype(np.dtype(elem["data"].dtype))
        os.makedirs(self.directory, exist_ok=True)
        indptr = store.read(f"{self.key}/indptr", 0, self.n_cols + 1).astype(np.int64)
        if len(indptr) != self.n_cols + 1 or indptr[0] != 0 or (np.diff(indptr) < 0).any():
            raise InputError(f"{self.path}: {self.key}/indptr is not the column pointers of a {self.n_cols}-column "
                             "CSC matrix")
        if self.block_entries is None:  # default: one read window's worth of entries (at least a million)
            per_row = -(-int(indptr[-1]) // max(self.n_rows, 1))
            self.block_entries = max(1 << 20, self.window_rows * per_row)
        n_windows = max(1, -(-self.n_rows // self.window_rows))
        # Window ids as 16-bit integers where they fit: numpy's stable sort is then a radix sort.
        window_dtype = np.uint16 if n_windows <= np.iinfo(np.uint16).max else np.int64
        buffers: dict[int, list[np.ndarray]] = {}
        buffered = 0
        start = 0
        while start < self.n_cols:
            budget = int(indptr[start]) + self.block_entries
            stop = min(self.n_cols, max(start + 1, int(np.searchsorted(indptr, budget, side="right")) - 1))
            first, last = int(indptr[start]), int(indptr[stop])
            row_e = store.read(f"{self.key}/indices", first, last).astype(np.int64, copy=False)
            if row_e.size and (row_e.min() < 0 or row_e.max() >= self.n_rows):
                raise InputError(f"{self.path}: {self.key}/indices has a row index outside 0..{self.n_rows - 1} "
                                 f"(columns {start}..{stop - 1})")
            value_e = store.read(f"{self.key}/data", first, last)
            col_e = np.repeat(np.arange(start, stop, dtype=np.int32), np.diff(indptr[start : stop + 1]))
            window_e = (row_e // self.window_rows).astype(window_dtype)
            order = np.argsort(window_e, kind="stable")  # keeps each window's entries in column order
            window_e = window_e[order]
            bounds = np.searchsorted(window_e, np.arange(n_windows + 1))
            for window in np.flatnonzero(np.diff(bounds)):
                taken = order[bounds[window] : bounds[window + 1]]
                records = np.empty(len(taken), dtype=self.record)
                records["row"] = row_e[taken] - int(window) * self.window_rows
                records["col"] = col_e[taken]
                records["value"] = value_e[taken]
                buffers.setdefault(int(window), []).append(records)
            buffered += last - first
            if buffered >= self.block_entries:
                self._flush(buffers)
                buffered = 0
            start = stop
        self._flush(buffers)

    def _flush(self, buffers: dict[int, list[np.ndarray]]) -> None:
        for window, parts in buffers.items():
            with open(self._window_path(window), "ab") as f:
                f.writelines(records.tobytes() for records in parts)
        buffers.clear()

    def _window(self, window: int) -> sp.csr_matrix:
        if self._cached is None or self._cached[0] != window:
            path = self._window_path(window)
            records = np.fromfile(path, dtype=self.record) if os.path.exists(path) else np.empty(0, self.record)
            n_rows = min(self.window_rows, self.n_rows - window * self.window_rows)
            coo = sp.coo_matrix((records["value"], (records["row"], records["col"])), shape=(n_rows, self.n_cols))
            self._cached = (window, coo.tocsr())
        return self._cached[1]

    def rows(self, rows: np.ndarray) -> sp.csr_matrix:
        """CSR rows of the file's rows ``rows`` (sorted), in the file's genes; windows read in turn, the last kept."""
        window_n = rows // self.window_rows
        parts = []
        for window in np.unique(window_n):
            in_window = rows[window_n == window]
            parts.append(self._window(int(window))[in_window - int(window) * self.window_rows])
        if not parts:
            return sp.csr_matrix((0, self.n_cols), dtype=self.record["value"])
        return parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")

    def close(self) -> None:
        """Remove the bucket files."""
        self._cached = None
        shutil.rmtree(self.directory, ignore_errors=True)
