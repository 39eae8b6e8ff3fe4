"""AnnData files behind one small interface: ``.h5ad`` through h5py, ``.zarr`` stores through zarr.

A collection reads only a few things of a file: dataframe columns and indexes (obs, var, raw/var),
the encoding, shape and dtype of a count matrix, its row pointers, and ranges of its 1-D arrays.
h5py and zarr (v2 and v3 stores, as ``anndata.AnnData.write_zarr`` writes them) expose groups,
arrays and attributes alike; what differs (string decoding, the group type, the direct byte reads
that only uncompressed HDF5 allows) is handled here, so that the rest of the data layer does not
know which kind of file it reads.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Self

import h5py
import numpy as np

from cellarium_steps.data.direct import DirectFile
from cellarium_steps.data.errors import InputError

ZARR_SUFFIX = ".zarr"
#: Encodings whose rows can be read as ranges: CSR (row pointers) and dense arrays.
STREAMABLE_ENCODINGS = ("csr_matrix", "array")
#: Stored values looked at to decide whether a float matrix holds integer counts (first chunks only).
SAMPLE_VALUES = 1 << 16
# Rows per read when a dense matrix must be scanned (counting stored entries for ``n_genes``).
_DENSE_SCAN_ROWS = 1024
# Stored entries per read when a CSC matrix's row indices are counted (``n_genes``).
_CSC_SCAN_ENTRIES = 1 << 24


def is_zarr_path(path: str) -> bool:
    return os.path.isdir(path) and os.path.normpath(path).endswith(ZARR_SUFFIX)


def is_group(elem: Any) -> bool:
    if isinstance(elem, h5py.Group):
        return True
    zarr = sys.modules.get("zarr")  # only loaded when a zarr store was opened
    return zarr is not None and isinstance(elem, zarr.Group)


def encoding_type(elem: Any) -> str:
    return str(elem.attrs.get("encoding-type", "array"))


def read_range(elem: Any, start: int, stop: int) -> np.ndarray:
    """``elem[start:stop]`` of a 1-D array; strings as an object array of ``str``."""
    whole = start == 0 and stop >= int(elem.shape[0])  # h5py reads a whole dataset faster than a slice
    if isinstance(elem, h5py.Dataset) and h5py.check_string_dtype(elem.dtype):
        return np.asarray(elem.asstr()[()] if whole else elem.asstr()[start:stop], dtype=object)
    values = np.asarray(elem[()] if whole and isinstance(elem, h5py.Dataset) else elem[start:stop])
    return values.astype(object) if values.dtype.kind in "OSUT" else values


def read_runs(elem: Any, runs: list[tuple[int, int]]) -> np.ndarray:
    return np.concatenate([read_range(elem, a, b) for a, b in runs])


def read_array(elem: Any) -> np.ndarray:
    """A whole 1-D element as numpy; anndata (seconds to import) only for encodings stored as groups."""
    if not is_group(elem):
        return read_range(elem, 0, int(elem.shape[0]))
    from anndata.io import read_elem

    return np.asarray(read_elem(elem))


def read_column(frame: Any, key: str) -> Any:
    """A whole dataframe column: ``pd.Categorical`` for categoricals, numpy or a pandas array otherwise."""
    elem = frame[key]
    if encoding_type(elem) == "categorical":
        import pandas as pd

        codes = np.asarray(elem["codes"][...]).astype(np.int64)
        return pd.Categorical.from_codes(codes, categories=read_array(elem["categories"]),
                                         ordered=bool(elem.attrs.get("ordered", False)))
    if is_group(elem):  # nullable integers, booleans, strings
        from anndata.io import read_elem

        return read_elem(elem)
    return read_array(elem)


def dataframe_index(frame: Any, path: str, name: str) -> np.ndarray:
    index_key = frame.attrs.get("_index", "_index")
    if index_key not in frame:
        raise InputError(f"{path}: {name} has no index")
    names = read_array(frame[index_key])
    return names if names.dtype == object else names.astype(str).astype(object)


def dataframe_columns(frame: Any) -> list[str]:
    return [str(c) for c in np.atleast_1d(frame.attrs.get("column-order", []))]


@dataclass(frozen=True)
class MatrixInfo:
    """Where a count matrix is in its file and how it is stored."""

    key: str
    encoding: str
    n_rows: int
    n_cols: int
    dtype: np.dtype

    @property
    def is_integer_dtype(self) -> bool:
        return np.issubdtype(self.dtype, np.integer)


class Store:
    """One open AnnData file; ``store[key]`` is its element (h5py or zarr), ``key in store`` works alike.

    Opened for reading rows (``for_rows=True``), an uncompressed ``.h5ad`` array is read straight
    from the file's bytes (:class:`DirectFile`), anything else through h5py or zarr.
    """

    def __init__(self, path: str, for_rows: bool = False, layouts: dict | None = None,
                 chunk_cache_bytes: int = 1024 * 1024) -> None:
        self.path = path
        self.kind = "zarr" if is_zarr_path(path) else "h5ad"
        self._arrays: dict[str, Any] = {}
        self._direct: DirectFile | None = None
        if self.kind == "zarr":
            import zarr

            try:
                self.root = zarr.open_group(path, mode="r")
            except Exception as e:  # noqa: BLE001 (zarr raises several types for a directory that is not a store)
                raise InputError(f"{path}: not a readable AnnData zarr store ({e})") from None
        else:
            try:
                self.root = h5py.File(path, "r", rdcc_nbytes=chunk_cache_bytes)
            except OSError as e:
                raise InputError(f"{path}: not a readable .h5ad file ({e})") from None
            if for_rows:
                self._direct = DirectFile(self.root, layouts)

    def __contains__(self, key: str) -> bool:
        return key in self.root

    def __getitem__(self, key: str) -> Any:
        return self.root[key]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
        if self.kind == "h5ad":
            self.root.close()
        self._arrays.clear()

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """``store[name][start:stop]`` of a numeric 1-D array (direct bytes for plain HDF5)."""
        if self._direct is not None:  # layouts are kept by the dataset's absolute name, as h5py names it
            return self._direct.read("/" + name.lstrip("/"), start, stop)
        array = self._arrays.get(name)
        if array is None:  # a zarr lookup reads metadata; do it once per array
            array = self._arrays[name] = self.root[name]
        return np.asarray(array[start:stop])

    def matrix_info(self, key: str) -> MatrixInfo | None:
        """The matrix at ``key`` (None if absent); its encoding may be one rows cannot be read from."""
        if key not in self.root:
            return None
        elem = self.root[key]
        encoding = encoding_type(elem)
        if encoding in ("csr_matrix", "csc_matrix"):
            n_rows, n_cols = (int(v) for v in elem.attrs["shape"])
            return MatrixInfo(key, encoding, n_rows, n_cols, np.dtype(elem["data"].dtype))
        if encoding == "array" and not is_group(elem) and len(elem.shape) == 2:
            return MatrixInfo(key, encoding, int(elem.shape[0]), int(elem.shape[1]), np.dtype(elem.dtype))
        return MatrixInfo(key, encoding, -1, -1, np.dtype(np.float64))

    def first_non_integer(self, info: MatrixInfo) -> float | None:
        """A value among the first stored ones that is not an integer (NaN and inf included), else None.

        A bounded sample (the first chunks of the data), so that choosing the matrix costs no pass;
        the reader still checks every value it reads.
        """
        found = self.first_non_integer_at(info)
        return None if found is None else found[0]

    def first_non_integer_at(self, info: MatrixInfo) -> tuple[float, int] | None:
        """:meth:`first_non_integer` and the row that holds it (CSR rows; a CSC matrix's column)."""
        if info.is_integer_dtype:
            return None
        elem = self.root[info.key]
        sparse = info.encoding in ("csr_matrix", "csc_matrix")
        if sparse:
            sample = np.asarray(elem["data"][:SAMPLE_VALUES])
        else:
            sample = np.asarray(elem[: max(1, SAMPLE_VALUES // max(info.n_cols, 1))]).ravel()
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(sample) | (sample != np.round(sample))
        if not bad.any():
            return None
        i = int(np.argmax(bad))
        if not sparse:
            return float(sample[i]), i // max(info.n_cols, 1)
        # Only on bad input: the whole row pointer array, to name the row
        indptr = np.asarray(elem["indptr"][...]).astype(np.int64)
        return float(sample[i]), int(np.searchsorted(indptr, i, side="right") - 1)

    def stored_per_row(self, info: MatrixInfo) -> np.ndarray:
        """Stored entries of each row (int64): the row pointers' differences, a count of a CSC matrix's
        row indices, or a scan of a dense matrix."""
        elem = self.root[info.key]
        if info.encoding == "csr_matrix":
            return np.diff(np.asarray(elem["indptr"][...]).astype(np.int64))
        if info.encoding == "csc_matrix":
            indices = elem["indices"]
            counts = np.zeros(info.n_rows, dtype=np.int64)
            for start in range(0, int(indices.shape[0]), _CSC_SCAN_ENTRIES):
                rows = np.asarray(indices[start : start + _CSC_SCAN_ENTRIES])
                counts += np.bincount(rows, minlength=info.n_rows)[: info.n_rows]
            return counts
        counts = np.empty(info.n_rows, dtype=np.int64)
        for start in range(0, info.n_rows, _DENSE_SCAN_ROWS):
            block = np.asarray(elem[start : start + _DENSE_SCAN_ROWS])
            counts[start : start + len(block)] = np.count_nonzero(block, axis=1)
        return counts
