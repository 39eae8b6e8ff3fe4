"""Stream per-cell predictions (embeddings) to Parquet while Lightning's predict loop runs.

Use :class:`ParquetEmbeddingWriter` as a callback of the trainer that runs ``trainer.predict``
(with ``return_predictions=False``, so nothing accumulates in memory)::

    writer = ParquetEmbeddingWriter("out/cells.parquet", dim=50, embedding_column="pca")
    trainer = build_trainer(devices=2, callbacks=[writer])
    trainer.predict(module, datamodule=datamodule, return_predictions=False)

The output is a directory of Parquet part files, one per rank (``part-00000.parquet``, ...),
each with one row group per batch: ``cell_id`` (string) and the embedding as a fixed-size list of
float32, then any derived columns (``columns=``: see :mod:`cellarium_steps.outputs.prediction_columns`,
e.g. a classifier's call and top-k terms). :meth:`ParquetEmbeddingWriter.from_prediction_spec` builds
the writer from a checkpoint recipe's ``data.prediction``. pyarrow, pandas and polars read the directory as one table; DuckDB reads
``'<path>/*.parquet'``. The parts are written under a temporary sibling directory that rank 0
renames into place after every rank has closed its file, so a failed or killed run never leaves
a partial output at ``path``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from cellarium_steps.outputs.prediction_columns import ColumnBuilder, column_builder
from cellarium_steps.outputs.tables import PROVENANCE_KEY

# Lightning tracks batch indices for prediction writers through a sampler; our iterable
# dataset has none, and the writer identifies rows by cell name instead.
warnings.filterwarnings("ignore", message=re.escape("Couldn't infer the batch indices fetched from your dataloader"))


class ParquetEmbeddingWriter(BasePredictionWriter):
    """Write each predict batch's embedding and cell names as a row group of this rank's part file.

    Args:
        path: The output directory (replaced if it exists).
        dim: Width of the embedding; every batch must match it.
        embedding_key: Key of the (cells x dim) tensor in the prediction dict.
        embedding_column: Column name of the embedding in the output.
        id_key: Key of the cell names in the prediction dict (the runner copies the batch's
            ``obs_names_n`` into every prediction).
        id_column: Column name of the cell names.
        extra_keys: Further per-cell prediction keys to write, mapped to their column names
            (for instance ``{"batch_index_n": "batch_index"}``); types are taken from the data.
        provenance: Stored in each part file's schema metadata, as the step tables do.
        compression: Parquet compression codec.
        columns: Specs of further columns derived from the prediction (plain data, see
            :mod:`cellarium_steps.outputs.prediction_columns`), written after the embedding.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        dim: int,
        *,
        embedding_key: str = "x_ng",
        embedding_column: str = "embedding",
        id_key: str = "obs_names_n",
        id_column: str = "cell_id",
        extra_keys: Mapping[str, str] | None = None,
        provenance: dict[str, Any] | str | None = None,
        compression: str = "zstd",
        columns: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        super().__init__(write_interval="batch")
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.path = os.path.abspath(os.fspath(path))
        self.dim = dim
        self.embedding_key = embedding_key
        self.embedding_column = embedding_column
        self.id_key = id_key
        self.id_column = id_column
        self.extra_keys = dict(extra_keys or {})
        self.compression = compression
        self.columns: list[ColumnBuilder] = [column_builder(c) for c in columns]
        text = provenance if provenance is None or isinstance(provenance, str) else json.dumps(provenance, default=str)
        self._metadata = {PROVENANCE_KEY: text.encode()} if text is not None else None
        self._writer: pq.ParquetWriter | None = None
        self._rank = 0
        self.rows_written = 0

    @classmethod
    def from_prediction_spec(cls, path: str | os.PathLike, prediction: Mapping[str, Any], **kwargs: Any) -> ParquetEmbeddingWriter:
        """The writer a recipe's ``data.prediction`` describes: ``key``, ``column`` and ``dim`` of the
        per-cell matrix, and optionally ``columns``, the specs of derived columns."""
        return cls(path, dim=int(prediction["dim"]), embedding_key=str(prediction["key"]),
                   embedding_column=str(prediction["column"]), columns=prediction.get("columns") or (), **kwargs)

    @property
    def tmp_dir(self) -> str:
        """The same on every rank (no pid in it), so all ranks write into one directory."""
        return os.path.join(os.path.dirname(self.path), f".{os.path.basename(self.path)}.parts-tmp")

    def part_path(self, rank: int) -> str:
        return os.path.join(self.tmp_dir, f"part-{rank:05d}.parquet")

    @property
    def base_schema(self) -> pa.Schema:
        return pa.schema(
            [
                pa.field(self.id_column, pa.string()),
                pa.field(self.embedding_column, pa.list_(pa.float32(), self.dim)),
                *(f for builder in self.columns for f in builder.fields()),
            ],
            metadata=self._metadata,
        )

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rank = trainer.global_rank
        self.rows_written = 0
        if trainer.is_global_zero:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            os.makedirs(self.tmp_dir)
        trainer.strategy.barrier("embedding_writer_start")

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        table = self.to_table(prediction)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.part_path(self._rank), table.schema, compression=self.compression)
        self._writer.write_table(table)
        self.rows_written += table.num_rows

    def to_table(self, prediction: Mapping[str, Any]) -> pa.Table:
        """One batch's rows; the embedding is converted to float32 here, once."""
        z_nk = _to_numpy(prediction[self.embedding_key]).astype(np.float32, copy=False)
        if z_nk.ndim != 2 or z_nk.shape[1] != self.dim:
            raise ValueError(f"{self.embedding_key} has shape {z_nk.shape}, expected (n, {self.dim})")
        names_n = np.asarray(prediction[self.id_key]).astype(str)
        if len(names_n) != z_nk.shape[0]:
            raise ValueError(f"{self.id_key} has {len(names_n)} entries for {z_nk.shape[0]} rows")
        columns = [
            pa.array(names_n, type=pa.string()),
            pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(z_nk).reshape(-1)), self.dim),
        ]
        names = [self.id_column, self.embedding_column]
        for builder in self.columns:
            columns.extend(builder.build(prediction))
            names.extend(f.name for f in builder.fields())
        for key, column in self.extra_keys.items():
            columns.append(pa.array(_to_numpy(prediction[key])))
            names.append(column)
        fields = [pa.field(name, array.type) for name, array in zip(names, columns)]
        return pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=self._metadata))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        trainer.strategy.barrier("embedding_writer_closed")
        if trainer.is_global_zero:
            if not any(name.endswith(".parquet") for name in os.listdir(self.tmp_dir)):
                # No cells at all: still leave a readable, empty table with the schema.
                pq.write_table(self.base_schema.empty_table(), self.part_path(0), compression=self.compression)
            if os.path.isdir(self.path):
                shutil.rmtree(self.path)
            elif os.path.exists(self.path):
                os.remove(self.path)
            os.replace(self.tmp_dir, self.path)
        # No rank returns (and perhaps reads the output) before it is in place.
        trainer.strategy.barrier("embedding_writer_renamed")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()
        if trainer.is_global_zero:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
