"""Per-gene and per-batch tables: Parquet (zstd) with the run's provenance in the file metadata."""

from __future__ import annotations

import json
import os
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cellarium_steps.atomic import atomic_path

PROVENANCE_KEY = b"cellarium_steps"


def write_table_parquet(df: pd.DataFrame, path: str | os.PathLike, provenance: dict[str, Any] | str) -> None:
    """Write a small table as one Parquet file; ``provenance`` lands in the schema metadata."""
    text = provenance if isinstance(provenance, str) else json.dumps(provenance, default=str, sort_keys=True)
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), PROVENANCE_KEY: text.encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_provenance(path: str | os.PathLike) -> dict[str, Any]:
    metadata = pq.read_schema(path).metadata or {}
    return json.loads(metadata[PROVENANCE_KEY])
