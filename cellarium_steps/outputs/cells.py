"""One streaming pass that joins the per-cell outputs of every model into one Hive-partitioned dataset.

Inputs are the shards (for each cell's name, shard and batch) and the Parquet datasets that
``pca --embeddings`` and ``predict`` wrote (``cell_id`` plus the model's columns). Those steps do
not shuffle: rank r takes a contiguous share of the cells in shard order and writes
``part-<r>.parquet``, one row group per batch, in order. So reading each dataset's parts in name
order gives the cells in exactly the order of the shards' obs, and the join is a zip:

    shards' obs (in chunks of ``chunk_size`` rows) --+
    pca/cells.parquet    (iter_batches, re-chunked) -+--> check cell_id per chunk --> buffer per
    scvi/cells.parquet   (iter_batches, re-chunked) -+    (dataset, batch) --> a row group once
    socam/cells.parquet  (iter_batches, re-chunked) -+    ``row_group_size`` rows are buffered
                                                          +-> (``anndata``) obsm/obs row ranges of
                                                              the chunk's shard's .h5ad

The same pass can add chosen obs columns of the shards (``obs_columns``, one shard's columns read
at a time, :mod:`.obs_columns`), a 2-D layout column (``layout``: fitted beforehand on a reservoir
sample read from the latent column alone, :mod:`.layout`, then applied chunk by chunk) and write
one ``.h5ad`` per shard (``anndata``, :mod:`.shard_anndata`).

A chunk whose ``cell_id`` differs from the shards' obs names is an :class:`InputError` naming the
input, the row and both names; an input with fewer or more rows than the shards is one too.

Memory: one chunk of every input, plus the rows buffered per partition, each flushed as a row
group when it reaches ``row_group_size`` rows; ``max_buffered_rows`` bounds the sum (the largest
buffer is flushed early, as a smaller row group, when it is exceeded). Nothing grows with the
number of cells.

Output layout (Hive partitioning, values percent-encoded where a path needs it)::

    OUTPUT/dataset=<dataset>/batch=<batch>/part-00000.parquet

The partition columns live in the directory names, not in the files (the Hive convention, which
pyarrow, pandas, polars, DuckDB and Spark read back as columns). Cells without a batch (no batch
key, or a missing value) go to ``batch=__HIVE_DEFAULT_PARTITION__``, read back as null. Every file
has the same schema and carries the run's provenance in its schema metadata. The dataset (and each
``.h5ad``) is written under a temporary sibling name and renamed when the whole pass is complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cellarium_steps.atomic import atomic_path, remove_stale_temporaries
from cellarium_steps.data.batches import BATCH_SEPARATOR
from cellarium_steps.data.errors import InputError
from cellarium_steps.data.options import DataOptions
from cellarium_steps.data.reader import ShardReader
from cellarium_steps.data.shards import Shard, ShardCollection, open_shards
from cellarium_steps.outputs.layout import (
    LAYOUT_COLUMNS,
    LayoutOptions,
    PCALayout,
    UMAPLayout,
    fit_layout,
    resolve_method,
    sample_vectors,
    vector_matrix,
)
from cellarium_steps.outputs.obs_columns import obs_column_types, read_obs_columns
from cellarium_steps.outputs.shard_anndata import ShardAnnDataWriter, shard_stem
from cellarium_steps.outputs.tables import PROVENANCE_KEY, write_table_parquet

logger = logging.getLogger("cellarium_steps")

#: Hive's (and pyarrow's, DuckDB's) name for a null partition value.
NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"
ID_COLUMN = "cell_id"
#: Columns the export itself writes; an input may not bring its own.
OWN_COLUMNS = (ID_COLUMN, "shard")
PARTITION_COLUMNS = ("dataset", "batch")
#: an --obs-columns column whose name the export already writes gets this prefix
OBS_PREFIX = "obs_"


# -- reading ------------------------------------------------------------------------------------------------


def part_files(path: str) -> list[str]:
    """A per-cell dataset's part files in name order (= rank order = cell order); a file is its own part."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise InputError(f"--cells: {path}: no such file or directory")
    parts = sorted(
        os.path.join(path, name) for name in os.listdir(path)
        if name.endswith(".parquet") and not name.startswith((".", "_"))
    )
    if not parts:
        raise InputError(f"--cells: {path}: no .parquet part files")
    return parts


class RowStream:
    """The rows of one per-cell dataset, handed out in exact counts whatever its row groups are."""

    def __init__(self, path: str, batch_size: int) -> None:
        self.path = path
        self.parts = part_files(path)
        schemas = [pq.read_schema(p) for p in self.parts]
        self.schema = schemas[0]
        if ID_COLUMN not in self.schema.names:
            raise InputError(f"--cells: {path}: no {ID_COLUMN!r} column (columns: {self.schema.names})")
        for part, schema in zip(self.parts, schemas):
            if not schema.equals(self.schema, check_metadata=False):
                raise InputError(f"--cells: {part}: schema differs from {self.parts[0]}'s")
        self.n_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in self.parts)
        self._batches = self._iter(batch_size)
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self.rows_taken = 0

    @property
    def columns(self) -> list[str]:
        """The columns this input adds (all but cell_id)."""
        return [n for n in self.schema.names if n != ID_COLUMN]

    def provenance(self) -> Any:
        raw = (self.schema.metadata or {}).get(PROVENANCE_KEY)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")

    def _iter(self, batch_size: int) -> Iterator[pa.RecordBatch]:
        for part in self.parts:
            # pre_buffer (pyarrow's default) caches the file's column chunks as they are read ahead, so
            # memory would grow with the part file's size; without it one row group is read at a time.
            with pq.ParquetFile(part, pre_buffer=False) as f:
                yield from f.iter_batches(batch_size=batch_size, use_threads=False)

    def take(self, n: int) -> pa.Table:
        """The next ``n`` rows (fewer only at the end of the input)."""
        while self._pending_rows < n:
            batch = next(self._batches, None)
            if batch is None:
                break
            if batch.num_rows:
                self._pending.append(batch)
                self._pending_rows += batch.num_rows
        table = pa.Table.from_batches(self._pending, schema=self._pending[0].schema) if self._pending else (
            self.schema.empty_table()
        )
        head, rest = table.slice(0, n), table.slice(n)
        self._pending = rest.to_batches() if rest.num_rows else []
        self._pending_rows = rest.num_rows
        self.rows_taken += head.num_rows
        return head

    def exhausted(self) -> bool:
        return self._pending_rows == 0 and self.take(1).num_rows == 0


@dataclass
class ObsChunk:
    shard: str  # the shard's file stem
    path: str
    start: int  # the chunk's first cell among the shard's kept cells (all of them without obs_filter)
    cell_id: np.ndarray
    batch: np.ndarray | None  # object array of str/None, or None without a batch key
    rows: np.ndarray  # the chunk's cells' rows in the file (sorted; start:stop without obs_filter)


def iter_obs(collection: ShardCollection, chunk_size: int) -> Iterator[ObsChunk]:
    """The kept cells' names and batch values, shard by shard, in chunks of at most ``chunk_size`` cells.

    Read by the data layer's reader, so ``.zarr`` stores and ``obs_filter`` give exactly the cells the
    other steps read, in their order.
    """
    reader = ShardReader(collection, require_counts=False)
    try:
        for shard in collection.shards:
            stem = shard_stem(shard.path)
            kept_rows = shard.kept_rows()
            for start in range(0, shard.n_obs, chunk_size):
                positions = np.arange(start, min(start + chunk_size, shard.n_obs))
                names = reader.read_obs_names(shard, positions)
                batch = _batch_labels(reader, shard, collection.batch_keys, positions) if collection.batch_key else None
                yield ObsChunk(stem, shard.path, start, names, batch, kept_rows[positions])
    finally:
        reader.close()


def _batch_labels(reader: ShardReader, shard: Shard, keys: Sequence[str], positions: np.ndarray) -> np.ndarray:
    """Each cell's batch: its value of the batch column, or its values of the batch columns joined as the
    data layer names combinations (``a|b``); None where a value is missing."""
    values_kn = [reader.read_obs_column(shard, key, positions) for key in keys]
    labels = []
    for values in zip(*values_kn):
        labels.append(None if any(_missing(v) for v in values) else BATCH_SEPARATOR.join(str(v) for v in values))
    return np.array(labels, dtype=object)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


# -- writing ------------------------------------------------------------------------------------------------


def partition_dir(key: str, value: str | None) -> str:
    """``key=value`` with the value percent-encoded as pyarrow and DuckDB decode it ('/' -> '%2F')."""
    if value is None or value == "":
        return f"{key}={NULL_PARTITION}"
    return f"{key}={quote(value, safe=' :+,;@-')}"


@dataclass
class _Partition:
    directory: str
    writer: pq.ParquetWriter | None = None
    tables: list[pa.Table] = field(default_factory=list)
    rows: int = 0
    rows_written: int = 0
    row_groups: int = 0


class PartitionedWriter:
    """Buffer rows per partition and write a row group whenever a buffer reaches ``row_group_size``."""

    def __init__(self, root: str, schema: pa.Schema, *, row_group_size: int, max_buffered_rows: int,
                 compression: str = "zstd") -> None:
        self.root = root
        self.schema = schema
        self.row_group_size = row_group_size
        self.max_buffered_rows = max(max_buffered_rows, row_group_size)
        self.compression = compression
        self.partitions: dict[tuple[str, ...], _Partition] = {}
        self.buffered = 0

    def write(self, key: tuple[str | None, ...], table: pa.Table) -> None:
        part = self.partitions.get(key)
        if part is None:
            directory = os.path.join(self.root, *(partition_dir(k, v) for k, v in zip(PARTITION_COLUMNS, key)))
            part = self.partitions[key] = _Partition(directory)
        part.tables.append(table)
        part.rows += table.num_rows
        self.buffered += table.num_rows
        while part.rows >= self.row_group_size:
            self._flush(part, self.row_group_size)
        while self.buffered > self.max_buffered_rows:
            self._flush(max(self.partitions.values(), key=lambda p: p.rows))

    def _flush(self, part: _Partition, n: int | None = None) -> None:
        if part.rows == 0:
            return
        table = pa.concat_tables(part.tables)
        n = table.num_rows if n is None else n
        head, rest = table.slice(0, n), table.slice(n)
        if part.writer is None:
            os.makedirs(part.directory, exist_ok=True)
            part.writer = pq.ParquetWriter(
                os.path.join(part.directory, "part-00000.parquet"), self.schema, compression=self.compression,
            )
        part.writer.write_table(head.combine_chunks(), row_group_size=head.num_rows)
        part.rows_written += head.num_rows
        part.row_groups += 1
        part.tables = [rest] if rest.num_rows else []
        part.rows = rest.num_rows
        self.buffered -= head.num_rows

    def close(self) -> None:
        for part in self.partitions.values():
            self._flush(part)
            if part.writer is not None:
                part.writer.close()
                part.writer = None

    def abort(self) -> None:
        for part in self.partitions.values():
            if part.writer is not None:
                part.writer.close()
                part.writer = None


# -- the pass -----------------------------------------------------------------------------------------------


@dataclass
class ExportSummary:
    n_cells: int
    partitions: dict[tuple[str, ...], int]  # (dataset, batch) -> rows
    row_groups: int
    columns: list[str]
    anndata: list[str] = field(default_factory=list)  # the .h5ad files written


def export_cells(
    shards: Sequence[str],
    cells: Sequence[str],
    output: str | None,
    *,
    dataset: str,
    batch_key: str | None = None,
    row_group_size: int = 100_000,
    max_buffered_rows: int = 1_000_000,
    chunk_size: int = 65_536,
    provenance: dict[str, Any] | None = None,
    compression: str = "zstd",
    obs_columns: Sequence[str] = (),
    anndata: str | None = None,
    layout: LayoutOptions | None = None,
    data_options: DataOptions | None = None,
) -> ExportSummary:
    """Join the per-cell ``cells`` datasets with the shards' obs into ``output`` and/or one ``.h5ad`` per
    shard in ``anndata``, in one pass; see the module docstring. ``data_options`` are the other steps'
    (the same cells: ``obs_filter``; the same shards and genes: ``counts``, ``var_names``, ``gene_join``)."""
    if not output and not anndata:
        raise InputError("nothing to write: give --output, --anndata or both")
    if row_group_size < 1 or chunk_size < 1:
        raise InputError("--row-group-size and --batch-size must be at least 1")
    if not dataset or "/" in dataset:
        raise InputError(f"--dataset: expected a non-empty name without '/', got {dataset!r}")
    # No count is read, so none is required (a CELLxGENE file's X is normalized; `auto` then takes it).
    collection = open_shards(shards, batch_key=batch_key, require_counts=False,
                             **(data_options or DataOptions()).open_kwargs())
    streams = [RowStream(path, chunk_size) for path in cells]
    seen: dict[str, str] = {c: "the export" for c in (*OWN_COLUMNS, *PARTITION_COLUMNS)}
    for stream in streams:
        if stream.n_rows != collection.n_obs:
            raise InputError(
                f"--cells: {stream.path}: {stream.n_rows} rows, but the shards have {collection.n_obs} cells; "
                "it must be the per-cell output of the same shards (rerun its step)"
            )
        for column in stream.columns:
            if column in seen:
                raise InputError(f"--cells: {stream.path}: column {column!r} is also written by {seen[column]}")
            seen[column] = stream.path
    # Before the pass: every shard has the obs columns (a missing one names the shard), and their types agree.
    obs_types = obs_column_types([s.path for s in collection.shards], obs_columns)
    obs_names = {c: OBS_PREFIX + c if c in seen else c for c in obs_types}
    fitted = _fit_layout(streams, layout) if layout else None

    fields = [pa.field(ID_COLUMN, pa.string()), pa.field("shard", pa.string())]
    fields += [pa.field(obs_names[c], kind) for c, kind in obs_types.items()]
    for stream in streams:
        fields += [stream.schema.field(c) for c in stream.columns]
    if fitted:
        fields.append(pa.field(fitted.output_column, pa.list_(pa.float32(), 2)))
    run_metadata = {
        "export": provenance or {},
        "dataset": dataset,
        "batch_key": batch_key,
        "partitioning": list(PARTITION_COLUMNS),
        "inputs": {stream.path: stream.provenance() for stream in streams},
        "obs_columns": obs_names,
        "layout": fitted.metadata() if fitted else None,
    }
    schema = pa.schema(fields, metadata={PROVENANCE_KEY: json.dumps(run_metadata, default=str, sort_keys=True).encode()})

    stack = contextlib.ExitStack()
    h5ad = ShardAnnDataWriter(anndata, collection.shards, schema, stack, run_metadata) if anndata else None
    remove_stale_temporaries([*([output] if output else []), *(h5ad.outputs if h5ad else [])])
    # Every output is written under a temporary name; the stack renames them all (the .h5ad files, then
    # the Parquet dataset) only when the pass has succeeded, and removes them otherwise.
    with stack:
        writer = None
        if output:
            tmp = stack.enter_context(atomic_path(output))
            writer = PartitionedWriter(tmp, schema, row_group_size=row_group_size,
                                       max_buffered_rows=max_buffered_rows, compression=compression)
            stack.callback(writer.abort)
        n_cells = 0
        for chunk, table in _joined_chunks(collection, streams, schema, chunk_size, obs_types, obs_names, fitted):
            if writer:
                _write_by_batch(writer, table, dataset, chunk.batch)
            if h5ad:
                h5ad.write(chunk.path, chunk.start, chunk.rows, table)
            n_cells += table.num_rows
        if h5ad:
            h5ad.close()
        if writer:
            writer.close()
            if os.path.isdir(output):
                shutil.rmtree(output)
            elif os.path.exists(output):
                os.remove(output)
    partitions = {key: p.rows_written for key, p in writer.partitions.items()} if writer else {}
    row_groups = sum(p.row_groups for p in writer.partitions.values()) if writer else 0
    return ExportSummary(n_cells, partitions, row_groups, schema.names, h5ad.outputs if h5ad else [])


@dataclass
class _FittedLayout:
    options: LayoutOptions
    model: PCALayout | UMAPLayout
    n_sampled: int

    @property
    def output_column(self) -> str:
        return LAYOUT_COLUMNS[self.model.name]

    def metadata(self) -> dict[str, Any]:
        return {**asdict(self.options), "output_column": self.output_column, "n_sampled": self.n_sampled}


def _fit_layout(streams: Sequence[RowStream], options: LayoutOptions) -> _FittedLayout:
    """The 2-D layout, fitted on a reservoir sample read from the latent column alone (a first, cheap pass)."""
    method = resolve_method(options.method)
    holders = [s for s in streams if options.column in s.columns]
    if not holders:
        raise InputError(f"--layout-column: no --cells input has a column {options.column!r}")
    kind = holders[0].schema.field(options.column).type
    if not (pa.types.is_fixed_size_list(kind) and pa.types.is_floating(kind.value_type)):
        raise InputError(f"--layout-column: {holders[0].path}: {options.column!r} is {kind}, not a vector per cell")
    sample = sample_vectors(holders[0].parts, options.column, options.sample_size, options.seed)
    logger.info("fitting the %s layout of %s on %d sampled cells", method, options.column, len(sample))
    return _FittedLayout(options, fit_layout(sample, method, options.seed), len(sample))


def _joined_chunks(
    collection: ShardCollection, streams: Sequence[RowStream], schema: pa.Schema, chunk_size: int,
    obs_types: dict[str, pa.DataType], obs_names: dict[str, str], layout: _FittedLayout | None,
) -> Iterator[tuple[ObsChunk, pa.Table]]:
    """The zip: each chunk of the shards' obs with the same rows of every input, cell_id checked."""
    shard_obs: pa.Table | None = None
    n_cells = 0
    for chunk in iter_obs(collection, chunk_size):
        n = len(chunk.cell_id)
        columns: dict[str, pa.Array] = {ID_COLUMN: pa.array(chunk.cell_id, pa.string()),
                                        "shard": pa.array(np.full(n, chunk.shard, dtype=object), pa.string())}
        if obs_types:
            if chunk.start == 0:
                shard = next(s for s in collection.shards if s.path == chunk.path)
                shard_obs = read_obs_columns(chunk.path, obs_types, None if shard.kept_bits is None else shard.kept_rows())
            assert shard_obs is not None
            rows = shard_obs.slice(chunk.start, n)
            columns.update((obs_names[c], rows.column(c).combine_chunks()) for c in obs_types)
        for stream in streams:
            part = stream.take(n)
            _check_ids(stream, part, chunk, n_cells)
            columns.update((c, part.column(c).combine_chunks()) for c in stream.columns)
        if layout:
            xy = layout.model.transform(vector_matrix(columns[layout.options.column]))
            columns[layout.output_column] = pa.FixedSizeListArray.from_arrays(pa.array(xy.ravel()), 2)
        yield chunk, pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)
        n_cells += n


def _check_ids(stream: RowStream, part: pa.Table, chunk: ObsChunk, row: int) -> None:
    expected = chunk.cell_id
    if part.num_rows < len(expected):
        raise InputError(f"--cells: {stream.path}: ends after {stream.rows_taken} rows, before {chunk.path}'s cells")
    got = np.asarray(part.column(ID_COLUMN).to_numpy(zero_copy_only=False), dtype=object)
    differ = np.flatnonzero(got != expected)
    if differ.size:
        i = int(differ[0])
        raise InputError(
            f"--cells: {stream.path}: row {row + i} has cell_id {got[i]!r}, but the shards' cell there is "
            f"{expected[i]!r} ({chunk.path}, obs row {chunk.rows[i]}); the per-cell outputs must come from the "
            "same shards, cells (--obs-filter) and order (rerun the step that wrote it)"
        )


def _write_by_batch(writer: PartitionedWriter, table: pa.Table, dataset: str, batch: np.ndarray | None) -> None:
    if batch is None:
        writer.write((dataset, None), table)
        return
    # pandas.factorize keeps first-appearance order and maps None to -1.
    codes, uniques = pd.factorize(batch, use_na_sentinel=True)
    if len(uniques) == 1 and codes.min() >= 0:
        writer.write((dataset, str(uniques[0])), table)
        return
    for code in np.unique(codes):
        rows = np.flatnonzero(codes == code)
        writer.write((dataset, None if code < 0 else str(uniques[code])), table.take(pa.array(rows)))
    return True


# -- per-gene table -----------------------------------------------------------------------------------------


def export_genes(mean_var: str | None, hvg: str | None, output: str, provenance: dict[str, Any]) -> pd.DataFrame:
    """``gene`` plus mean-var's ``mean, var, std`` and hvg's columns, joined by gene (mean-var's order)."""
    tables = []
    for flag, path in (("--mean-var", mean_var), ("--hvg", hvg)):
        if not path:
            continue
        if not os.path.isfile(path):
            raise InputError(f"{flag}: {path}: no such file")
        table = pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path)
        if "gene" not in table.columns:
            raise InputError(f"{flag}: {path}: no 'gene' column (columns: {list(table.columns)})")
        table["gene"] = table["gene"].astype(str)
        if table["gene"].duplicated().any():
            raise InputError(f"{flag}: {path}: genes are listed more than once")
        tables.append((flag, path, table))
    if not tables:
        raise InputError("--genes-output needs --mean-var, --hvg or both")
    genes = tables[0][2]
    for flag, path, table in tables[1:]:
        overlap = [c for c in table.columns if c != "gene" and c in genes.columns]
        if overlap:
            raise InputError(f"{flag}: {path}: columns {overlap} are also in {tables[0][1]}")
        genes = genes.merge(table, on="gene", how="outer", sort=False)
    if "highly_variable" in genes.columns:
        genes["highly_variable"] = genes["highly_variable"].astype("boolean").fillna(False).astype(bool)
    write_table_parquet(genes, output, provenance)
    return genes
