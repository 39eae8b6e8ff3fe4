"""Which cells of a shard a run takes: a pandas ``DataFrame.query`` expression over obs columns.

Besides the obs columns the expression may name ``n_genes``: a cell's stored entries in the counts
matrix, from its row pointers (it takes precedence over an obs column of that name). Only the
columns the expression names are read, once per shard when the shards are opened.
"""

from __future__ import annotations

import ast
import re

import numpy as np
import pandas as pd

from cellarium_steps.data.errors import InputError
from cellarium_steps.data.sources import MatrixInfo, Store, read_column

N_GENES = "n_genes"
_BACKTICKED = re.compile(r"`([^`]*)`")


def filter_columns(expression: str) -> list[str]:
    """The column names an expression reads (backticked names included), or an ``InputError``."""
    if not expression.strip():
        raise InputError("--obs-filter: the expression is empty")
    quoted: dict[str, str] = {}

    def placeholder(match: re.Match) -> str:
        name = f"__column_{len(quoted)}__"
        quoted[name] = match.group(1)
        return name

    try:
        tree = ast.parse(_BACKTICKED.sub(placeholder, expression).strip(), mode="eval")
    except SyntaxError as e:
        raise InputError(f"--obs-filter: cannot parse {expression!r} ({e.msg})") from None
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and id(node) not in called:
            name = quoted.get(node.id, node.id)
            if name not in names:
                names.append(name)
    return names


def evaluate_filter(expression: str, store: Store, counts: MatrixInfo) -> np.ndarray:
    """Which rows of the shard the expression keeps (bool); ``InputError`` naming the file and column."""
    obs = store["obs"]
    frame = {}
    for name in filter_columns(expression):
        if name == N_GENES:
            frame[name] = store.stored_per_row(counts)
        elif name in obs and name != obs.attrs.get("_index", "_index"):
            frame[name] = read_column(obs, name)
        else:
            raise InputError(f"{store.path}: obs has no column {name!r} (--obs-filter {expression!r})")
    n_rows = counts.n_rows
    df = pd.DataFrame(frame, index=pd.RangeIndex(n_rows)) if frame else pd.DataFrame(index=pd.RangeIndex(n_rows))
    try:
        kept = df.eval(expression, engine="python")
    except Exception as e:  # noqa: BLE001 (pandas raises many types for a bad expression; all are bad input)
        raise InputError(f"{store.path}: --obs-filter {expression!r} failed: {type(e).__name__}: {e}") from None
    kept = pd.Series(kept) if not isinstance(kept, pd.Series) else kept
    if kept.dtype != bool and str(kept.dtype) != "boolean":
        raise InputError(f"{store.path}: --obs-filter {expression!r} is not a condition (it gives {kept.dtype} values)")
    if len(kept) != n_rows:  # a constant condition such as "True"
        kept = pd.Series(np.broadcast_to(np.asarray(kept)[0] if len(kept) else False, n_rows))
    return kept.fillna(False).to_numpy(dtype=bool)
