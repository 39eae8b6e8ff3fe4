"""Obs columns typed once over several shards, for writing them into new shards (``convert``).

Each file's column type comes from its metadata alone (the encoding, the dtype, a categorical's
categories), checked for every shard before any pass; the shards' types are then unified:

* categoricals in every shard: one categorical whose categories are the first shard's, then those
  later shards add, in order of appearance (so codes agree across the new shards; ordered only if
  every shard's is, with the same categories);
* numbers, booleans, nullable integers and booleans, text: pandas' own promotion (``pd.concat`` of
  empty columns: int32 and int64 give int64, int and float give float, int and nullable int give
  nullable int); a categorical of text among text columns gives text;
* anything pandas can only promote to ``object`` (a boolean in one shard and a number in another)
  is an :class:`InputError` naming both files.

Values are read a window at a time (:meth:`ShardReader.read_obs_column
<cellarium_steps.data.reader.ShardReader.read_obs_column>`), :meth:`ObsColumnType.encode` turns them
into the unified type (categoricals as codes), and :meth:`ObsColumnType.decode` builds the column of
a new shard from the encoded parts of its cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
import pandas as pd

from cellarium_steps.data.errors import InputError
from cellarium_steps.data.sources import Store, dataframe_columns, encoding_type, is_group, read_array


@dataclass(frozen=True)
class ObsColumnType:
    """One obs column's type over every shard: a numpy dtype or a pandas extension dtype."""

    name: str
    dtype: Any

    @property
    def categorical(self) -> bool:
        return isinstance(self.dtype, pd.CategoricalDtype)

    def encode(self, values: np.ndarray) -> Any:
        """A window's values (categories decoded, None where missing) in the unified type; codes for a categorical."""
        if self.categorical:
            return pd.Categorical(values, dtype=self.dtype).codes
        if isinstance(self.dtype, np.dtype):
            return np.asarray(values).astype(self.dtype, copy=False)
        return pd.array(values, dtype=self.dtype)

    def decode(self, parts: Sequence[Any]) -> Any:
        """The column of a new shard from the encoded parts of its cells, in order."""
        if self.categorical:
            return pd.Categorical.from_codes(np.concatenate(parts), dtype=self.dtype)
        if isinstance(self.dtype, np.dtype):
            return np.concatenate(parts)
        return pd.concat([pd.Series(p, dtype=self.dtype) for p in parts], ignore_index=True).array


def split_columns(values: Sequence[str] | str | None) -> list[str]:
    """``a,b c`` (commas or separate arguments, as --obs-columns and a YAML list give them) -> [a, b, c]."""
    if values is None:
        return []
    items = [values] if isinstance(values, str) else values
    columns = [c.strip() for item in items for c in str(item).split(",") if c.strip()]
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        raise InputError(f"--obs-columns: {duplicated} listed more than once")
    return columns


def file_column_dtype(elem: Any) -> Any | None:
    """The pandas dtype of one file's obs column from its metadata; None if it is not one we can carry."""
    encoding = encoding_type(elem)
    if encoding == "categorical":
        return pd.CategoricalDtype(read_array(elem["categories"]), ordered=bool(elem.attrs.get("ordered", False)))
    if encoding == "string-array":
        return np.dtype(object)
    if encoding == "nullable-string-array":
        return pd.StringDtype()
    if encoding == "nullable-boolean":
        return pd.BooleanDtype()
    if encoding == "nullable-integer":
        name = np.dtype(elem["values"].dtype).name  # int32 -> Int32, uint8 -> UInt8
        return pd.api.types.pandas_dtype(name.replace("int", "Int").replace("uInt", "UInt"))
    if encoding == "array" and not is_group(elem) and len(elem.shape) == 1:
        dtype = np.dtype(elem.dtype)
        if dtype.kind in "biuf":
            return dtype
        if dtype.kind in "OSUT" or (isinstance(elem, h5py.Dataset) and h5py.check_string_dtype(dtype) is not None):
            return np.dtype(object)
    return None


def common_obs_columns(paths: Sequence[str]) -> list[str]:
    """The obs columns every file has, in the first file's column order."""
    columns: list[str] | None = None
    for path in paths:
        with Store(path) as store:
            names = dataframe_columns(store["obs"])
        columns = names if columns is None else [c for c in columns if c in set(names)]
    return columns or []


def obs_column_types(paths: Sequence[str], columns: Sequence[str], *, skip_untyped: bool = False,
                     option: str = "--obs-columns") -> tuple[list[ObsColumnType], list[str]]:
    """Each column's unified type over ``paths`` (see the module docstring), and the columns left out.

    A column a file lacks, or that cannot be carried (``skip_untyped=False``) or unified, is an
    :class:`InputError` naming the file and the column; with ``skip_untyped``, columns that cannot be
    carried or unified are left out instead (the default set of columns, which nobody asked for by name).
    """
    found: dict[str, list[tuple[str, Any]]] = {c: [] for c in columns}
    for path in paths:
        with Store(path) as store:
            obs = store["obs"]
            index_key = obs.attrs.get("_index", "_index")
            for column in columns:
                if column not in obs or column == index_key:
                    raise InputError(f"{path}: obs has no column {column!r} ({option})")
                found[column].append((path, file_column_dtype(obs[column])))
    types, skipped = [], []
    for column, per_file in found.items():
        try:
            types.append(ObsColumnType(column, _unify(column, per_file, option)))
        except InputError:
            if not skip_untyped:
                raise
            skipped.append(column)
    return types, skipped


def _unify(column: str, per_file: list[tuple[str, Any]], option: str) -> Any:
    for path, dtype in per_file:
        if dtype is None:
            raise InputError(f"{path}: obs[{column!r}] is not a column of numbers, booleans, text or categories "
                             f"({option})")
    dtypes = [d for _, d in per_file]
    if all(isinstance(d, pd.CategoricalDtype) for d in dtypes):
        categories = pd.Index(dtypes[0].categories)
        for dtype in dtypes[1:]:
            categories = categories.append(pd.Index(dtype.categories)).unique()
        ordered = all(d.ordered and d.categories.equals(dtypes[0].categories) for d in dtypes)
        return pd.CategoricalDtype(categories, ordered=ordered)
    plain = [d.categories.dtype if isinstance(d, pd.CategoricalDtype) else d for d in dtypes]
    unified = pd.concat([pd.Series([], dtype=d) for d in plain]).dtype
    text = [pd.api.types.is_object_dtype(d) or isinstance(d, pd.StringDtype) for d in plain]
    if pd.api.types.is_object_dtype(unified) and not all(text):
        (path_a, a), (path_b, b) = per_file[0], next(((p, d) for p, d in per_file if str(d) != str(per_file[0][1])))
        raise InputError(f"{path_b}: obs[{column!r}] is {b}, but in {path_a} it is {a}: no common type ({option})")
    if any(isinstance(d, pd.StringDtype) for d in plain):
        return pd.StringDtype()
    return unified
