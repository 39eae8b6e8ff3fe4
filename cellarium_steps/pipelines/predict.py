"""Any trained checkpoint over every cell: per-cell outputs streamed to a Parquet dataset."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from cellarium_steps.data import ShardDataModule
from cellarium_steps.data.errors import InputError
from cellarium_steps.data.options import DataOptions, covariate_options
from cellarium_steps.outputs.embeddings import ParquetEmbeddingWriter
from cellarium_steps.pipelines.features import features_from_query
from cellarium_steps.pipelines.query_data import (
    DEFAULT_MAX_MISSING_GENES_FRACTION,
    check_missing_genes_options,
    check_unseen_batch_option,
    fill_missing_genes,
    open_query_shards,
    unseen_batch_map,
)
from cellarium_steps.runner import CellariumModule, build_trainer
from cellarium_steps.runner.recipe import RECIPE_KEY, load_checkpoint

logger = logging.getLogger("cellarium_steps")


def predict(
    *, inputs: Sequence[str], output: str, checkpoint: str, batch_key: str | None = None, batch_size: int = 4096,
    num_workers: int = 0, devices: int | str = 1, accelerator: str = "auto", num_nodes: int = 1,
    unseen_batch: str = "error", missing_genes: str = "error",
    max_missing_genes_fraction: float = DEFAULT_MAX_MISSING_GENES_FRACTION, features_from: str | None = None,
    data_options: DataOptions | None = None,
    provenance: dict[str, Any] | None = None,
) -> int:
    """Write the checkpoint's per-cell prediction of every cell; returns the rows written on this rank.

    The batch key and categories are the checkpoint's (``batch_key`` may name the column differently), and
    so are the covariates' columns and categories (a category the model lacks stops it before the pass) and
    the counts matrix and gene names (unless ``data_options`` say otherwise); with ``features_from`` the
    batches and covariates are those of the query scVI checkpoint whose latent the classifier then reads
    (see :func:`~cellarium_steps.pipelines.features.features_from_query`). Cells of batches the model did not
    see and model genes the shards lack are refused, or handled as ``unseen_batch`` and ``missing_genes``
    say (:mod:`~cellarium_steps.pipelines.query_data`); all of it is checked before the pass.
    """
    check_missing_genes_options(missing_genes, max_missing_genes_fraction)
    check_unseen_batch_option(unseen_batch)
    try:
        recipe = load_checkpoint(checkpoint)[RECIPE_KEY]
    except (OSError, ValueError) as e:
        raise InputError(f"--checkpoint: {e}") from None
    data = recipe.get("data", {})
    prediction = data.get("prediction")
    if not prediction:
        raise InputError(f"--checkpoint: {checkpoint}: the model has no per-cell prediction to write")
    module = CellariumModule.from_checkpoint(checkpoint)
    if features_from:
        data = {**data, **features_from_query(module, checkpoint, features_from)}
    batch_key = batch_key or data.get("batch_key")
    shards = open_query_shards(
        inputs, batch_key=batch_key, categories=data.get("batch_categories") if batch_key else None,
        **covariate_options(data.get("covariates")),
        # the matrix and gene names the model was trained on, unless asked otherwise
        **(data_options or DataOptions()).with_recorded(data.get("source")).open_kwargs(),
    )
    if batch_key and data.get("batch_categories") is not None:
        batch_map = unseen_batch_map(shards, unseen_batch)
        if batch_map is not None:
            module.transforms.insert(0, batch_map)
    fill_missing_genes(module, shards.collection, missing_genes=missing_genes,
                       max_missing_genes_fraction=max_missing_genes_fraction)
    datamodule = ShardDataModule(inputs, batch_size=batch_size, num_workers=num_workers, collection=shards.collection)
    try:
        writer = ParquetEmbeddingWriter.from_prediction_spec(
            output, prediction,
            provenance={"predict": provenance, "training": recipe.get("provenance")},
        )
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"--checkpoint: {checkpoint}: unreadable prediction spec ({type(e).__name__}: {e})") from None
    trainer = build_trainer(devices=devices, accelerator=accelerator, num_nodes=num_nodes, callbacks=[writer])
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    if trainer.global_rank == 0:
        logger.info("wrote %s (%d cells on rank 0)", output, writer.rows_written)
    return writer.rows_written
