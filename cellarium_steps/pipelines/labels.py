"""Cell type classifiers trained on an obs column of Cell Ontology ids: SOCAM and logistic regression.

Both take log1p(counts normalised to ``target_count``) of a gene list, or a fitted PCA's components,
or scVI's latent means (``pipelines.features``); a label pass over obs comes first, then training
with Adam for about ``DEFAULT_TRAINING_STEPS`` optimizer steps, then the checkpoint (recipe inside),
the class table and provenance.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch

from cellarium_steps.atomic import write_csv_atomically, write_json_atomically
from cellarium_steps.data import ShardDataModule
from cellarium_steps.data.errors import ConfigError, InputError
from cellarium_steps.data.labels import LabelSummary, require_labels, scan_labels
from cellarium_steps.data.options import DataOptions, recorded_source
from cellarium_steps.models.logistic_regression import LogisticRegression
from cellarium_steps.models.socam import SOCAM
from cellarium_steps.ontology import descendant_tensor, is_unlabelled, ontology_version, term_labels
from cellarium_steps.outputs.genes import selected_genes
from cellarium_steps.outputs.prediction_columns import descendant_lists
from cellarium_steps.pipelines.features import Features, pca_features, scvi_features
from cellarium_steps.runner import AtomicCheckpointIO, CellariumModule, build_trainer
from cellarium_steps.runner.devices import device_count
from cellarium_steps.runner.recipe import spec
from cellarium_steps.transforms import Filter, Log1p, NormalizeTotal

logger = logging.getLogger("cellarium_steps")

#: train-socam's default Laplace scale b (the MAP objective is scikit-learn's L1 logistic regression with C = b)
SOCAM_W_PRIOR_SCALE = 1.0
#: SOCAM starts from small weights: with thousands of genes, W_init_scale=1 (the API default) gives huge logits.
W_INIT_SCALE = 0.01
#: optimizer steps the default max_epochs aims for: Adam (lr 0.01) on the Laplace-prior loss needs a few
#: hundred; 20 epochs of 15,000 cells at batch 1,024 are only 300 (leave-one-source-out on the merged PBMC file,
#: 20 epochs -> this default's 36-42: accuracy at the labelled depth 77.1 -> 79.9, coarse 98.0 -> 97.9).
DEFAULT_TRAINING_STEPS = 500
#: ... and never more epochs than this, however small the data
DEFAULT_MAX_EPOCHS_CAP = 50
#: the call is the most specific term whose propagated probability reaches this (see predict --help)
CALL_THRESHOLD = 0.5


def default_max_epochs(n_cells: int, batch_size: int, devices: int = 1) -> int:
    """Epochs for about ``DEFAULT_TRAINING_STEPS`` optimizer steps: 1 on millions of cells, up to the cap on
    thousands (as scvi-tools scales its default epochs with the cell count)."""
    steps_per_epoch = max(1, math.ceil(n_cells / (batch_size * max(devices, 1))))
    return max(1, min(DEFAULT_MAX_EPOCHS_CAP, math.ceil(DEFAULT_TRAINING_STEPS / steps_per_epoch)))


@dataclass(frozen=True)
class LabelTrainingOptions:
    """What both classifiers take (the command-line options of the same names)."""

    inputs: Sequence[str]
    output: str
    genes: str | None = None
    cell_type_key: str = "cell_type_ontology_term_id"
    max_epochs: int | None = None
    learning_rate: float = 1e-2
    target_count: float = 1e4
    pca: str | None = None
    scvi: str | None = None
    w_prior_scale: float = 1.0
    batch_key: str | None = None
    batch_size: int = 1024
    num_workers: int = 0
    devices: int | str = 1
    accelerator: str = "auto"
    num_nodes: int = 1
    seed: int = 0
    data_options: DataOptions = field(default_factory=DataOptions)
    provenance: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ConfigError(f"--max-epochs: must be at least 1, got {self.max_epochs}")
        for name in ("learning_rate", "target_count", "w_prior_scale"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be positive, got {getattr(self, name)}")
        if not str(self.output).endswith(".ckpt"):
            raise ConfigError(f"--output: the checkpoint path must end in .ckpt, got {self.output!r}")
        if self.genes and (self.pca or self.scvi):
            raise ConfigError(f"--genes does not combine with --{'pca' if self.pca else 'scvi'}: its own genes are used")


@dataclass
class LabelTraining:
    """What both classifiers derive from their inputs before building a model."""

    options: LabelTrainingOptions
    datamodule: ShardDataModule
    genes: list[str] | None
    summary: LabelSummary
    var_names_g: list[str]
    max_epochs: int
    features: Features | None = None

    def transform_specs(self) -> list[dict[str, Any]]:
        """A frozen feature pipeline, or NormalizeTotal -> Log1p -> Filter(genes)."""
        if self.features is not None:
            return [self.features.transform_spec]
        specs = [spec(NormalizeTotal, target_count=float(self.options.target_count)), spec(Log1p)]
        if self.genes is not None:
            specs.append(spec(Filter, filter_list=list(self.genes)))
        return specs

    def recipe(self, model_spec: dict[str, Any], prediction: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint's recipe; its "data" entry says what inputs the model expects and the classes of
        its outputs (and, for scVI features, the batch coding predict must read the cells with)."""
        summary = self.summary
        data = {
            "genes": self.var_names_g, "label_key": summary.key, "classes": summary.labels,
            "class_labels": term_labels(summary.labels), "label_counts": summary.counts,
            "n_labelled": summary.n_labelled, "ontology": ontology_version(),
            "target_count": float(self.options.target_count), "prediction": prediction,
            "source": recorded_source(self.datamodule.collection),
        }
        collection = self.datamodule.collection
        if self.features is not None and self.features.batch_categories is not None and collection.batch_key:
            data["batch_key"] = collection.batch_key
            data["batch_categories"] = [str(c) for c in collection.batch_categories]
        provenance = json.loads(json.dumps(self.options.provenance, default=str))
        if "config" in provenance:  # the epochs the run used, also when worked out from the cell count
            provenance["config"]["max_epochs"] = self.max_epochs
        return {"model": model_spec, "transforms": self.transform_specs(), "data": data, "provenance": provenance}


def prepare_label_training(options: LabelTrainingOptions) -> LabelTraining:
    """Check options, open the shards, check the genes and scan the labels, all before the pass."""
    options.check()
    features = pca_features(options.pca) if options.pca else scvi_features(options.scvi) if options.scvi else None
    batch_key = options.batch_key or (features.batch_key if features is not None else None)
    datamodule = ShardDataModule(
        options.inputs, batch_size=options.batch_size, batch_key=batch_key, obs_columns=[options.cell_type_key],
        num_workers=options.num_workers, shuffle=True, seed=options.seed,
        batch_categories=features.batch_categories if features is not None and batch_key else None,
        **options.data_options.open_kwargs(),
    )
    collection = datamodule.collection
    if features is not None:
        Filter(features.genes).column_index(collection.var_names_g)  # a missing gene fails now, not mid-pass
        genes, var_names_g = None, list(features.names)
    else:
        genes = selected_genes(options.genes, collection.var_names_g, collection.shards[0].path)
        var_names_g = list(genes) if genes is not None else [str(g) for g in collection.var_names_g]
        if genes is not None:
            datamodule.select_genes(genes)  # totals for NormalizeTotal still sum every gene
    summary = scan_labels(collection, options.cell_type_key)
    require_labels(summary, options.inputs)
    max_epochs = options.max_epochs or default_max_epochs(
        summary.n_cells, options.batch_size, device_count(options.devices, options.accelerator) * options.num_nodes)
    logger.info(
        "%d of %d cells labelled with %d cell types; %d %s; %d epochs",
        summary.n_labelled, summary.n_cells, len(summary.labels), len(var_names_g),
        "genes" if features is None else f"features ({'PCA' if options.pca else 'scVI latent'})", max_epochs,
    )
    return LabelTraining(options, datamodule, genes, summary, var_names_g, max_epochs, features)


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


def fit_and_write(setup: LabelTraining, recipe: dict[str, Any], module_kwargs: dict[str, Any],
                  classes: list[str]) -> LabelledTrainingModule:
    """Train, then write the checkpoint (atomically, recipe inside), the class table and provenance."""
    options = setup.options
    trainer = build_trainer(
        devices=options.devices, accelerator=options.accelerator, num_nodes=options.num_nodes,
        max_epochs=setup.max_epochs, trainable=True,
        plugins=[AtomicCheckpointIO()],
    )
    pl.seed_everything(options.seed, workers=True, verbose=False)
    module = LabelledTrainingModule.from_recipe(
        recipe, optim_kwargs={"lr": options.learning_rate}, seed=options.seed, label_key=options.cell_type_key,
        **module_kwargs,
    )
    if setup.features is not None:
        module.transforms[0].load_state_dict(setup.features.state)
    trainer.fit(module, datamodule=setup.datamodule)
    trainer.save_checkpoint(options.output, weights_only=True)
    model = module.model
    classes = list(getattr(model, "active_cl_names", None) or getattr(model, "y_categories", classes))
    if trainer.global_rank == 0:
        write_csv_atomically(pd.DataFrame({"cl_name": classes, "label": _labels_or_blank(classes)}),
                             options.output + ".classes.csv")
        write_json_atomically(recipe["provenance"], options.output + ".provenance.json")
        logger.info("wrote %s", options.output)
    return module


def _labels_or_blank(names: Sequence[str]) -> list[str]:
    try:
        return term_labels(names)
    except ValueError:
        return ["" for _ in names]


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


def train_socam(options: LabelTrainingOptions, *, probability_propagation: bool = True,
                top_k: int = 3) -> LabelledTrainingModule:
    """SOCAM over the Cell Ontology terms found in ``options.cell_type_key``; predict writes each cell's
    call and its ``top_k`` terms."""
    if top_k < 1:
        raise ConfigError(f"--top-k: must be at least 1, got {top_k}")
    setup = prepare_label_training(options)
    cl_names = setup.summary.labels
    if top_k > len(cl_names):
        logger.warning("--top-k %d is more than the %d cell types found; writing the top %d", top_k, len(cl_names),
                       len(cl_names))
    descendant_cc = descendant_tensor(cl_names)
    model_spec = spec(
        SOCAM, n_obs=setup.summary.n_labelled, var_names_g=setup.var_names_g,
        descendant_tensor=descendant_cc.tolist(), cl_names=cl_names, cl_name_subset=cl_names,
        probability_propagation_flag=bool(probability_propagation), W_prior_scale=float(options.w_prior_scale),
        W_init_scale=W_INIT_SCALE, seed=int(options.seed), log_metrics=True,
    )
    prediction = socam_prediction_spec(cl_names, descendant_cc, top_k=min(top_k, len(cl_names)))
    return fit_and_write(setup, setup.recipe(model_spec, prediction), {"label_format": "names"}, cl_names)


def train_logreg(options: LabelTrainingOptions) -> LabelledTrainingModule:
    """L1-regularised multinomial logistic regression over the terms as flat classes."""
    setup = prepare_label_training(options)
    categories = setup.summary.labels
    model_spec = spec(
        LogisticRegression, n_obs=setup.summary.n_labelled, var_names_g=setup.var_names_g, y_categories=categories,
        W_prior_scale=float(options.w_prior_scale), W_init_scale=W_INIT_SCALE, seed=int(options.seed),
        log_metrics=True,
    )
    prediction = {"key": "y_logits_nc", "column": "y_logits", "dim": len(categories)}
    return fit_and_write(setup, setup.recipe(model_spec, prediction),
                         {"label_format": "codes", "categories": categories}, categories)
