"""cellarium-steps predict: per-cell outputs of a trained model, streamed to Parquet."""

from __future__ import annotations

import argparse
import logging

from cellarium_steps.data import ShardDataModule
from cellarium_steps.data.errors import InputError
from cellarium_steps.export.embeddings import ParquetEmbeddingWriter
from cellarium_steps.runner import CellariumModule, build_trainer
from cellarium_steps.runner.recipe import RECIPE_KEY, load_checkpoint
from cellarium_steps.steps.common import add_common_arguments, provenance

logger = logging.getLogger("cellarium_steps")

NAME = "predict"
HELP = "run a trained model (a train-* checkpoint) over every cell and write its per-cell output as Parquet"
EPILOG = """outputs:
  OUTPUT (a Parquet dataset: a directory of part files, one per device)
      cell_id      the cell's obs name
      <column>     the model's per-cell output as a fixed-size list of float32: scvi_latent (scVI latent
                   mean) for train-scvi checkpoints
  the checkpoint's and this run's config and versions are in the files' metadata

The checkpoint says which genes, batch key and batch categories the model expects; a shard that lacks
a gene, or a cell from a batch the model was not trained on, is an error naming the file.

example:
  cellarium-steps predict --checkpoint out/scvi.ckpt --input 'shards/*.h5ad' --output out/scvi_cells.parquet"""

REQUIRED = ("input", "output", "checkpoint")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, batch_size=4096)
    parser.add_argument("--checkpoint", metavar="CKPT", help="a checkpoint written by a train-* step (required)")


def run(args: argparse.Namespace) -> None:
    try:
        recipe = load_checkpoint(args.checkpoint)[RECIPE_KEY]
    except (OSError, ValueError) as e:
        raise InputError(f"--checkpoint: {e}") from None
    data = recipe.get("data", {})
    prediction = data.get("prediction")
    if not prediction:
        raise InputError(f"--checkpoint: {args.checkpoint}: the model has no per-cell prediction to write")
    batch_key = args.batch_key or data.get("batch_key")
    datamodule = ShardDataModule(
        args.input, batch_size=args.batch_size, batch_key=batch_key, num_workers=args.num_workers,
        batch_categories=data.get("batch_categories") if batch_key else None,
    )
    module = CellariumModule.from_checkpoint(args.checkpoint)
    writer = ParquetEmbeddingWriter(
        args.output, dim=int(prediction["dim"]), embedding_key=prediction["key"],
        embedding_column=prediction["column"],
        provenance={"predict": provenance(NAME, args), "training": recipe.get("provenance")},
    )
    trainer = build_trainer(devices=args.devices, accelerator=args.accelerator, callbacks=[writer])
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    if trainer.global_rank == 0:
        logger.info("wrote %s (%d cells on rank 0)", args.output, writer.rows_written)
