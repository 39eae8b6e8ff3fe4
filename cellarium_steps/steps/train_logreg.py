"""cellarium-steps train-logreg: L1-regularised multinomial logistic regression on cell type labels, streamed."""

from __future__ import annotations

import argparse

from cellarium_steps.pipelines.labels import train_logreg
from cellarium_steps.steps.common import add_label_training_arguments, label_training_options

NAME = "train-logreg"
HELP = "train a multinomial logistic regression (Laplace prior, MAP) from expression to cell type, streamed"
EPILOG = """model:
  LogisticRegression: log1p(counts normalised to --target-count) of the --genes -> one of the Cell Ontology
  terms found in --cell-type-key, as flat classes (no ontology propagation: see train-socam for that).
  MAP in Pyro under a Laplace(0, --w-prior-scale) prior on the weights, with the likelihood scaled to the
  labelled cells, trained with Adam: at convergence this is scikit-learn's
  LogisticRegression(penalty="l1", C=--w-prior-scale) on the same features.

labels:
  --cell-type-key holds Cell Ontology ids; cells whose value is missing or 'unknown' are not trained on.
  Labels are counted and checked against the Cell Ontology (cellxgene-ontology-guide, offline) in a pass
  over the obs column before training.

outputs:
  OUTPUT (.ckpt)            Lightning checkpoint with the recipe inside: CellariumModule.from_checkpoint(OUTPUT)
                            rebuilds NormalizeTotal -> Log1p -> Filter(genes) -> LogisticRegression; its predict
                            gives y_logits_nc, shape (cells, classes). Written atomically.
  OUTPUT + .classes.csv     the classes in logit column order: cl_name, label
  OUTPUT + .provenance.json the run's config and versions

example:
  cellarium-steps train-logreg --input 'shards/*.h5ad' --genes out/hvg.csv --output out/logreg.ckpt"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_label_training_arguments(parser, step=NAME, w_prior_scale=1.0)


def run(args: argparse.Namespace) -> None:
    train_logreg(label_training_options(NAME, args))
