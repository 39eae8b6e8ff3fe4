"""Stream batches of cells from validated shards, split across DDP ranks and loader workers."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import IterableDataset, get_worker_info

from cellarium_steps.data.errors import InputError
from cellarium_steps.data.plan import BatchPiece, EpochPlan
from cellarium_steps.data.reader import ShardReader, column_positions, remap_columns
from cellarium_steps.data.shards import Shard, ShardCollection

# torch flags its sparse CSR layout as beta on every construction; we rely on its stable subset.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
# Batches cross from loader workers as CSR tensors that torch rebuilds without re-checking them; they
# were built from scipy's valid CSR arrays.
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled", category=UserWarning)

BatchDict = dict[str, Any]


def csr_to_torch(x: sp.csr_matrix, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A torch sparse CSR tensor; int32 indices while they fit, which halves their memory."""
    index_dtype = np.int32 if x.nnz < 2**31 and x.shape[1] < 2**31 else np.int64
    return torch.sparse_csr_tensor(
        torch.from_numpy(x.indptr.astype(index_dtype, copy=False)),
        torch.from_numpy(x.indices.astype(index_dtype, copy=False)),
        torch.from_numpy(x.data).to(dtype),
        size=x.shape,
        check_invariants=False,
    )


def torch_to_csr(x_ng: torch.Tensor) -> sp.csr_matrix:
    """A CPU sparse CSR tensor as a scipy CSR matrix on zero-copy views of its arrays."""
    return sp.csr_matrix(
        (x_ng.values().numpy(), x_ng.col_indices().numpy(), x_ng.crow_indices().numpy()), shape=tuple(x_ng.shape)
    )


class ShardedCellDataset(IterableDataset):
    """Yields batch dicts; each cell of the collection exactly once per epoch over all ranks and workers.

    Keys: ``x_ng`` (sparse CSR counts in the collection's gene order; each row's entries in the order
    the file stores them, which need not be sorted), ``var_names_g``, ``obs_names_n``, ``batch_index_n``,
    ``total_mrna_umis_n`` (unless ``with_totals=False``: a pass over every count that a consumer
    which does not read it need not pay; it sums every gene of the cell's file), and ``<column>_n``
    for each requested obs column. ``obs_names_n`` is left out with ``with_obs_names=False``, for
    training that never names a cell (decoding the names costs about a tenth of reading a cell).

    When some shard lacks some of the collection's genes (``gene_join="outer"``), those genes read
    as zeros and two more keys say which values were measured: ``gene_measured_sg`` (bool, one row
    per shard the batch's cells come from, in order of appearance; columns as ``var_names_g``) and
    ``shard_index_n`` (int64, each cell's row of ``gene_measured_sg``). Cell n measured gene g iff
    ``gene_measured_sg[shard_index_n[n], g]``. Statistics models take both as optional arguments.

    A collection with covariates adds ``categorical_covariate_index_nd`` (int64, one column per
    categorical covariate: the code of the cell's category) and ``continuous_covariates_nc``
    (float64, one column per continuous covariate), scVI's names.
    """

    def __init__(
        self,
        collection: ShardCollection,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        require_counts: bool = True,
        shuffle_block_size: int = 16,
        shuffle_window: int = 4096,
        shuffle_window_chunks: int = 16,
        with_totals: bool = True,
        genes: Sequence[str] | None = None,
        with_obs_names: bool = True,
    ):
        self.collection = collection
        self.with_totals = with_totals
        self.with_obs_names = with_obs_names
        self.gene_index: np.ndarray | None = None
        self.var_names_g = collection.var_names_g
        # Per distinct shard column map: the file's genes -> the batch's columns (alignment and selection).
        self._output_maps: dict[int, tuple[np.ndarray | None, np.ndarray | None]] = {}
        if genes is not None:
            self.select_genes(genes)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.require_counts = require_counts
        self.shuffle_block_size = shuffle_block_size
        self.shuffle_window = shuffle_window
        self.shuffle_window_chunks = shuffle_window_chunks
        self.epoch = 0
        self.rank = 0
        self.world_size = 1
        self._byte_layouts: dict[str, dict] = {}  # kept across epochs (see ShardReader)

    def select_genes(self, genes: Sequence[str]) -> None:
        """Batches carry only these genes, in this order (``total_mrna_umis_n`` still sums all genes).

        Selecting where the rows are read (in the loader workers) sends only those columns to the
        training process, and its gene filter then has nothing left to do.
        """
        n_distinct = len(set(map(str, genes)))
        if n_distinct != len(genes):
            raise InputError(f"the gene list has duplicates ({len(genes)} names, {n_distinct} distinct)")
        gene_index, missing = column_positions(self.collection.var_names_g, genes)
        if missing:
            raise InputError(f"{len(missing)} of the {len(genes)} genes asked for are not in "
                             f"{self.collection.shards[0].path}, e.g. {missing[:5]}")
        self.gene_index = gene_index
        self.var_names_g = np.asarray([str(g) for g in genes], dtype=object)
        self._output_maps = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_distributed(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def plan(self) -> EpochPlan:
        return EpochPlan(
            shard_sizes=self.collection.shard_sizes,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self.epoch,
            shuffle_block_size=self.shuffle_block_size,
            shuffle_window=self.shuffle_window,
            shuffle_window_chunks=self.shuffle_window_chunks,
        )

    def __len__(self) -> int:
        """Batches this rank yields in an epoch (the same on every rank)."""
        return len(self.plan().batch_bounds())

    def __iter__(self) -> Iterator[BatchDict]:
        info = get_worker_info()
        return self._batches(info.id, info.num_workers) if info else self._batches(0, 1)

    def _batches(self, worker_id: int, num_workers: int) -> Iterator[BatchDict]:
        # A shuffled window reads up to ``shuffle_window_chunks`` shards: keep them all open.
        reader = ShardReader(self.collection, require_counts=self.require_counts, layouts=self._byte_layouts,
                             max_open_files=self.shuffle_window_chunks + 1 if self.shuffle else 2)
        window_cache: dict[tuple[int, int], _RowBlock] = {}
        try:
            for pieces in self.plan().batches(worker_id, num_workers):
                blocks = [self._read_piece(reader, piece, window_cache) for piece in pieces]
                yield self._to_batch(blocks)
        finally:
            reader.close()

    def _read_piece(self, reader: ShardReader, piece: BatchPiece, window_cache: dict) -> _RowBlock:
        if piece.window_rows is None:
            return self._read_rows(reader, piece.shard_index, piece.rows)
        key = (piece.window, piece.shard_index)
        if key not in window_cache:
            # One window at a time (its few shards' rows): memory stays at one window, whatever the
            # collection's size.
            if any(window != piece.window for window, _ in window_cache):
                window_cache.clear()
            window_cache[key] = self._read_rows(reader, piece.shard_index, piece.window_rows)
        return window_cache[key].select(np.searchsorted(piece.window_rows, piece.rows))

    def _read_rows(self, reader: ShardReader, shard_index: int, rows: np.ndarray) -> _RowBlock:
        # Totals and the gene alignment and selection once per rows read (a whole shuffle window), so
        # that each batch then picks its cells from the batch's columns only.
        shard = self.collection.shards[shard_index]
        x = reader.read_file_x(shard, rows)
        total_n = np.asarray(x.sum(axis=1, dtype=np.float64)).ravel() if self.with_totals else None
        output_map = self._output_map(shard)
        if output_map is not None:
            x = remap_columns(x, output_map, len(self.var_names_g))
        return _RowBlock(
            shard_index=shard_index,
            x=x,
            total_n=total_n,
            obs_names=reader.read_obs_names(shard, rows) if self.with_obs_names else None,
            batch_codes=reader.read_batch_index(shard, rows),
            columns={key: reader.read_obs_column(shard, key, rows) for key in self.collection.obs_columns},
            categorical_nd=reader.read_categorical_covariates(shard, rows)
            if self.collection.categorical_covariate_keys else None,
            continuous_nc=reader.read_continuous_covariates(shard, rows)
            if self.collection.continuous_covariate_keys else None,
        )

    def _output_map(self, shard: Shard) -> np.ndarray | None:
        """The file's genes -> the batch's columns: the shard's alignment then the gene selection, composed.

        Kept per distinct column map (shards with the same genes share one), checked by identity so
        that a cache carried into a loader worker by pickling is never misread.
        """
        entry = self._output_maps.get(id(shard.column_map))
        if entry is not None and entry[0] is shard.column_map:
            return entry[1]
        output = shard.column_map
        if self.gene_index is not None:
            selected_c = np.full(self.collection.n_vars, -1, dtype=np.int32)
            selected_c[self.gene_index] = np.arange(len(self.gene_index), dtype=np.int32)
            output = selected_c if shard.column_map is None else np.where(
                shard.column_map >= 0, selected_c[shard.column_map], -1
            ).astype(np.int32)
        self._output_maps[id(shard.column_map)] = (shard.column_map, output)
        return output

    def _measured(self, blocks: list[_RowBlock]) -> dict[str, torch.Tensor]:
        """``shard_index_n`` and ``gene_measured_sg`` over the shards of the batch (see the class docstring)."""
        rows: dict[int, int] = {}
        shard_index_n, measured_sg = [], []
        for block in blocks:
            if block.shard_index not in rows:
                rows[block.shard_index] = len(rows)
                measured_g = self.collection.gene_measured_g(block.shard_index)
                measured_sg.append(measured_g if self.gene_index is None else measured_g[self.gene_index])
            shard_index_n.append(np.full(block.x.shape[0], rows[block.shard_index], dtype=np.int64))
        return {
            "shard_index_n": torch.from_numpy(np.concatenate(shard_index_n)),
            "gene_measured_sg": torch.from_numpy(np.stack(measured_sg)),
        }

    def _to_batch(self, blocks: list[_RowBlock]) -> BatchDict:
        x = blocks[0].x if len(blocks) == 1 else sp.vstack([b.x for b in blocks], format="csr")
        total_n = np.concatenate([b.total_n for b in blocks]) if self.with_totals else None
        batch: BatchDict = {
            "x_ng": csr_to_torch(x),
            "var_names_g": self.var_names_g,
            "batch_index_n": torch.from_numpy(np.concatenate([b.batch_codes for b in blocks])),
        }
        if self.with_obs_names:
            batch["obs_names_n"] = np.concatenate([b.obs_names for b in blocks])
        if total_n is not None:
            batch["total_mrna_umis_n"] = torch.from_numpy(total_n).float()
        for key in self.collection.obs_columns:
            batch[f"{key}_n"] = np.concatenate([b.columns[key] for b in blocks])
        if self.collection.partial_genes:
            batch.update(self._measured(blocks))
        if self.collection.categorical_covariate_keys:
            batch["categorical_covariate_index_nd"] = torch.from_numpy(np.concatenate([b.categorical_nd for b in blocks]))
        if self.collection.continuous_covariate_keys:
            batch["continuous_covariates_nc"] = torch.from_numpy(np.concatenate([b.continuous_nc for b in blocks]))
        return batch


@dataclass
class _RowBlock:
    """Matrix rows and obs values of one set of rows of a shard."""

    shard_index: int
    x: sp.csr_matrix
    total_n: np.ndarray | None
    obs_names: np.ndarray | None
    batch_codes: np.ndarray
    columns: dict[str, np.ndarray]
    categorical_nd: np.ndarray | None = None
    continuous_nc: np.ndarray | None = None

    def select(self, index: np.ndarray) -> _RowBlock:
        return _RowBlock(
            shard_index=self.shard_index,
            x=self.x[index],
            total_n=None if self.total_n is None else self.total_n[index],
            obs_names=None if self.obs_names is None else self.obs_names[index],
            batch_codes=self.batch_codes[index],
            columns={key: values[index] for key, values in self.columns.items()},
            categorical_nd=None if self.categorical_nd is None else self.categorical_nd[index],
            continuous_nc=None if self.continuous_nc is None else self.continuous_nc[index],
        )


def collate_identity(batch: BatchDict) -> BatchDict:
    """Batches are assembled by the dataset; the loader passes them through untouched."""
    return batch
