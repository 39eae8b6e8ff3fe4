"""The options both label-trained steps (train-socam, train-logreg) take, and their reading into
:class:`~cellarium_steps.pipelines.labels.LabelTrainingOptions`."""

from __future__ import annotations

import argparse

from cellarium_steps.pipelines.labels import DEFAULT_MAX_EPOCHS_CAP, DEFAULT_TRAINING_STEPS, LabelTrainingOptions
from cellarium_steps.steps.common import add_common_arguments, call_pipeline, provenance


def add_label_training_arguments(parser: argparse.ArgumentParser, *, step: str, w_prior_scale: float,
                                 learning_rate: float = 1e-2) -> argparse._ArgumentGroup:
    add_common_arguments(parser, batch_size=1024)
    group = parser.add_argument_group(f"{step} options")
    group.add_argument(
        "--genes", metavar="PATH",
        help="genes to use: a CSV with 'gene' and 'highly_variable' columns (the hvg step's output; the "
        "highly variable ones are used) or a text file with one gene per line (default: all genes)",
    )
    group.add_argument(
        "--cell-type-key", default="cell_type_ontology_term_id", metavar="COLUMN",
        help="obs column with each cell's Cell Ontology id; missing or 'unknown' cells are not trained on "
        "(default: cell_type_ontology_term_id)",
    )
    group.add_argument("--max-epochs", type=int, default=None, metavar="N",
                       help=f"passes over the data (default: enough for about {DEFAULT_TRAINING_STEPS} optimizer "
                       f"steps, at most {DEFAULT_MAX_EPOCHS_CAP} epochs; 1 on large data)")
    group.add_argument("--learning-rate", type=float, default=learning_rate, metavar="LR",
                       help=f"Adam learning rate (default: {learning_rate:g})")
    group.add_argument("--target-count", type=float, default=1e4, metavar="N",
                       help="each cell's counts are scaled to this total before log1p (default: 1e4)")
    features = group.add_mutually_exclusive_group()
    features.add_argument("--pca", metavar="PATH",
                          help="train on the cells' principal components instead of genes: the pca step's --output "
                          "(its normalisation and genes come with it)")
    features.add_argument("--scvi", metavar="CKPT",
                          help="train on the cells' scVI latent means instead of genes: a train-scvi checkpoint "
                          "(batches coded as it coded them; --batch-key defaults to its)")
    group.add_argument("--w-prior-scale", type=float, default=w_prior_scale, metavar="B",
                       help=f"scale of the Laplace prior on the weights; smaller is sparser (default: {w_prior_scale:g})")
    return group


def label_training_options(step: str, args: argparse.Namespace) -> LabelTrainingOptions:
    return call_pipeline(LabelTrainingOptions, args, provenance=provenance(step, args))
