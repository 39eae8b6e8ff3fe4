"""Shards to batches: open .h5ad files and .zarr stores lazily, validate them, split cells across ranks and workers."""

import importlib

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


# Imported when first used: the dataset pulls in torch and the DataModule Lightning (seconds of start-up
# and, for torch, a few hundred MB), which reading shards without a model (convert, export) never needs.
_LAZY = {"ShardDataModule": "datamodule", "BatchDict": "dataset", "ShardedCellDataset": "dataset",
         "collate_identity": "dataset", "csr_to_torch": "dataset"}


def __getattr__(name: str):  # noqa: ANN202
    if name in _LAZY:
        return getattr(importlib.import_module(f"cellarium_steps.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
