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
                   mean) for train-scvi checkpoints, cell_type_probs (propagated probabilities, one per
                   class of OUTPUT.classes.csv's order) for train-socam, y_logits for train-logreg
  train-socam checkpoints add, per cell (unlabelled cells included):
      cell_type_ontology_term_id     the call (string): the most specific term whose propagated
                   probability (the cell is this term or a descendant of it) is at least 0.5. In a
                   tree at most one child of a term can reach 0.5, so this walks down the ontology
                   while some child is more likely than not and stops at the deepest such term (for
                   several in a DAG: the most probable). If no term reaches 0.5 (the classes have no
                   common root), the most probable term.
      cell_type                      that term's ontology label (string)
      cell_type_probability          its propagated probability (float32)
      cell_type_top_k_ontology_term_id  the k terms of highest propagated probability (list of string;
                   k set by train-socam --top-k, default 3); an ancestor ranks at or above its
                   descendants (ties: the more specific term first)
      cell_type_top_k_probability    their propagated probabilities (fixed-size list of k float32)
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
    try:
        writer = ParquetEmbeddingWriter.from_prediction_spec(
            args.output, prediction,
            provenance={"predict": provenance(NAME, args), "training": recipe.get("provenance")},
        )
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"--checkpoint: {args.checkpoint}: unreadable prediction spec ({type(e).__name__}: {e})") from None
    trainer = build_trainer(devices=args.devices, accelerator=args.accelerator, callbacks=[writer])
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    if trainer.global_rank == 0:
        logger.info("wrote %s (%d cells on rank 0)", args.output, writer.rows_written)
