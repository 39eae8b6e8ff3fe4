"""Batch codes consistent across shards, from one obs column or the combination of several.

The collection's batch categories:

* one categorical column: its categories in the first shard's order, with categories that only
  later shards have (AnnData drops unused ones when a subset is written) appended in order of
  appearance;
* one plain column, or several columns (``"dataset_id,assay,donor_id"`` or a list): the sorted set
  of the values (combinations, named ``a|b|c``) that the shards' cells (those ``obs_filter`` keeps)
  hold;
* or the categories given (a trained model's), in their order; a cell outside them is an error
  when it is read.

Each shard keeps a small :class:`BatchCoding`: per column its categories or distinct values, and
the combinations it holds with their collection codes. A row's code is then computed from the
column codes read for that row (mixed radix), never from a per-cell table held in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cellarium_steps.data.errors import InputError
from cellarium_steps.data.sources import Store, encoding_type, is_group, read_array, read_column, read_runs

logger = logging.getLogger(__name__)

BATCH_SEPARATOR = "|"


def parse_columns(columns: str | Sequence[str] | None, option: str) -> tuple[str, ...]:
    """``None`` -> (); ``"a,b"``, ``["a", "b"]`` or ``["a,b"]`` -> ("a", "b"); ``option`` names the
    option in errors."""
    if columns is None or columns == "":
        return ()
    items = [columns] if isinstance(columns, str) else [str(c) for c in columns]
    keys = [k.strip() for item in items for k in item.split(",")]
    if any(not k for k in keys):
        raise InputError(f"{option}: empty column name in {columns!r}")
    if len(set(keys)) != len(keys):
        raise InputError(f"{option}: a column is named twice in {columns!r}")
    return tuple(keys)


def parse_batch_key(batch_key: str | Sequence[str] | None) -> tuple[str, ...]:
    """``None`` -> (); ``"a,b"`` or ``["a", "b"]`` -> ("a", "b")."""
    return parse_columns(batch_key, "--batch-key")


@dataclass(frozen=True)
class BatchCoding:
    """How one shard's rows map to the collection's batch codes."""

    keys: tuple[str, ...]
    #: per column: its categories (categorical, file order) or the shard's distinct values (sorted), as str
    values_k: tuple[np.ndarray, ...]
    categorical_k: tuple[bool, ...]
    #: the combinations the shard holds, as sorted mixed-radix numbers of the column codes
    combo_c: np.ndarray
    #: each combination's label ("a|b|c")
    label_c: np.ndarray
    #: each combination's code in the collection (-1: not among fixed categories)
    index_c: np.ndarray | None = None

    def with_index(self, position: dict[str, int]) -> BatchCoding:
        index_c = np.array([position.get(str(label), -1) for label in self.label_c], dtype=np.int64)
        return BatchCoding(self.keys, self.values_k, self.categorical_k, self.combo_c, self.label_c, index_c)

    def batch_index(self, obs: object, runs: list[tuple[int, int]]) -> tuple[np.ndarray, str | None]:
        """Codes of the rows in ``runs`` (-1: outside the collection's batches), and a column whose
        value is missing in some row (those rows' codes are -2)."""
        number_n = np.zeros(sum(b - a for a, b in runs), dtype=np.int64)
        missing_n = np.zeros(len(number_n), dtype=bool)
        missing_key = None
        stride = 1
        for key, values, categorical in zip(self.keys, self.values_k, self.categorical_k):
            elem = obs[key]
            if categorical:
                code_n = read_runs(elem["codes"], runs).astype(np.int64)
            else:
                value_n, present_n = _plain_values(elem, runs)
                code_n = np.searchsorted(values, value_n)
                found = present_n & (code_n < len(values))
                found[found] = values[code_n[found]] == value_n[found]
                code_n = np.where(found, code_n, -1)
            if (code_n < 0).any():
                missing_n |= code_n < 0
                missing_key = missing_key or key
            number_n += np.maximum(code_n, 0) * stride
            stride *= max(len(values), 1)
        position = np.minimum(np.searchsorted(self.combo_c, number_n), len(self.combo_c) - 1)
        index_n = np.where(self.combo_c[position] == number_n, self.index_c[position], -1)
        return np.where(missing_n, -2, index_n), missing_key


def survey_batches(store: Store, keys: tuple[str, ...], kept_rows: np.ndarray | None, *, used_only: bool = False,
                   option: str = "--batch-key") -> BatchCoding:
    """A shard's batch columns: for one categorical column its categories only (unless ``used_only``);
    otherwise every kept row's values, to find the combinations the shard holds (a missing value is an
    ``InputError`` naming ``option``)."""
    obs = store["obs"]
    if len(keys) == 1 and not used_only and encoding_type(obs[keys[0]]) == "categorical":
        categories = read_array(obs[keys[0]]["categories"]).astype(str).astype(object)
        combo_c = np.arange(len(categories), dtype=np.int64)
        return BatchCoding(keys, (categories,), (True,), combo_c, categories)
    values_k, categorical_k, codes = [], [], []
    for key in keys:
        column = read_column(obs, key)
        if kept_rows is not None:
            column = column[kept_rows]
        missing = np.asarray(pd.isna(column))
        if missing.any():
            row = int(np.flatnonzero(missing)[0])
            row = int(kept_rows[row]) if kept_rows is not None else row
            raise InputError(f"{store.path}: obs[{key!r}] is missing for cell row {row} ({option})")
        if isinstance(column, pd.Categorical):
            values_k.append(np.asarray(column.categories).astype(str).astype(object))
            codes.append(np.asarray(column.codes, dtype=np.int64))
        else:
            values, code = np.unique(np.asarray(column).astype(str), return_inverse=True)
            values_k.append(values.astype(object))
            codes.append(code.astype(np.int64))
        categorical_k.append(isinstance(column, pd.Categorical))
    number = np.zeros(len(codes[0]), dtype=np.int64)
    stride = 1
    for values, code in zip(values_k, codes):
        number += code * stride
        stride *= max(len(values), 1)
        if stride >= 2**62:
            raise InputError(f"{store.path}: too many combinations of {', '.join(keys)} ({option})")
    combo_c, first_c = np.unique(number, return_index=True)
    label_c = np.array(
        [BATCH_SEPARATOR.join(str(values_k[k][codes[k][i]]) for k in range(len(keys))) for i in first_c],
        dtype=object,
    )
    return BatchCoding(tuple(keys), tuple(values_k), tuple(categorical_k), combo_c, label_c)


def assign_batches(
    paths: Sequence[str], codings: Sequence[BatchCoding], keys: tuple[str, ...],
    batch_categories: Sequence[str] | None,
) -> tuple[np.ndarray, list[BatchCoding]]:
    """The collection's categories (see the module docstring) and each shard's coding with its codes."""
    single_categorical = [len(keys) == 1 and c.categorical_k == (True,) for c in codings]
    if len(keys) == 1 and any(single_categorical) and not all(single_categorical):
        raise InputError(f"obs[{keys[0]!r}] is categorical in some shards and plain text in others")
    if batch_categories is not None:
        categories = [str(c) for c in batch_categories]
    elif len(keys) == 1 and all(single_categorical):
        categories = []
        for path, coding in zip(paths, codings):
            known = set(categories)
            new = [str(c) for c in coding.label_c if str(c) not in known]
            if categories and new:
                logger.info("%s: obs[%r] adds categories %s not in earlier shards; codes follow the union",
                            path, keys[0], new[:5])
            categories.extend(new)
    else:
        categories = sorted(set().union(*(map(str, c.label_c) for c in codings)))
    position = {c: i for i, c in enumerate(categories)}
    return np.array(categories, dtype=object), [c.with_index(position) for c in codings]


def _plain_values(elem: object, runs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """A plain column's values for the rows as str, and which rows have a value (nullable columns)."""
    if is_group(elem):  # nullable-integer / nullable-boolean: values and a mask
        values = read_runs(elem["values"], runs).astype(str).astype(object)
        present = ~read_runs(elem["mask"], runs).astype(bool) if "mask" in elem else np.ones(len(values), bool)
        return values, present
    values = read_runs(elem, runs)
    present = ~np.asarray(pd.isna(values))
    return values.astype(str).astype(object), present
