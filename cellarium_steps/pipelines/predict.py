"""Any trained checkpoint over every cell: per-cell outputs streamed to a Parquet dataset."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from cellarium_steps.data import ShardDataModule
from cellarium_steps.data.errors import InputError
from cellarium_steps.data.options import DataOptions, covariate_options
from cellarium_steps.outputs.embeddings import ParquetEmbeddingWriter
from cellarium_steps.runner import CellariumModule, build_trainer
from cellarium_steps.runner.recipe import RECIPE_KEY, load_checkpoint

logger = logging.getLogger("cellarium_steps")


def predict(
    *, inputs: Sequence[str], output: str, checkpoint: str, batch_key: str | None = None, batch_size: int = 4096,
    num_workers: int = 0, devices: int | str = 1, accelerator: str = "auto", num_nodes: int = 1,
    data_options: DataOptions | None = None,
    provenance: dict[str, Any] | None = None,
) -> int:
    """Write the checkpoint's per-cell prediction of every cell; returns the rows written on this rank.
    The batch key and categories are the checkpoint's (``batch_key`` may name the column differently), and
    so are the covariates' columns and categories (a category the model lacks stops it before the pass)."""
    try:
        recipe = load_checkpoint(checkpoint)[RECIPE_KEY]
    except (OSError, ValueError) as e:
        raise InputError(f"--checkpoint: {e}") from None
    data = recipe.get("data", {})
    prediction = data.get("prediction")
    if not prediction:
        raise InputError(f"--checkpoint: {checkpoint}: the model has no per-cell prediction to write")
    batch_key = batch_key or data.get("batch_key")
    datamodule = ShardDataModule(
        inputs, batch_size=batch_size, batch_key=batch_key, num_workers=num_workers,
        batch_categories=data.get("batch_categories") if batch_key else None,
        **covariate_options(data.get("covariates")),
        # the matrix and gene names the model was trained on, unless asked otherwise
        **(data_options or DataOptions()).with_recorded(data.get("source")).open_kwargs(),
    )
    module = CellariumModule.from_checkpoint(checkpoint)
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
