"""cellarium-steps predict: per-cell outputs of a trained model, streamed to Parquet."""

from __future__ import annotations

import argparse

from cellarium_steps.pipelines.predict import predict
from cellarium_steps.steps.common import add_common_arguments, add_missing_genes_arguments, call_pipeline, provenance

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

new data:
  The checkpoint says which genes, batch key and batch categories the model expects. Before the pass:
  a model gene the shards lack is an error naming the file, unless --missing-genes zero (read as zeros,
  at most --max-missing-genes-fraction of the model's genes); a cell of a batch the model was not
  trained on is an error naming the file and cell, unless --unseen-batch as:NAME (encoded as the
  model's batch NAME; the number of such cells is logged). To learn the new batches instead, map the
  data onto the model first (train-scvi --reference) and predict with the query checkpoint; a
  classifier trained on the reference's latent (train-socam --scvi) then reads the query's latent with
  --features-from QUERY.ckpt.

example:
  cellarium-steps predict --checkpoint out/scvi.ckpt --input 'shards/*.h5ad' --output out/scvi_cells.parquet
  cellarium-steps predict --checkpoint out/socam.ckpt --features-from out/query_scvi.ckpt \\
      --input 'query/*.h5ad' --missing-genes zero --output out/query_socam.parquet"""

REQUIRED = ("input", "output", "checkpoint")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, batch_size=4096)
    parser.add_argument("--checkpoint", metavar="CKPT", help="a checkpoint written by a train-* step (required)")
    group = parser.add_argument_group("new data")
    group.add_argument(
        "--unseen-batch", default="error", metavar="error|as:NAME",
        help="cells of a batch the model did not see: error (default), or as:NAME to encode them as the "
        "model's batch NAME",
    )
    add_missing_genes_arguments(group)
    group.add_argument(
        "--features-from", metavar="CKPT",
        help="for a classifier trained on scVI latent means (--scvi): read the latent of this query checkpoint "
        "(train-scvi --reference mapped from that scVI model) and its batches",
    )


def run(args: argparse.Namespace) -> None:
    call_pipeline(predict, args, provenance=provenance(NAME, args))
