"""The LightningDataModule that hands each rank its share of the shards."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from cellarium_steps.data.dataset import ShardedCellDataset, collate_identity
from cellarium_steps.data.shards import ShardCollection, open_shards


class ShardDataModule(pl.LightningDataModule):
    """Opens and validates the shards at construction, so bad input fails before any pass.

    ``with_totals`` and ``with_obs_names`` leave batch keys that the consumer never reads out of the
    batches (see :class:`ShardedCellDataset`). ``batch_key``, ``counts``, ``var_names``, ``gene_join``,
    ``obs_filter`` and the covariates' options are :func:`open_shards`'s; ``counts`` defaults to ``"auto"``
    here (the matrix with integer counts, or an error before any pass when ``require_counts`` and none
    has them).
    """

    def __init__(
        self,
        inputs: str | Sequence[str],
        batch_size: int = 10_000,
        batch_key: str | Sequence[str] | None = None,
        obs_columns: Iterable[str] = (),
        num_workers: int = 0,
        shuffle: bool = False,
        seed: int = 0,
        require_counts: bool = True,
        counts: str = "auto",
        var_names: str = "index",
        gene_join: str = "same",
        obs_filter: str | None = None,
        batch_categories: Sequence[str] | None = None,
        categorical_covariate_keys: str | Sequence[str] | None = None,
        continuous_covariate_keys: str | Sequence[str] | None = None,
        covariate_categories: Mapping[str, Sequence[str]] | None = None,
        collection: ShardCollection | None = None,
        with_totals: bool = True,
        with_obs_names: bool = True,
    ):
        super().__init__()
        self.collection = collection or open_shards(
            inputs, batch_key=batch_key, obs_columns=obs_columns, batch_categories=batch_categories, counts=counts,
            var_names=var_names, gene_join=gene_join, obs_filter=obs_filter, require_counts=require_counts,
            categorical_covariate_keys=categorical_covariate_keys, continuous_covariate_keys=continuous_covariate_keys,
            covariate_categories=covariate_categories,
        )
        self.num_workers = num_workers
        self.dataset = ShardedCellDataset(
            self.collection, batch_size=batch_size, shuffle=shuffle, seed=seed, require_counts=require_counts,
            with_totals=with_totals, with_obs_names=with_obs_names,
        )

    def select_genes(self, genes: Sequence[str]) -> None:
        """Read only these genes (see :meth:`ShardedCellDataset.select_genes`)."""
        self.dataset.select_genes(genes)

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.dataset.set_distributed(self.trainer.global_rank, self.trainer.world_size)

    def _loader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=collate_identity,
            prefetch_factor=2 if self.num_workers else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()
