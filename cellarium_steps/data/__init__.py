"""Shards to batches: open .h5ad files and .zarr stores lazily, validate them, split cells across ranks and workers."""

from cellarium_steps.data.dataset import BatchDict, ShardedCellDataset, collate_identity, csr_to_torch
from cellarium_steps.data.errors import InputError
from cellarium_steps.data.plan import EpochPlan
from cellarium_steps.data.reader import ShardReader
from cellarium_steps.data.shards import Shard, ShardCollection, expand_inputs, open_shards

__all__ = [
    "BatchDict",
    "EpochPlan",
    "InputError",
    "Shard",
    "ShardCollection",
    "ShardDataModule",
    "ShardReader",
    "ShardedCellDataset",
    "collate_identity",
    "csr_to_torch",
    "expand_inputs",
    "open_shards",
]


def __getattr__(name: str):  # noqa: ANN202
    # The DataModule pulls in Lightning (seconds of start-up); import it only when it is used.
    if name == "ShardDataModule":
        from cellarium_steps.data.datamodule import ShardDataModule

        return ShardDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
