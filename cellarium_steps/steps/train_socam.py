"""cellarium-steps train-socam: train SOCAM, an ontology-aware cell type classifier, streamed."""

from __future__ import annotations

import argparse

from cellarium_steps.pipelines.labels import SOCAM_W_PRIOR_SCALE, train_socam
from cellarium_steps.steps.common import add_label_training_arguments, label_training_options

NAME = "train-socam"
HELP = "train SOCAM, a cell type classifier over Cell Ontology terms with probability propagation, streamed"
EPILOG = """model:
  SOCAM: logistic regression from log1p(counts normalised to --target-count) of the --genes to the
  Cell Ontology terms found in --cell-type-key, MAP under a Laplace(0, --w-prior-scale) prior on the
  weights, trained with Adam. Probabilities propagate up the ontology: a term's probability is the sum
  of the softmax probabilities of itself and its descendants among the labels, so a parent is never
  less likely than its child, and a cell labelled with a parent term (CD4 T) is a correct positive for
  it whichever child it is (loss -log p_prop[label]). Labels may be at mixed depth.

prior:
  The loss is n_obs x (mean -log p_prop[label] over the batch's labelled cells) + sum|W| / b, so per
  labelled cell the prior weighs 1 / (b n_obs): the optimum is scikit-learn's L1 logistic regression with
  C = b, whatever n_obs is. The API's default b = 0.01 suits atlas-scale n_obs; on thousands of cells it
  zeroes most genes and shrinks the probabilities (fewer calls reach 0.5), hence the default 1 here, as
  train-logreg. Larger b is weaker regularisation.

prediction:
  predict writes each cell's call: the most specific term whose propagated probability is >= 0.5 (the
  term walked down to while some child is more likely than not; the most probable term if none reaches
  0.5), its label and probability, and the --top-k terms of highest propagated probability. Judge the call
  against a label at mixed depth as right when it is the label or one of its descendants (naive CD4 T for
  a cell labelled CD4 T): an exact-match score counts those as errors.

labels:
  --cell-type-key holds Cell Ontology ids (CL:0000624). Cells whose value is missing or 'unknown' are
  left out of training (they still stream); the others are counted first in a pass over the obs column
  only, and each distinct value is checked against the Cell Ontology shipped with
  cellxgene-ontology-guide (offline; the release is recorded in the checkpoint's recipe).

outputs:
  OUTPUT (.ckpt)            Lightning checkpoint with the recipe inside: CellariumModule.from_checkpoint(OUTPUT)
                            rebuilds NormalizeTotal -> Log1p -> Filter(genes) -> SOCAM; its predict gives
                            y_logits_nc and cell_type_probs_nc, shape (cells, classes). Written atomically.
                            The recipe's data.prediction tells predict to write, per cell, the call
                            (cell_type_ontology_term_id, cell_type, cell_type_probability: the most specific
                            term whose propagated probability is >= 0.5) and the --top-k terms
                            (cell_type_top_k_ontology_term_id, cell_type_top_k_probability); see predict --help.
  OUTPUT + .classes.csv     the classes in output column order: cl_name, label
  OUTPUT + .provenance.json the run's config and versions

example:
  cellarium-steps hvg --input 'shards/*.h5ad' --batch-key batch --output out/hvg.csv
  cellarium-steps train-socam --input 'shards/*.h5ad' --genes out/hvg.csv --output out/socam.ckpt"""



def add_arguments(parser: argparse.ArgumentParser) -> None:
    # 1.0, not the API's 0.01: the prior's weight against the n_obs-scaled likelihood is 1 / (b n_obs) per
    # cell, so b = 0.01 on thousands of labelled cells is an L1 penalty of scikit-learn's C = 0.01 that zeroes
    # most genes; b = 1 is C = 1, as train-logreg (see the epilog's "prior" paragraph)
    group = add_label_training_arguments(parser, step=NAME, w_prior_scale=SOCAM_W_PRIOR_SCALE)
    group.add_argument(
        "--no-probability-propagation", dest="probability_propagation", action="store_false",
        help="train and predict with a flat softmax over the terms (a parent-labelled cell then counts as a "
        "negative for the children)",
    )
    group.add_argument(
        "--top-k", type=int, default=3, metavar="K",
        help="predict writes each cell's K most probable terms (default: 3; at most the number of terms)",
    )


def run(args: argparse.Namespace) -> None:
    train_socam(label_training_options(NAME, args), probability_propagation=args.probability_propagation,
                top_k=args.top_k)
