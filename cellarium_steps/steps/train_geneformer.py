"""cellarium-steps train-geneformer: masked-language-model training of Geneformer on streamed shards."""

from __future__ import annotations

import argparse
import inspect

from cellarium_steps.pipelines.transformers import train_geneformer
from cellarium_steps.steps.common import add_common_arguments, call_pipeline, provenance

NAME = "train-geneformer"
HELP = "train a Geneformer (BERT over rank-value encoded cells) by masked language modelling, streamed"
EPILOG = """model:
  each cell becomes the list of its expressed genes ordered by decreasing count / total / factor (the
  gene's non-zero median from --tdigest, else 1), cut at --max-position-embeddings genes; a BERT encoder
  learns to recover --mlm-probability of them from the others (80% MASK, 10% a random gene, 10% kept).
  The defaults are a small model that trains on a CPU; Geneformer's paper used 6 layers of 256.

outputs:
  OUTPUT (.ckpt)            the final Lightning checkpoint: weights (the per-gene factor included), optimizer
                            state, and the recipe (the --genes filter and the model's constructor arguments);
                            CellariumModule.from_checkpoint() rebuilds the model from it
  OUTPUT.d/last.ckpt        checkpoint of the last finished epoch, written atomically every epoch; a run
                            started again with the same options resumes from it
  OUTPUT + .provenance.json the run's config and versions

example:
  cellarium-steps tdigest --input 'shards/*.h5ad' --output out/tdigest.csv
  cellarium-steps train-geneformer --input 'shards/*.h5ad' --tdigest out/tdigest.csv --output out/geneformer.ckpt"""

#: (option, help) of the model's size; the defaults are train_geneformer's
MODEL_OPTIONS = (
    ("hidden_size", "width of the encoder"),
    ("num_hidden_layers", "encoder layers"),
    ("num_attention_heads", "attention heads per layer (must divide --hidden-size)"),
    ("intermediate_size", "width of each layer's feed-forward block"),
    ("max_position_embeddings", "genes per cell: the top-ranked ones are kept"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Every cell is a sequence of up to --max-position-embeddings tokens: batches are small.
    add_common_arguments(parser, batch_size=32)
    group = parser.add_argument_group("train-geneformer options")
    group.add_argument(
        "--tdigest", metavar="PATH",
        help="the tdigest step's table (CSV or Parquet, 'gene' and 'median' columns): each gene's non-zero "
        "median divides its normalized counts before ranking (default: no per-gene factor)",
    )
    group.add_argument(
        "--genes", metavar="PATH",
        help="genes to model: a CSV with 'gene' and 'highly_variable' columns (the hvg step's output) or a text "
        "file with one gene per line (default: all genes)",
    )
    defaults = inspect.signature(train_geneformer).parameters
    for name, text in MODEL_OPTIONS:
        default = defaults[name].default
        group.add_argument(
            "--" + name.replace("_", "-"), type=int, default=default, metavar="N", help=f"{text} (default: {default})"
        )
    group.add_argument(
        "--mlm-probability", type=float, default=0.15, metavar="P",
        help="fraction of each cell's genes masked for the loss (default: 0.15)",
    )
    group.add_argument("--max-epochs", type=int, default=1, metavar="N", help="passes over the data (default: 1)")
    group.add_argument(
        "--max-steps", type=int, default=None, metavar="N",
        help="stop after this many optimizer steps, even within an epoch (default: no limit)",
    )
    group.add_argument(
        "--learning-rate", type=float, default=1e-3, metavar="LR", help="Adam learning rate (default: 1e-3)"
    )


def run(args: argparse.Namespace) -> None:
    call_pipeline(train_geneformer, args, provenance=provenance(NAME, args))
