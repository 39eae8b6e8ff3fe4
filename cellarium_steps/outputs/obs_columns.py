"""Shard obs columns as Arrow columns of the export (``export --obs-columns``).

Types come from the files' metadata, checked for every shard before the pass: a categorical is a
dictionary-encoded string (``dictionary<int32, string>``, categories written as text), numbers stay
numbers (the widest type when shards differ, e.g. int32 and int64 -> int64, int and float ->
double), booleans stay booleans, text stays text; a column categorical in one shard and text in
another is dictionary-encoded. Values are read one shard at a time (a shard's obs is metadata), from
``.h5ad`` files and ``.zarr`` stores alike (:class:`~cellarium_steps.data.sources.Store`), and only the
rows of the cells the export takes (``obs_filter``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from cellarium_steps.data.errors import InputError
from cellarium_steps.data.sources import Store, encoding_type, is_group, read_column

CATEGORICAL = pa.dictionary(pa.int32(), pa.string())


def _column_type(elem: object, path: str, column: str) -> pa.DataType:
    encoding = encoding_type(elem)
    if encoding == "categorical":
        return CATEGORICAL
    if encoding in ("string-array", "nullable-string-array"):
        return pa.string()
    if encoding == "nullable-boolean":
        return pa.bool_()
    if encoding == "nullable-integer":
        return pa.from_numpy_dtype(elem["values"].dtype)
    if encoding == "array" and not is_group(elem) and len(elem.shape) == 1:
        kind = np.dtype(elem.dtype).kind if isinstance(elem.dtype, np.dtype) else "T"
        if kind in "OSUT":
            return pa.string()
        if kind in "biuf":
            return pa.from_numpy_dtype(elem.dtype)
    raise InputError(f"{path}: obs[{column!r}] is stored as {encoding!r} ({getattr(elem, 'dtype', 'a group')}), "
                     "which the export cannot write as a column")


def obs_column_types(paths: Sequence[str], columns: Sequence[str]) -> dict[str, pa.DataType]:
    """Each column's export type over every shard; a missing or incompatible column is an InputError."""
    found: dict[str, list[tuple[str, pa.DataType]]] = {c: [] for c in columns}
    for path in paths:
        with Store(path) as store:
            obs = store["obs"]
            for column in columns:
                if column not in obs:
                    raise InputError(f"--obs-columns: {path}: obs has no column {column!r}")
                found[column].append((path, _column_type(obs[column], path, column)))
    types = {}
    for column, per_shard in found.items():
        kinds = {t for _, t in per_shard}
        if kinds <= {CATEGORICAL, pa.string()}:
            types[column] = CATEGORICAL if CATEGORICAL in kinds else pa.string()
            continue
        merged = pa.schema([pa.field(column, per_shard[0][1])])
        for path, kind in per_shard[1:]:
            try:
                merged = pa.unify_schemas([merged, pa.schema([pa.field(column, kind)])], promote_options="permissive")
            except (pa.ArrowTypeError, pa.ArrowInvalid):
                raise InputError(f"--obs-columns: {path}: obs[{column!r}] is {kind}, but in {per_shard[0][0]} it is "
                                 f"{per_shard[0][1]}") from None
        types[column] = merged.field(column).type
    return types


def _to_arrow(values: object, kind: pa.DataType) -> pa.Array:
    if isinstance(values, pd.Categorical):
        codes = values.codes.astype(np.int32)
        array = pa.DictionaryArray.from_arrays(
            pa.array(codes, mask=codes < 0), pa.array(values.categories.astype(str), pa.string()))
        return array if kind == CATEGORICAL else array.cast(kind)
    array = pa.array(values, from_pandas=True)
    if kind == CATEGORICAL:
        return array.cast(pa.string()).dictionary_encode().cast(CATEGORICAL)
    return array if array.type == kind else array.cast(kind)


def read_obs_columns(path: str, types: dict[str, pa.DataType], rows: np.ndarray | None = None) -> pa.Table:
    """One shard's ``types`` columns with the export's types: the file's ``rows`` (sorted), or every row."""
    with Store(path) as store:
        obs = store["obs"]
        columns = {}
        for column, kind in types.items():
            values = read_column(obs, column)
            columns[column] = _to_arrow(values if rows is None else values[rows], kind)
        return pa.table(columns)
