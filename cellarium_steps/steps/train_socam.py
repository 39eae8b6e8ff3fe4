"""cellarium-steps train-socam: train SOCAM, an ontology-aware cell type classifier, streamed.

Also the pieces train-logreg shares: the label pass over the obs column, the options, the
training module that hands the labels to the model, and the checkpoint and class-table writing.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch

from cellarium_steps.atomic import write_csv_atomically
from cellarium_steps.data import ShardDataModule
from cellarium_steps.data.errors import InputError
from cellarium_steps.data.reader import ShardReader
from cellarium_steps.data.shards import ShardCollection
from cellarium_steps.export import write_json_atomically
from cellarium_steps.export.prediction_columns import descendant_lists
from cellarium_steps.models.socam import SOCAM
from cellarium_steps.ontology import (
    descendant_tensor,
    is_deprecated,
    is_unlabelled,
    ontology_version,
    term_labels,
    validate_cl_names,
)
from cellarium_steps.runner import AtomicCheckpointIO, CellariumModule, build_trainer
from cellarium_steps.runner.local import device_count
from cellarium_steps.runner.recipe import spec
from cellarium_steps.steps._features import Features, pca_features, scvi_features
from cellarium_steps.steps.common import ConfigError, add_common_arguments, provenance, selected_genes
from cellarium_steps.transforms import Filter, Log1p, NormalizeTotal

logger = logging.getLogger("cellarium_steps")

NAME = "train-socam"
HELP = "train SOCAM, a cell type classifier over Cell Ontology terms with probability propagation, streamed"
#: train-socam's default Laplace scale b (the MAP objective is scikit-learn's L1 logistic regression with C = b)
SOCAM_W_PRIOR_SCALE = 1.0
#: SOCAM starts from small weights: with thousands of genes, W_init_scale=1 (the API default) gives huge logits.
W_INIT_SCALE = 0.01
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


#: optimizer steps the default --max-epochs aims for: Adam (lr 0.01) on the Laplace-prior loss needs a few
#: hundred; 20 epochs of 15,000 cells at batch 1,024 are only 300 (leave-one-source-out on the merged PBMC file,
#: 20 epochs -> this default's 36-42: accuracy at the labelled depth 77.1 -> 79.9, coarse 98.0 -> 97.9).
DEFAULT_TRAINING_STEPS = 500
#: ... and never more epochs than this, however small the data
DEFAULT_MAX_EPOCHS_CAP = 50


def default_max_epochs(n_cells: int, batch_size: int, devices: int = 1) -> int:
    """Epochs for about ``DEFAULT_TRAINING_STEPS`` optimizer steps: 1 on millions of cells, up to the cap on
    thousands (as scvi-tools scales its default epochs with the cell count)."""
    steps_per_epoch = max(1, math.ceil(n_cells / (batch_size * max(devices, 1))))
    return max(1, min(DEFAULT_MAX_EPOCHS_CAP, math.ceil(DEFAULT_TRAINING_STEPS / steps_per_epoch)))


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


def check_label_training_options(args: argparse.Namespace) -> None:
    if args.max_epochs is not None and args.max_epochs < 1:
        raise ConfigError(f"--max-epochs: must be at least 1, got {args.max_epochs}")
    for name in ("learning_rate", "target_count", "w_prior_scale"):
        if not getattr(args, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')}: must be positive, got {getattr(args, name)}")
    if not str(args.output).endswith(".ckpt"):
        raise ConfigError(f"--output: the checkpoint path must end in .ckpt, got {args.output!r}")
    if args.genes and (args.pca or args.scvi):
        raise ConfigError(f"--genes does not combine with --{'pca' if args.pca else 'scvi'}: its own genes are used")


# -- the label pass ----------------------------------------------------------------------------------------


@dataclass
class LabelSummary:
    """What one pass over the label column found."""

    key: str
    n_cells: int
    n_labelled: int
    counts: dict[str, int] = field(default_factory=dict)  # label -> cells, labelled values only

    @property
    def labels(self) -> list[str]:
        return sorted(self.counts)


def scan_labels(collection: ShardCollection, key: str, *, check_ontology: bool = True) -> LabelSummary:
    """Count the labelled cells and their labels from the obs column alone (no count matrix is read).

    With ``check_ontology``, every distinct label must be a Cell Ontology id: InputError naming the
    value and the file otherwise.
    """
    reader = ShardReader(collection, require_counts=False)
    counts: dict[str, int] = {}
    n_cells = 0
    try:
        for shard in collection.shards:
            values = reader.read_obs_column(shard, key, np.arange(shard.n_obs))
            n_cells += len(values)
            shard_labels: dict[str, int] = {}
            for value, count in Counter(values.tolist()).items():
                text = _label_text(value)
                if text is not None:
                    shard_labels[text] = shard_labels.get(text, 0) + count
            if check_ontology and shard_labels:
                try:
                    validate_cl_names(shard_labels)
                except ValueError:
                    bad = next(v for v in shard_labels if not _is_cl_id(v))
                    raise InputError(
                        f"{shard.path}: obs[{key!r}] has {bad!r} ({shard_labels[bad]} cells), which is not a Cell "
                        f"Ontology id known to {ontology_version()}; use CL ids such as 'CL:0000624', or 'unknown'"
                    ) from None
            for label, count in shard_labels.items():
                counts[label] = counts.get(label, 0) + count
        if check_ontology:
            deprecated = [label for label in counts if is_deprecated(label)]
            if deprecated:
                logger.warning("obs[%r]: deprecated Cell Ontology terms %s have no place in the hierarchy", key, deprecated)
    finally:
        reader.close()
    return LabelSummary(key=key, n_cells=n_cells, n_labelled=sum(counts.values()), counts=counts)


def _label_text(value: Any) -> str | None:
    if is_unlabelled(value):
        return None
    if isinstance(value, bytes):
        value = value.decode()
    return str(value)


def _is_cl_id(value: str) -> bool:
    try:
        validate_cl_names([value])
    except ValueError:
        return False
    return True


def require_labels(summary: LabelSummary, inputs: Sequence[str]) -> None:
    if summary.n_labelled == 0:
        raise InputError(f"obs[{summary.key!r}]: no labelled cells in {len(inputs)} input file(s) (all missing or 'unknown')")
    if len(summary.counts) < 2:
        raise InputError(f"obs[{summary.key!r}]: only one cell type ({summary.labels[0]!r}); a classifier needs two or more")


def check_genes(args: argparse.Namespace, collection: ShardCollection) -> list[str] | None:
    return selected_genes(args.genes, collection.var_names_g, collection.shards[0].path)


def transform_specs(args: argparse.Namespace, genes: list[str] | None) -> list[dict[str, Any]]:
    """NormalizeTotal -> Log1p -> Filter(genes), as recipe specs."""
    specs = [spec(NormalizeTotal, target_count=float(args.target_count)), spec(Log1p)]
    if genes is not None:
        specs.append(spec(Filter, filter_list=list(genes)))
    return specs


# -- training ----------------------------------------------------------------------------------------------


class LabelledTrainingModule(CellariumModule):
    """CellariumModule that hands the label column to the model under the name its forward takes.

    ``label_format="names"`` passes ``<label_key>_n`` as ``cl_names_n`` (SOCAM); ``"codes"`` passes
    ``y_n`` (index into ``categories``, -1 when unlabelled) and ``y_categories`` (LogisticRegression).
    Only training uses this class: the checkpoint's recipe rebuilds a plain CellariumModule, and
    prediction needs no labels.
    """

    def __init__(self, model: torch.nn.Module, transforms: Sequence[torch.nn.Module] = (), *, label_key: str,
                 label_format: str = "names", categories: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(model, transforms=transforms, **kwargs)
        if label_format not in ("names", "codes"):
            raise ValueError(f"label_format must be 'names' or 'codes', got {label_format!r}")
        self.label_key = label_key
        self.label_format = label_format
        self.categories = np.asarray(list(categories or ()), dtype=object)
        self._code = {c: i for i, c in enumerate(self.categories)}

    def _prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        batch = super()._prepare(batch)
        values_n = batch.get(f"{self.label_key}_n")
        if values_n is None:
            return batch
        if self.label_format == "names":
            return {**batch, "cl_names_n": values_n}
        codes = [-1 if is_unlabelled(v) else self._code.get(str(v), -2) for v in values_n]
        if -2 in codes:
            bad = values_n[codes.index(-2)]
            raise InputError(f"obs[{self.label_key!r}] has {bad!r}, which the label pass did not find")
        return {**batch, "y_n": torch.tensor(codes, dtype=torch.long), "y_categories": self.categories}


def fit_and_write(args: argparse.Namespace, datamodule: ShardDataModule, recipe: dict[str, Any],
                  module_kwargs: dict[str, Any], classes: list[str], features: Features | None = None) -> None:
    """Train, then write the checkpoint (atomically, recipe inside), the class table and provenance."""
    trainer = build_trainer(
        devices=args.devices, accelerator=args.accelerator, max_epochs=args.max_epochs, trainable=True,
        plugins=[AtomicCheckpointIO()],
    )
    pl.seed_everything(args.seed, workers=True, verbose=False)
    module = LabelledTrainingModule.from_recipe(
        recipe, optim_kwargs={"lr": args.learning_rate}, seed=args.seed, **module_kwargs
    )
    if features is not None:
        module.transforms[0].load_state_dict(features.state)
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(args.output, weights_only=True)
    model = module.model
    classes = list(getattr(model, "active_cl_names", None) or getattr(model, "y_categories", classes))
    if trainer.global_rank == 0:
        write_csv_atomically(pd.DataFrame({"cl_name": classes, "label": _labels_or_blank(classes)}),
                             args.output + ".classes.csv")
        write_json_atomically(recipe["provenance"], args.output + ".provenance.json")
        logger.info("wrote %s", args.output)


def label_data(args: argparse.Namespace, setup: LabelTraining, prediction: dict[str, Any]) -> dict[str, Any]:
    """The recipe's "data" entry: the inputs the model expects and the classes of its outputs (and, for scVI
    features, the batch coding predict must read the cells with)."""
    summary = setup.summary
    data = {
        "genes": setup.var_names_g, "label_key": summary.key, "classes": summary.labels,
        "class_labels": term_labels(summary.labels), "label_counts": summary.counts,
        "n_labelled": summary.n_labelled, "ontology": ontology_version(),
        "target_count": float(args.target_count), "prediction": prediction,
    }
    collection = setup.datamodule.collection
    if setup.features is not None and setup.features.batch_categories is not None and collection.batch_key:
        data["batch_key"] = collection.batch_key
        data["batch_categories"] = [str(c) for c in collection.batch_categories]
    return data


def plain_provenance(step: str, args: argparse.Namespace) -> dict[str, Any]:
    """The run's provenance as plain JSON data (it goes into the checkpoint's recipe)."""
    return json.loads(json.dumps(provenance(step, args), default=str))


def _labels_or_blank(names: Sequence[str]) -> list[str]:
    try:
        return term_labels(names)
    except ValueError:
        return ["" for _ in names]


@dataclass
class LabelTraining:
    """What both label-trained steps derive from their inputs before building a model."""

    datamodule: ShardDataModule
    genes: list[str] | None
    summary: LabelSummary
    var_names_g: list[str]
    features: Features | None = None

    def transform_specs(self, args: argparse.Namespace) -> list[dict[str, Any]]:
        return [self.features.transform_spec] if self.features is not None else transform_specs(args, self.genes)


def prepare_label_training(args: argparse.Namespace) -> LabelTraining:
    """Check options, open the shards, check --genes and scan the labels, all before the pass."""
    check_label_training_options(args)
    features = pca_features(args.pca) if args.pca else scvi_features(args.scvi) if args.scvi else None
    batch_key = args.batch_key or (features.batch_key if features is not None else None)
    datamodule = ShardDataModule(
        args.input, batch_size=args.batch_size, batch_key=batch_key, obs_columns=[args.cell_type_key],
        num_workers=args.num_workers, shuffle=True, seed=args.seed,
        batch_categories=features.batch_categories if features is not None and batch_key else None,
    )
    collection = datamodule.collection
    if features is not None:
        Filter(features.genes).column_index(collection.var_names_g)  # a missing gene fails now, not mid-pass
        genes, var_names_g = None, list(features.names)
    else:
        genes = check_genes(args, collection)
        var_names_g = list(genes) if genes is not None else [str(g) for g in collection.var_names_g]
        if genes is not None:
            datamodule.select_genes(genes)  # totals for NormalizeTotal still sum every gene
    summary = scan_labels(collection, args.cell_type_key)
    require_labels(summary, args.input)
    if args.max_epochs is None:
        args.max_epochs = default_max_epochs(summary.n_cells, args.batch_size, device_count(args.devices, args.accelerator))
    logger.info(
        "%d of %d cells labelled with %d cell types; %d %s; %d epochs",
        summary.n_labelled, summary.n_cells, len(summary.labels), len(var_names_g),
        "genes" if features is None else f"features ({'PCA' if args.pca else 'scVI latent'})", args.max_epochs,
    )
    return LabelTraining(datamodule, genes, summary, var_names_g, features)


#: the call is the most specific term whose propagated probability reaches this (see predict --help)
CALL_THRESHOLD = 0.5


def socam_prediction_spec(classes: Sequence[str], descendant_cc: torch.Tensor, *, top_k: int,
                          threshold: float = CALL_THRESHOLD) -> dict[str, Any]:
    """The recipe's ``data.prediction`` for SOCAM: the propagated probabilities as a vector column, the
    call (term, label, probability) and the top-k terms, built by the predict step's Parquet writer."""
    classes = [str(c) for c in classes]
    descendants = descendant_lists(descendant_cc)
    return {
        "key": "cell_type_probs_nc", "column": "cell_type_probs", "dim": len(classes),
        "columns": [
            {"kind": "ontology_call", "key": "cell_type_probs_nc", "classes": classes,
             "class_labels": term_labels(classes), "descendants": descendants, "threshold": float(threshold),
             "term_column": "cell_type_ontology_term_id", "label_column": "cell_type",
             "probability_column": "cell_type_probability"},
            {"kind": "top_k", "key": "cell_type_probs_nc", "classes": classes, "k": int(top_k),
             "descendants": descendants, "term_column": "cell_type_top_k_ontology_term_id",
             "probability_column": "cell_type_top_k_probability"},
        ],
    }


def top_k_for(args: argparse.Namespace, n_classes: int) -> int:
    if args.top_k > n_classes:
        logger.warning("--top-k %d is more than the %d cell types found; writing the top %d", args.top_k, n_classes,
                       n_classes)
    return min(args.top_k, n_classes)


def run(args: argparse.Namespace) -> None:
    if args.top_k < 1:
        raise ConfigError(f"--top-k: must be at least 1, got {args.top_k}")
    setup = prepare_label_training(args)
    datamodule, summary, var_names_g = setup.datamodule, setup.summary, setup.var_names_g
    cl_names = summary.labels
    descendant_cc = descendant_tensor(cl_names)
    model_spec = spec(
        SOCAM, n_obs=summary.n_labelled, var_names_g=var_names_g,
        descendant_tensor=descendant_cc.tolist(), cl_names=cl_names, cl_name_subset=cl_names,
        probability_propagation_flag=bool(args.probability_propagation), W_prior_scale=float(args.w_prior_scale),
        W_init_scale=W_INIT_SCALE, seed=int(args.seed), log_metrics=True,
    )
    recipe = {
        "model": model_spec,
        "transforms": setup.transform_specs(args),
        "data": label_data(args, setup, prediction=socam_prediction_spec(
            cl_names, descendant_cc, top_k=top_k_for(args, len(cl_names)))),
        "provenance": plain_provenance(NAME, args),
    }
    fit_and_write(args, datamodule, recipe, {"label_key": args.cell_type_key, "label_format": "names"}, cl_names,
                  setup.features)
