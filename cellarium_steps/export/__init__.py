"""Writers for step outputs: Parquet tables with provenance in their metadata."""

from cellarium_steps.export.tables import write_json_atomically, write_table_parquet

__all__ = ["write_json_atomically", "write_table_parquet"]
