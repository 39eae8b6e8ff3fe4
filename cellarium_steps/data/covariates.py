"""Covariates besides the batch (scVI's ``categorical_covariate_index_nd`` and ``continuous_covariates_nc``).

A categorical covariate is one obs column coded as a one-column batch key is (:mod:`.batches`): the
collection's categories, consistent across shards, or the categories a trained model records, in
its order. Unlike a batch key, its values are surveyed from the kept cells' codes even for a
categorical column (one integer column per shard, read when the shards are opened), so that a
value outside a model's categories is an ``InputError`` naming the file, the column and the value
before any pass. A continuous covariate is a numeric obs column read as float64; a missing, NaN or
infinite value is an ``InputError`` naming the file, the column and the row, also before any pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from cellarium_steps.data.batches import BatchCoding, assign_batches, survey_batches
from cellarium_steps.data.errors import InputError
from cellarium_steps.data.sources import Store, read_column

CATEGORICAL_OPTION = "--categorical-covariate-keys"
CONTINUOUS_OPTION = "--continuous-covariate-keys"


def survey_covariates(store: Store, categorical_keys: tuple[str, ...], continuous_keys: tuple[str, ...],
                      kept_rows: np.ndarray | None) -> tuple[BatchCoding, ...]:
    """One file's coding of each categorical covariate (the categories its kept cells use); its
    continuous covariates checked to be numbers for every kept cell."""
    obs = store["obs"]
    for keys, option in ((categorical_keys, CATEGORICAL_OPTION), (continuous_keys, CONTINUOUS_OPTION)):
        for key in keys:
            if key not in obs:
                raise InputError(f"{store.path}: obs has no column {key!r} ({option})")
    for key in continuous_keys:
        check_continuous(store, key, kept_rows)
    return tuple(survey_batches(store, (key,), kept_rows, used_only=True, option=CATEGORICAL_OPTION)
                 for key in categorical_keys)


def check_continuous(store: Store, key: str, kept_rows: np.ndarray | None) -> None:
    column = read_column(store["obs"], key)
    if isinstance(column, pd.Categorical) or not pd.api.types.is_numeric_dtype(pd.Series(column).dtype):
        kind = "categorical" if isinstance(column, pd.Categorical) else str(pd.Series(column).dtype)
        raise InputError(f"{store.path}: obs[{key!r}] is {kind}, not numbers ({CONTINUOUS_OPTION})")
    values = pd.Series(column).astype("float64").to_numpy()
    if kept_rows is not None:
        values = values[kept_rows]
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.argmax(bad))
        row = int(kept_rows[i]) if kept_rows is not None else i
        raise InputError(f"{store.path}: obs[{key!r}] is {values[i]} for cell row {row}; a continuous covariate "
                         f"needs a number for every cell ({CONTINUOUS_OPTION})")


def assign_covariates(
    paths: Sequence[str], codings: Sequence[tuple[BatchCoding, ...]], keys: tuple[str, ...],
    categories: Mapping[str, Sequence[str]] | None,
) -> tuple[tuple[np.ndarray, ...], list[tuple[BatchCoding, ...]]]:
    """Each covariate's categories and every shard's codings with their codes. With ``categories``
    (a trained model's), a value outside them is an ``InputError`` naming the file, column and value."""
    per_key: list[np.ndarray] = []
    assigned_k: list[list[BatchCoding]] = []
    for d, key in enumerate(keys):
        fixed = None
        if categories is not None:
            if key not in categories:
                raise InputError(f"{CATEGORICAL_OPTION}: the model has no categories for obs column {key!r}")
            fixed = [str(c) for c in categories[key]]
        key_categories, assigned = assign_batches(paths, [c[d] for c in codings], (key,), fixed)
        if fixed is not None:
            for path, coding in zip(paths, assigned):
                unknown = coding.label_c[coding.index_c < 0]
                if len(unknown):
                    raise InputError(
                        f"{path}: obs[{key!r}] has {str(unknown[0])!r}, which is not one of the {len(fixed)} "
                        f"categories the model was trained with (e.g. {fixed[:5]}) ({CATEGORICAL_OPTION})"
                    )
        per_key.append(key_categories)
        assigned_k.append(assigned)
    return tuple(per_key), [tuple(a[i] for a in assigned_k) for i in range(len(paths))]


def categorical_codes(codings: Sequence[BatchCoding], obs: object, runs: list[tuple[int, int]],
                      path: str) -> np.ndarray:
    """The rows' category codes, shape (rows, covariates), int64."""
    n = sum(b - a for a, b in runs)
    codes_nd = np.empty((n, len(codings)), dtype=np.int64)
    for d, coding in enumerate(codings):
        codes_n, _ = coding.batch_index(obs, runs)
        if n and codes_n.min() < 0:  # checked when the shards were opened; the file changed since
            raise InputError(f"{path}: obs[{coding.keys[0]!r}] changed since the shards were opened")
        codes_nd[:, d] = codes_n
    return codes_nd
