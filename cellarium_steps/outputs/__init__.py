"""Readers and writers of every step's files: tables with provenance, gene lists, statistics tables,
PCA state, per-cell Parquet parts, the joined export and the report's plots."""

from cellarium_steps.atomic import write_json_atomically
from cellarium_steps.outputs.tables import write_table_parquet

__all__ = ["write_json_atomically", "write_table_parquet"]
